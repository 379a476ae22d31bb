"""archopt's C++ decode-attention kernels against their dense references: random shapes, ragged
and padded slots, rows that see nothing, head sizes with and without the vectorized path; a
row's result independent of its batch; clear errors on bad input. The greedy kernel against
argmax: ties, NaN, infinities, signed zeros, vocabularies around the vector width."""

import os

import pytest
import torch

from archopt.ops import cpu_kernels
from archopt.ops.paged_attention import DecodeView


@pytest.fixture(scope="module", autouse=True)
def kernels(tmp_path_factory):
    old = os.environ.get("ARCHOPT_CACHE")
    os.environ["ARCHOPT_CACHE"] = str(tmp_path_factory.mktemp("kernel-cache"))
    try:
        if not cpu_kernels.load(build=True):  # ~10 s on 2 cores
            pytest.skip(f"archopt's CPU kernels: {cpu_kernels.why_unavailable()}")
        yield
    finally:
        os.environ["ARCHOPT_CACHE"] = old or ""


def dense(q, keys, values, seen):
    """float64 softmax attention of each row over the slots ``seen`` (B, S) marks; keys and
    values (B, Hkv, S, d); zeros for a row that sees nothing."""
    b, hq, _, d = q.shape
    h = keys.shape[1]
    qg = q.double().reshape(b, h, hq // h, d)
    s = qg @ keys.double().transpose(-1, -2) * d**-0.5  # (B, Hkv, g, S)
    s = s.masked_fill(~seen[:, None, None], float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))  # a row that sees nothing: zeros
    return (p @ values.double()).reshape(b, hq, 1, d)


def paged_case(b, hq, hkv, d, span, pool, gen):
    keys, values = (torch.randn(hkv, pool, d, generator=gen) for _ in range(2))
    slot_pos = torch.randint(-1, 60, (pool,), generator=gen)  # -1: an empty slot
    read = torch.randint(0, pool, (b, span), generator=gen)
    positions = torch.randint(0, 60, (b, 1), generator=gen)
    q = torch.randn(b, hq, 1, d, generator=gen)
    return q, keys, values, read, slot_pos, positions


SHAPES = [  # (batch, query heads, kv heads, head size, read span, pool)
    (1, 9, 3, 64, 7, 40),  # vectorized path (d 64, group 3)
    (4, 9, 3, 64, 129, 300),
    (3, 8, 2, 128, 33, 70),  # vectorized path (d 128, group 4)
    (2, 8, 2, 128, 150, 160),  # most slots seen: whole tiles of 16 scores and a tail
    (2, 7, 1, 64, 17, 50),  # group 7: the generic path
    (5, 6, 3, 48, 31, 90),  # d 48: the generic path
    (2, 4, 4, 16, 2, 3),
]


