"""The decode step compiled ahead of time: the eager model's logits and tokens, kept on disk,
loaded by a later process without tracing, never trusted when broken."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import archopt
from archopt import background_build as bb
from archopt import decode_step as ds
from archopt.generate import generate, plan_decode

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = archopt.create_model("llama-tiny", max_position_embeddings=256).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: fewer near-ties
        for p in m.parameters():
            p.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """Its own cache folder, so no other test's default path meets this compiled step."""
    root = tmp_path_factory.mktemp("step-cache")
    old = os.environ.get("ARCHOPT_CACHE")
    os.environ["ARCHOPT_CACHE"] = str(root)
    yield root
    os.environ["ARCHOPT_CACHE"] = old or ""


@pytest.fixture(scope="module")
def step(model, cache_root):
    return ds.compile_step(model)  # the one compile of this file (~30 s on 2 cores)


def assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("batch,prompt,slots", [(1, 5, 37), (3, 11, 100), (2, 1, 2 + 19)])
def test_step_logits_equal_the_eager_model(model, step, batch, prompt, slots):
    ids = torch.randint(0, 512, (batch, prompt))
    positions = torch.arange(prompt).expand(batch, prompt).clone()
    if batch > 1:  # left padding in row 0: its positions start later
        positions[0, : prompt // 2] = -1
        positions[0, prompt // 2 :] -= prompt // 2
    kv, ref_kv = (model.make_cache("static", batch=batch, reserve=slots) for _ in range(2))
    with torch.inference_mode():
        model(ids, positions=positions, cache=kv)
        model(ids, positions=positions, cache=ref_kv)
        token, pos = ids[:, -1:], positions[:, -1:] + 1
        for _ in range(slots - prompt):  # up to the last slot
            ref = model(token, positions=pos, cache=ref_kv, last_only=True)[:, -1]
            got = step(token, pos, kv)
            assert_close(got, ref)
            assert kv.length == ref_kv.length
            token, pos = ref.argmax(-1, keepdim=True), pos + 1
    for a, b in zip(kv.keys, ref_kv.keys):
        assert_close(a, b)
    assert torch.equal(kv.positions, ref_kv.positions)


def test_generate_through_the_step_gives_the_eager_tokens(model, step):
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 8, 1)]
    eager = generate(model, prompts, 40, cache="dense", compile="off", stop=None)
    assert torch.equal(generate(model, prompts, 40, compile="aot", stop=None), eager)
    plan = plan_decode(model)  # the default: the step is on disk now
    assert plan.step is not None and plan.cache == "static" and "from cache" in plan.how
    assert torch.equal(generate(model, prompts, 40, stop=None), eager)