@pytest.mark.parametrize("b,hq,hkv,d,span,pool", SHAPES)
def test_paged_kernel_equals_the_dense_reference_and_the_torch_expression(
    b, hq, hkv, d, span, pool
):
    gen = torch.Generator().manual_seed(b * 1000 + d)
    q, keys, values, read, slot_pos, positions = paged_case(b, hq, hkv, d, span, pool, gen)
    read_pos = slot_pos[read]
    seen = (read_pos >= 0) & (read_pos <= positions)
    seen[0] = False  # a row that sees nothing gets zeros, not NaN
    positions[0] = -1
    got = torch.ops.archopt.paged_decode_attention(
        q, keys, values, read, slot_pos, positions, d**-0.5
    )
    per_row = (keys[:, read].transpose(0, 1), values[:, read].transpose(0, 1))  # (B, Hkv, S, d)
    want = dense(q, *per_row, seen)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    # the torch expression the compiled step runs without the kernel, on rows that see a slot
    rows = seen.any(-1)
    view = DecodeView(None, read[rows], slot_pos, None, None)
    view.keys, view.values = [keys], [values]
    view.write_slots = read[rows, 0]  # rewriting a slot with its own contents: no change
    k_new = keys[:, read[rows, 0]].transpose(0, 1)[:, :, None]
    v_new = values[:, read[rows, 0]].transpose(0, 1)[:, :, None]
    torch_expr = view.attend(0, q[rows], k_new, v_new, positions[rows])
    torch.testing.assert_close(got[rows], torch_expr, rtol=0, atol=2e-6 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,d,span,pool", SHAPES)
def test_half_precision_caches_are_read_as_the_values_they_hold(b, hq, hkv, d, span, pool, dtype):
    """Keys and values kept in float16 or bfloat16 (``kv_cache_dtype``): each kernel's result
    is the dense reference over the values the cache holds (widened exactly, every sum in
    float32), as tightly as for a float32 cache; the torch expression likewise; a row the
    same alone as in its batch."""
    gen = torch.Generator().manual_seed(b * 100 + d + 7)
    q, keys, values, read, slot_pos, positions = paged_case(b, hq, hkv, d, span, pool, gen)
    keys, values = keys.to(dtype), values.to(dtype)
    seen = (slot_pos[read] >= 0) & (slot_pos[read] <= positions)
    paged = torch.ops.archopt.paged_decode_attention
    got = paged(q, keys, values, read, slot_pos, positions, d**-0.5)
    per_row = (keys[:, read].transpose(0, 1), values[:, read].transpose(0, 1))
    want = dense(q, *per_row, seen)
    tol = 2e-6 * want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
    for r in range(b):
        alone = paged(q[r : r + 1], keys, values, read[r : r + 1], slot_pos, positions[r : r + 1],
                      d**-0.5)  # fmt: skip
        assert torch.equal(alone, got[r : r + 1])
    static = torch.ops.archopt.static_decode_attention
    static_got = static(q, per_row[0].contiguous(), per_row[1].contiguous(), slot_pos[read],
                        positions, d**-0.5)  # fmt: skip
    torch.testing.assert_close(static_got.double(), want, rtol=0, atol=tol)
    rows = seen.any(-1)  # the torch expression the compiled step runs without the kernel
    view = DecodeView(read[rows, 0], read[rows], slot_pos, [keys], [values])
    k_new = keys[:, read[rows, 0]].transpose(0, 1)[:, :, None].float()
    v_new = values[:, read[rows, 0]].transpose(0, 1)[:, :, None].float()
    torch_expr = view.attend(0, q[rows], k_new, v_new, positions[rows])
    assert torch_expr.dtype == torch.float32
    torch.testing.assert_close(got[rows], torch_expr, rtol=0, atol=tol)


@pytest.mark.parametrize("b,hq,hkv,d,span,pool", SHAPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_a_row_sees_makes_that_row_nan_as_dense_attention_does(
    b, hq, hkv, d, span, pool, bad
):
    """NaN (or +Inf, whose score is Inf) in a key a row attends: that row and kv head's
    outputs are NaN, as in the dense reference, in SDPA and in the torch expression; a finite
    average that skipped the key would be a silent wrong result. Other rows stay finite."""
    gen = torch.Generator().manual_seed(11 + d)
    q, keys, values, read, slot_pos, positions = paged_case(b, hq, hkv, d, span, pool, gen)
    positions[:] = 100  # every slot with a position is seen
    slot_pos[read[0]] = torch.arange(span)  # row 0 sees all its slots
    others = read[1:].flatten()
    spare = [s for s in read[0].tolist() if s not in set(others.tolist())]
    if not spare:
        pytest.skip("every slot of row 0 is shared with another row in this draw")
    keys[0, spare[len(spare) // 2]] = bad  # kv head 0 only
    got = torch.ops.archopt.paged_decode_attention(
        q, keys, values, read, slot_pos, positions, d**-0.5
    )
    g = hq // hkv
    assert got[0, :g].isnan().all()  # row 0, the query heads of kv head 0
    assert got[0, g:].isfinite().all()
    rows_seen = (slot_pos[read] >= 0).any(-1)
    assert got[1:][rows_seen[1:]].isfinite().all()


@pytest.mark.parametrize("b,hq,hkv,d,span,pool", SHAPES)
def test_paged_kernel_rows_do_not_depend_on_their_batch(b, hq, hkv, d, span, pool):
    gen = torch.Generator().manual_seed(7 + d)
    q, keys, values, read, slot_pos, positions = paged_case(b, hq, hkv, d, span, pool, gen)
    op = torch.ops.archopt.paged_decode_attention
    batched = op(q, keys, values, read, slot_pos, positions, d**-0.5)
    for r in range(b):
        alone = op(
            q[r : r + 1], keys, values, read[r : r + 1], slot_pos, positions[r : r + 1], d**-0.5
        )
        assert torch.equal(alone, batched[r : r + 1])


@pytest.mark.parametrize("b,hq,hkv,d,span,pool", SHAPES)
def test_a_strided_q_gives_what_its_contiguous_copy_gives(b, hq, hkv, d, span, pool):
    """q read through its strides: heads-major (as a compiled step's batch has it), every
    other head of a wider tensor, one row broadcast; the output is contiguous either way."""
    gen = torch.Generator().manual_seed(5 + d)
    q, keys, values, read, slot_pos, positions = paged_case(b, hq, hkv, d, span, pool, gen)
    paged = torch.ops.archopt.paged_decode_attention
    static_keys, static_values = keys[:, read].transpose(0, 1), values[:, read].transpose(0, 1)
    static_pos = slot_pos[read]
    static = torch.ops.archopt.static_decode_attention
    views = [
        q.transpose(0, 1).contiguous().transpose(0, 1),  # (B, Hq, 1, d) over (Hq, B, 1, d)
        torch.randn(b, 2 * hq, 1, d, generator=gen)[:, ::2],  # heads 2 d apart
        q[:1].expand(b, hq, 1, d),  # one row's q for every row (stride 0)
    ]
    for strided in views:
        dense_q = strided.contiguous()
        got = paged(strided, keys, values, read, slot_pos, positions, d**-0.5)
        assert got.is_contiguous()
        assert torch.equal(got, paged(dense_q, keys, values, read, slot_pos, positions, d**-0.5))
        got = static(strided, static_keys.contiguous(), static_values.contiguous(), static_pos,
                     positions, d**-0.5)  # fmt: skip
        want = static(dense_q, static_keys.contiguous(), static_values.contiguous(), static_pos,
                      positions, d**-0.5)  # fmt: skip
        assert torch.equal(got, want)


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 2, 128), (6, 3, 48)])
@pytest.mark.parametrize("seen", [257, 300, 512, 513, 1000])
def test_long_rows_attended_in_chunks_equal_the_dense_reference(hq, hkv, d, seen):
    """A row past 256 visible slots is attended in chunks of 256 that are combined after: the
    dense reference's result, on both kernels; a row the same alone and beside others; NaN
    in one chunk's key makes its row's heads NaN, as unchunked."""
    gen = torch.Generator().manual_seed(seen + d)
    pool, span = 1101, 1024
    keys, values = (torch.randn(hkv, pool, d, generator=gen) for _ in range(2))
    slot_pos = torch.arange(pool)  # slot i holds position i, but the last, empty (padding)
    slot_pos[-1] = -1
    read = torch.stack([torch.randperm(pool - 1, generator=gen)[:span] for _ in range(3)])
    wanted = [seen, 10, min(seen + 37, span)]  # visible slots a row: long, short, long
    positions = torch.tensor([[read[r].sort().values[n - 1].item()] for r, n in enumerate(wanted)])
    q = torch.randn(3, hq, 1, d, generator=gen)
    paged = torch.ops.archopt.paged_decode_attention
    got = paged(q, keys, values, read, slot_pos, positions, d**-0.5)
    seen_mask = slot_pos[read] <= positions
    assert seen_mask.sum(-1).tolist() == wanted
    per_row = (keys[:, read].transpose(0, 1), values[:, read].transpose(0, 1))  # (B, Hkv, S, d)
    want = dense(q, *per_row, seen_mask)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())
    pad = torch.full((1, 700), pool - 1)  # as a wider row in its batch would pad its list
    for r in range(3):
        alone = paged(q[r : r + 1], keys, values, read[r : r + 1], slot_pos, positions[r : r + 1],
                      d**-0.5)  # fmt: skip
        padded = paged(q[r : r + 1], keys, values, torch.cat([read[r : r + 1], pad], 1), slot_pos,
                       positions[r : r + 1], d**-0.5)  # fmt: skip
        assert torch.equal(alone, got[r : r + 1]) and torch.equal(padded, alone)
    static = torch.ops.archopt.static_decode_attention
    static_got = static(q, per_row[0].contiguous(), per_row[1].contiguous(), slot_pos[read],
                        positions, d**-0.5)  # fmt: skip
    torch.testing.assert_close(static_got.double(), want, rtol=0,
                               atol=2e-6 * want.abs().max().item())  # fmt: skip
    # NaN in a key row 0 sees, in its last chunk, kv head 0 only
    last = read[0][seen_mask[0]][-1]
    bad = keys.clone()
    bad[0, last] = float("nan")
    nan_out = paged(q, bad, values, read, slot_pos, positions, d**-0.5)
    g = hq // hkv
    assert nan_out[0, :g].isnan().all() and nan_out[0, g:].isfinite().all()
    assert nan_out[1:].isfinite().all() or (read[1:] == last).any()


@pytest.mark.parametrize("b,hq,hkv,d,span,pool", SHAPES)
def test_static_kernel_equals_the_dense_reference(b, hq, hkv, d, span, pool):
    gen = torch.Generator().manual_seed(3 * d + b)
    keys, values = (torch.randn(b, hkv, span, d, generator=gen) for _ in range(2))
    slot_pos = torch.randint(-1, 60, (b, span), generator=gen)  # padding and empty slots: -1
    positions = torch.randint(0, 60, (b, 1), generator=gen)
    positions[-1] = -1  # sees nothing
    q = torch.randn(b, hq, 1, d, generator=gen)
    op = torch.ops.archopt.static_decode_attention
    got = op(q, keys, values, slot_pos, positions, d**-0.5)
    want = dense(q, keys, values, (slot_pos >= 0) & (slot_pos <= positions))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6 * want.abs().max().item())
    for r in range(b):
        alone = op(q[r : r + 1], keys[r : r + 1], values[r : r + 1], slot_pos[r : r + 1],
                   positions[r : r + 1], d**-0.5)  # fmt: skip
        assert torch.equal(alone, got[r : r + 1])


def test_bad_inputs_are_clear_errors():
    gen = torch.Generator().manual_seed(0)
    q, keys, values, read, slot_pos, positions = paged_case(2, 6, 3, 64, 5, 20, gen)
    op = torch.ops.archopt.paged_decode_attention
    bad = read.clone()
    bad[1, 2] = 20
    with pytest.raises(RuntimeError, match="read slot 20 is outside the pool of 20 slots"):
        op(q, keys, values, bad, slot_pos, positions, 0.125)
    with pytest.raises(RuntimeError, match="values must be Half, got Float"):
        op(q, keys.half(), values, read, slot_pos, positions, 0.125)
    with pytest.raises(RuntimeError, match="keys must be float32, float16 or bfloat16, got Double"):
        op(q, keys.double(), values.double(), read, slot_pos, positions, 0.125)
    with pytest.raises(RuntimeError, match="5 query heads must be a multiple of 3 kv heads"):
        op(q[:, :5], keys, values, read, slot_pos, positions, 0.125)
    with pytest.raises(RuntimeError, match="slot_pos has 19 entries, the pool 20 slots"):
        op(q, keys, values, read, slot_pos[:19], positions, 0.125)
    with pytest.raises(RuntimeError, match="keys must be contiguous"):
        op(q, keys.transpose(1, 2).contiguous().transpose(1, 2), values, read, slot_pos,
           positions, 0.125)  # fmt: skip