def test_a_second_process_loads_the_step_without_tracing(model, step, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.st")
    ids = torch.randint(0, 512, (1, 6))
    expected = generate(model, ids, 12, cache="dense", compile="off", stop=None)
    script = f"""
import sys, json, torch, archopt
from safetensors.torch import load_file
from archopt.decode_step import cached_step
from archopt.generate import generate
m = archopt.create_model("llama-tiny", max_position_embeddings=256).eval()
m.load_state_dict(load_file({str(tmp_path / "w.st")!r}))
assert cached_step(m) is not None, "no compiled step found"
out = generate(m, torch.tensor({ids.tolist()}), 12, stop=None)
print(json.dumps({{"tokens": out.tolist(), "dynamo": "torch._dynamo" in sys.modules}}))
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["tokens"] == expected.tolist()
    assert not got["dynamo"]  # loaded and ran with no tracing at all


@pytest.mark.parametrize("damage", ["truncated library", "bad record", "other format", "lost"])
def test_a_broken_step_is_removed_and_rebuilt(model, step, damage, caplog, monkeypatch):
    folder = ds.step_folder(model)
    backup = folder.with_name(folder.name + ".good")
    shutil.copytree(folder, backup, dirs_exist_ok=True)
    try:
        if damage == "truncated library":
            pkg = folder / ds.PACKAGE_FILE
            pkg.write_bytes(pkg.read_bytes()[:5000])
        elif damage == "bad record":
            (folder / ds.RECORD_FILE).write_text("{")
        elif damage == "other format":
            record = json.loads((folder / ds.RECORD_FILE).read_text())
            (folder / ds.RECORD_FILE).write_text(json.dumps(record | {"format": "old"}))
        else:
            (folder / ds.CONSTANTS_FILE).unlink()
        assert ds.cached_step(model) is None
        assert not folder.exists()
        assert "rebuilding a broken compiled step" in caplog.text
        rebuilt = []

        def fake_build(m, f, kind="static", progress=False):  # the real build: test_step_logits
            rebuilt.append(f)
            shutil.copytree(backup, f, dirs_exist_ok=True)
            return 0.0

        monkeypatch.setattr(ds, "build_step", fake_build)
        again = ds.compile_step(model)
        assert rebuilt == [folder] and again is not None
    finally:
        shutil.copytree(backup, folder, dirs_exist_ok=True)
        shutil.rmtree(backup)


def test_the_key_follows_threads_structure_and_how_steps_are_compiled(model, monkeypatch):
    from archopt.ops.quant import quantize_weights

    before = ds.step_key(model)
    monkeypatch.setitem(ds.INDUCTOR_CONFIGS, "cpp.min_chunk_size", 512)  # a step built before
    assert ds.step_key(model) != before
    monkeypatch.undo()

    key = ds.step_key(model)
    threads = torch.get_num_threads()
    assert ds.step_key(model, threads + 1) != key
    assert ds.step_key(archopt.create_model("llama-tiny", max_position_embeddings=256)) == key
    assert ds.step_key(archopt.create_model("llama-tiny")) != key  # another rope table length
    import copy

    q = quantize_weights(copy.deepcopy(model), "int8", kernel=False)
    assert ds.step_key(q) != key


def test_combinations_that_cannot_work_fail_before_compiling(model, monkeypatch):
    monkeypatch.setattr(ds, "build_step", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(ValueError, match="compile='aot' needs cache='static'"):
        plan_decode(model, cache="dense", compile="aot")
    with pytest.raises(ValueError, match="compile must be True, False, one of"):
        plan_decode(model, compile=3)
    # auto with a cache kind the step cannot use: eager on that cache, no error
    assert plan_decode(model, cache="sliding:8").step is None


def test_without_a_writable_cache_auto_runs_eager(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ARCHOPT_CACHE", str(blocker / "sub"))
    torch.manual_seed(1)
    m = archopt.create_model("llama-tiny").eval()
    plan = plan_decode(m)
    assert plan.step is None and plan.cache == "dense"
    assert bb.build_in_background(m) is None


# -- the paged step (the serving engine's decode batch) -------------------------------------


@pytest.fixture(scope="module")
def paged_step(model, cache_root):
    return ds.compile_step(model, kind="paged")  # the second compile of this file (~20 s)


def _paged(model, block_size):
    from archopt.ops.paged_kv import PagedKVCache

    cfg = model.config
    return PagedKVCache(
        num_layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        capacity=cfg.max_position_embeddings, block_size=block_size, num_blocks=2,
        attention="gather",
    )  # fmt: skip


@pytest.mark.parametrize("block_size,lengths", [(4, [5, 9, 1]), (1, [1, 2]), (16, [33, 3, 16])])
def test_paged_step_logits_equal_the_eager_paged_cache(model, paged_step, block_size, lengths):
    """Ragged rows, a pool that grows mid-decode (2 blocks at first), a forked sequence whose
    shared partial block is copied on its first write, block sizes 1 to 16."""
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in lengths]
    caches = ref, got = _paged(model, block_size), _paged(model, block_size)
    with torch.inference_mode():
        for kv in caches:
            for i, p in enumerate(prompts):
                kv.add_sequence(i)
                kv.bind([i])
                model(torch.tensor([p]), positions=torch.arange(len(p))[None], cache=kv)
                kv.commit(i, p)
            kv.fork(0, len(prompts))  # shares row 0's blocks, the partial last one too
        rows = list(range(len(prompts) + 1))
        token = torch.tensor([[p[-1]] for p in prompts] + [[prompts[0][-1]]])
        pos = torch.tensor([[len(p)] for p in prompts] + [[len(prompts[0])]])
        for _ in range(20):
            ref.bind(rows)
            got.bind(rows)
            want = model(token, positions=pos, cache=ref, last_only=True)[:, -1]
            assert_close(paged_step(token, pos, got), want)
            for kv in caches:
                for r, t in zip(rows, token[:, 0].tolist()):
                    kv.commit(r, [t])
            token, pos = want.argmax(-1, keepdim=True), pos + 1
    assert got.num_blocks > 2
    assert got.copies == ref.copies == (1 if lengths[0] % block_size else 0)  # the shared tail
    assert torch.equal(got.slot_pos, ref.slot_pos)
    assert_close(got.keys, ref.keys)
    assert [got.block_table(r) for r in rows] == [ref.block_table(r) for r in rows]


@pytest.mark.parametrize("block_size,chunks", [(4, [11, 1, 6]), (1, [3, 2]), (16, [17, 40])])
def test_paged_step_reads_prompt_chunks_as_causal_rows(model, paged_step, block_size, chunks):
    """A prompt fed a token a row, in chunks of odd lengths that cross blocks, beside another
    sequence's decoding row: the eager model's logits of each sequence whole, at the rows asked
    for only (the chunk's last, then the decoding one); then decoding goes on from the chunks'
    keys and values."""
    prompt = torch.randint(0, 512, (sum(chunks),)).tolist()
    other = torch.randint(0, 512, (7 + len(chunks),)).tolist()
    kv = _paged(model, block_size)
    kv.add_sequence(0)
    kv.add_sequence(1)
    with torch.inference_mode():
        kv.bind([1])
        model(torch.tensor([other[:7]]), cache=kv)
        kv.commit(1, other[:7])
        start = 0
        for k, n in enumerate(chunks):
            kv.bind([1] + [0] * n)
            tokens = torch.tensor([other[7 + k], *prompt[start : start + n]]).view(-1, 1)
            pos = torch.tensor([7 + k, *range(start, start + n)]).view(-1, 1)
            logits = paged_step(tokens, pos, kv, [n, 0])
            assert logits.shape == (2, model.config.vocab_size)
            assert_close(logits[0], model(torch.tensor([prompt[: start + n]]))[0, -1])
            assert_close(logits[1], model(torch.tensor([other[: 8 + k]]))[0, -1])
            kv.commit(1, [other[7 + k]])
            kv.commit(0, prompt[start : start + n])
            start += n
        kv.bind([0])
        nxt = int(logits[0].argmax())
        got = paged_step(torch.tensor([[nxt]]), torch.tensor([[len(prompt)]]), kv)
        assert_close(got[0], model(torch.tensor([[*prompt, nxt]]))[0, -1])


def test_the_model_gives_the_logits_of_the_rows_asked_for_only(model):
    ids = torch.randint(0, 512, (3, 5))
    with torch.inference_mode():
        whole = model(ids, last_only=True)
        assert torch.equal(model(ids, last_only=True, rows=torch.tensor([2, 0])), whole[[2, 0]])
        for rows, needle in (
            (torch.tensor([3]), r"batch rows in \[0, 3\), got 3"),
            (torch.tensor([-1, 0]), "got -1"),
            (torch.tensor([], dtype=torch.long), "non-empty"),
            (torch.tensor([[0]]), "1-D int64"),
            (torch.tensor([0.0]), "torch.float32"),
        ):
            with pytest.raises(ValueError, match=needle):
                model(ids, rows=rows)


def test_paged_step_rejects_a_prompt_chunk(model, paged_step):
    kv = _paged(model, 4)
    kv.add_sequence(0)
    kv.bind([0])
    with pytest.raises(ValueError, match="one real token per row"):
        paged_step(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), kv)
    kv.add_sequence(1)
    kv.bind([1, 0])
    for bad in ([[0], [3]], [[0], [-1]]):  # row 1 not at its next position: nothing moves
        with pytest.raises(ValueError, match="sequence 0 holds 0 tokens, got position"):
            paged_step(torch.tensor([[1], [2]]), torch.tensor(bad), kv)
        assert kv.sequence_length(1) == kv.sequence_length(0) == 0
    with pytest.raises(ValueError, match="one row for each of the 2 bound rows"):
        paged_step(torch.tensor([[1]]), torch.tensor([[0]]), kv)
    two, at = torch.tensor([[1], [2]]), torch.tensor([[0], [0]])
    for rows, needle in (([2], "in \\[0, 2\\), got 2"), ([0, -1], "got -1"), ([], "0 logit rows")):
        with pytest.raises(ValueError, match=needle):  # before the library reads past its rows
            paged_step(two, at, kv, rows)
        assert kv.sequence_length(1) == kv.sequence_length(0) == 0


def test_paged_step_has_its_own_key_and_loads_from_the_cache(model, paged_step):
    assert ds.step_key(model, kind="paged") != ds.step_key(model)
    assert isinstance(ds.cached_step(model, "paged"), ds.CompiledPagedStep)
    assert isinstance(ds.cached_step(model), ds.CompiledStep)  # the static one is its own


def test_a_paged_step_over_q8_blocks_calls_the_kernels_directly(tmp_path, monkeypatch):
    """A gguf-act8 model with Q8_0 blocks: its compiled paged step calls archopt's kernels
    through their C entry points (int8 x int8 linear layers, the paged attention), not the
    dispatcher, and the serving engine decodes the same greedy tokens with it as eager."""
    pytest.importorskip("gguf")
    import zipfile

    from archopt.loading.llm import load_llm
    from archopt.ops import act8, cpu_kernels
    from archopt.serve.engine import Engine, SamplingParams
    from tests.test_gguf import Q, _hf_llama, _tiny_tokenizer, _write_hf_llama

    if not act8.cpu_has_vnni():
        pytest.skip("gguf-act8 runs on a CPU with AVX512-VNNI")
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    assert cpu_kernels.load(build=True)
    hf = _hf_llama(True)
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]), pad_to_multiple_of=16)
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    path = _write_hf_llama(tmp_path / "m.gguf", hf, Q.Q8_0, tokenizer=_tiny_tokenizer())
    model = load_llm(path, weights="gguf-act8")
    step = ds.compile_step(model, kind="paged")
    with zipfile.ZipFile(next(step.folder.glob("*.pt2"))) as z:
        wrapper = "".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    for op in ("int8_q8_linear", "paged_decode_attention"):
        assert f"aoti_torch_cpu_{op}(" in wrapper
    assert "proxy_executor_call_function" not in wrapper
    prompts = [[1, 5, 9, 4], [7, 3], [2, 8, 8, 8, 6, 1, 2]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fast = Engine(model, compile=step, max_batch=4).generate(prompts, params)
    eager = Engine(model, compile="off", max_batch=4).generate(prompts, params)
    assert [r.output for r in fast] == [r.output for r in eager]