def test_turned_off_by_the_environment(monkeypatch):
    from archopt import decode_step as ds

    model = __import__("archopt").create_model("llama-tiny")
    with_kernels = ds.step_key(model, kind="paged")
    monkeypatch.setenv("ARCHOPT_CPU_KERNELS", "0")
    assert cpu_kernels.why_unavailable() == "turned off (ARCHOPT_CPU_KERNELS=0)"
    assert not cpu_kernels.load() or cpu_kernels.loaded()  # already loaded stays loaded
    assert ds.step_key(model, kind="paged") != with_kernels  # the step built without them


def test_loaded_kernels_are_kept_in_a_new_cache_folder(tmp_path, monkeypatch):
    """Loaded from one cache folder, then built for another (a step built there must load in a
    later process): the library and its record are copied there, the record last."""
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path))
    assert cpu_kernels.load(build=True)
    folder = tmp_path / cpu_kernels.SUBDIR / cpu_kernels.key()
    assert (folder / cpu_kernels.RECORD_FILE).is_file()
    assert (folder / cpu_kernels.LIBRARY_FILE).stat().st_size > 1000


@pytest.mark.parametrize("damage", ["truncated library", "no library", "bad record"])
def test_a_broken_kept_library_is_removed_and_rebuilt(tmp_path, damage):
    """In a fresh process (a library loads once per process): a kept library that does not
    load is removed and built again, and the kernels then run."""
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "cache"
    src = cpu_kernels._loaded.parent
    dst = cache / cpu_kernels.SUBDIR / src.name
    dst.mkdir(parents=True)
    for f in (cpu_kernels.LIBRARY_FILE, cpu_kernels.RECORD_FILE):
        shutil.copyfile(src / f, dst / f)
    lib = dst / cpu_kernels.LIBRARY_FILE
    if damage == "truncated library":
        lib.write_bytes(lib.read_bytes()[:4096])
    elif damage == "no library":
        lib.unlink()
    else:
        (dst / cpu_kernels.RECORD_FILE).write_text("{not json")
    code = (
        "import torch; from archopt.ops import cpu_kernels\n"
        "assert cpu_kernels.load(build=True), cpu_kernels.why_unavailable()\n"
        "q = torch.randn(1, 2, 1, 64); k = torch.randn(1, 2, 1, 64)\n"
        "p = torch.zeros(1, 1, dtype=torch.long)\n"
        "y = torch.ops.archopt.static_decode_attention(q, k, k.clone(), p, p, 0.125)\n"
        "assert torch.allclose(y, k.expand(1, 2, 1, 64))\n"
    )
    env = {**os.environ, "ARCHOPT_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "do not load" in run.stderr and "removed" in run.stderr
    assert lib.stat().st_size > 10_000 and (dst / cpu_kernels.RECORD_FILE).is_file()


@pytest.mark.parametrize("vocab", [1, 5, 15, 16, 17, 33, 1000, 49152, 49153])
def test_greedy_kernel_is_argmax(vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = [
        torch.randn(vocab, generator=gen),
        torch.randint(0, 3, (vocab,), generator=gen).float(),  # many ties: the first wins
        torch.full((vocab,), float("-inf")),
        torch.zeros(vocab),
    ]
    if vocab > 1:
        late_nan = torch.randn(vocab, generator=gen)
        late_nan[-1] = float("nan")  # NaN counts as the largest, even in the tail
        two_nans = torch.randn(vocab, generator=gen)
        two_nans[vocab // 2 :: max(vocab // 3, 1)] = float("nan")
        inf = torch.randn(vocab, generator=gen)
        inf[vocab // 3] = inf[-1] = float("inf")
        signed_zeros = torch.full((vocab,), -1.0)
        signed_zeros[vocab // 2] = -0.0
        signed_zeros[-1] = 0.0  # equal to -0.0: the first one wins
        rows += [late_nan, two_nans, inf, signed_zeros]
    logits = torch.stack(rows)
    got = torch.ops.archopt.greedy(logits)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(torch.ops.archopt.greedy(logits[1:2]), got[1:2])  # alone or batched
    assert torch.equal(torch.ops.archopt.greedy(logits.t().contiguous().t()), got)  # strided


def test_greedy_kernel_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.archopt.greedy(torch.zeros(2, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"float32 \(B, vocab\)"):
        torch.ops.archopt.greedy(torch.zeros(8))
    with pytest.raises(RuntimeError, match="1 to"):
        torch.ops.archopt.greedy(torch.zeros(2, 0))


def test_each_c_entry_point_is_declared_as_its_op_is_defined():
    """A compiled step calls the C entry points with the op's arguments in the op's order, as
    ``c_shim_declaration`` derives them from the op's schema: a declaration out of step with
    the C++ definition would pass wrong values, so each is held here to the definition's text
    (archopt/csrc), and every entry point must be in the process, loaded with global symbols."""
    import ctypes

    linear = "AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle scales, int64_t "
    attention = "AtenTensorHandle q, AtenTensorHandle keys, AtenTensorHandle values, "
    defined = {
        "int4_q8_linear": linear + "out_features",
        "int8_q8_linear": linear + "out_features",
        "paged_decode_attention": attention + "AtenTensorHandle read_slots, AtenTensorHandle "
        "slot_pos, AtenTensorHandle positions, double scale",
        "static_decode_attention": attention + "AtenTensorHandle slot_pos, AtenTensorHandle "
        "positions, double scale",
    }
    assert set(cpu_kernels.C_SHIM_OPS) == set(defined)
    for op, params in defined.items():
        want = f"AOTITorchError aoti_torch_cpu_{op}({params}, AtenTensorHandle* ret)"
        assert cpu_kernels.c_shim_declaration(op) == want
        assert getattr(ctypes.CDLL(None), f"aoti_torch_cpu_{op}")  # loaded with global symbols
    assert set(cpu_kernels.c_shims()) == {
        getattr(torch.ops.archopt, op).default for op in cpu_kernels.C_SHIM_OPS
    }
