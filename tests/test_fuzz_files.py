"""A mutation fuzzer over small valid model files: every mutant loads, or fails with one error.

Three seeds, built here (``tests/model_files.py``): a GGUF Llama with a byte-level tokenizer
and tensors in seven storage types, a Hugging Face folder (config.json + model.safetensors) and
a prepared cache entry (archopt's own safetensors + JSON record). Each case mutates one of them:
bytes flipped, a header number set to an extreme (0, 1, -1, 2**63, NaN, ...), a truncation,
a duplicated entry, a metadata value or tensor field replaced (another type, an extreme, another
tensor's offset), arrays nested deep. Then it loads the mutant and requires one of:

- a successful load whose model gives finite logits, and whose tokenizer's ids fit the model;
- an ``archopt.errors.ArchoptError`` (a ValueError) for GGUF and safetensors files; a
  ValueError for the prepared entry, which ``load_llm`` discards and rebuilds.

Never another exception type, never more than ``TIME_LIMIT_S`` for one case, never more than
``MEMORY_LIMIT_MIB`` above the process's resident memory at the case's start (its peak, read
from /proc/self/status after resetting it; where that is not possible, tracemalloc's peak).

Cases are seeded by their index: ``CASES`` per seed file by default (about 20 s here), ten times
as many with ``--runslow``, or ``ARCHOPT_FUZZ_CASES=N``. ``ARCHOPT_FUZZ_REPORT=FILE`` writes the
outcome counts and the worst time and memory as JSON (benchmarks/RELIABILITY.md quotes them).
transformers is hidden: the fallback tokenizer it builds (non-byte-level vocabularies) is its
code, not ours, and importing it mid-run would count its 200 MB against a case.
"""

from __future__ import annotations

import copy
import json
import os
import random
import struct
import sys
import time

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from . import fuzzing
from . import model_files as mf
from .fuzzing import (
    DELETE,
    bounded,
    check_model,
    extreme,
    finish,
    flip,
    json_paths,
    new_stats,
    odd_value,
    run_case,
    set_path,
)

CASES = {"gguf": 1500, "safetensors": 1000, "prepared": 300}


def n_cases(request, kind: str) -> int:
    if os.environ.get("ARCHOPT_FUZZ_CASES"):
        return int(os.environ["ARCHOPT_FUZZ_CASES"])
    return CASES[kind] * (10 if request.config.getoption("--runslow") else 1)


# ---------------------------------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_seed():
    spec = mf.tiny_gguf()
    raw, fields = spec.layout()
    return spec, raw, fields, len(raw) - len(spec.data)


def gguf_mutant(rng: random.Random, spec, raw: bytes, fields, header_end: int):
    kind = rng.choice(["flip", "number", "number", "truncate", "insert", "duplicate", "metadata",
                       "metadata", "tensor", "tensor", "nest", "count"])  # fmt: skip
    if kind == "flip":
        return kind, flip(rng, raw, header_end if rng.random() < 0.85 else len(raw))
    if kind == "number":
        offset, fmt, _ = rng.choice(fields)
        return kind, raw[:offset] + extreme(rng, fmt) + raw[offset + struct.calcsize(fmt) :]
    if kind == "truncate":
        return kind, raw[: rng.randrange(len(raw))]
    if kind == "insert":
        at = rng.randrange(header_end)
        return kind, raw[:at] + rng.randbytes(rng.randint(1, 24)) + raw[at:]
    s = copy.deepcopy(spec)
    if kind == "duplicate" and rng.random() < 0.5:
        s.kvs.insert(rng.randrange(len(s.kvs) + 1), copy.deepcopy(rng.choice(s.kvs)))
    elif kind == "duplicate":
        s.tensors.insert(rng.randrange(len(s.tensors) + 1), copy.deepcopy(rng.choice(s.tensors)))
    elif kind == "metadata":
        i = rng.randrange(len(s.kvs))
        kv = s.kvs[i]
        choice = rng.random()
        if choice < 0.15:
            del s.kvs[i]
        elif choice < 0.5 and kv.vtype in mf.SCALAR_FORMATS:
            kv.value = mf.Raw(extreme(rng, mf.SCALAR_FORMATS[kv.vtype]))
        else:
            kv.vtype, kv.value = rng.choice([
                (mf.U32, rng.choice([0, 1, 3, 2**32 - 1])), (mf.I32, -1), (mf.U64, 2**63),
                (mf.F32, float("nan")), (mf.F64, -0.0), (mf.BOOL, True), (mf.STR, "x"),
                (mf.STR, b"\xff\xfe"), (mf.ARR, (mf.I32, [1, 2])), (mf.ARR, (mf.STR, [])),
                (mf.ARR, (mf.U32, [0] * rng.choice([1, 2, 265, 1000]))),
            ])  # fmt: skip
    elif kind == "tensor":
        t = rng.choice(s.tensors)
        other = rng.choice(s.tensors)
        field = rng.choice(["dims", "rank", "type", "offset", "name"])
        if field == "dims" and t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice(
                [0, 1, 31, 33, 2**31, 2**63, 2**64 - 1, *other.dims]
            )
        elif field == "rank":
            t.dims = t.dims[:-1] if len(t.dims) > 1 and rng.random() < 0.5 else [*t.dims, 1]
        elif field == "type":
            t.type = rng.choice([*range(0, 42), 2**31, 2**32 - 1])
        elif field == "offset":
            t.offset = rng.choice([other.offset, t.offset + 1, t.offset + 32, 0, 2**63, 2**64 - 32])
        else:
            t.name = rng.choice([other.name, "", "blk.99.attn_q.weight", "blk.x.attn_q.weight"])
    elif kind == "nest":
        depth = rng.choice([2, 8, 9, 100, 10_000])
        s.kvs.insert(
            rng.randrange(len(s.kvs) + 1), mf.KV("fuzz.nested", mf.ARR, mf.nested_array(depth))
        )
    else:  # count
        n = len(s.kvs) if rng.random() < 0.5 else len(s.tensors)
        value = rng.choice([0, n - 1, n + 1, 2**32, 2**63, 2**64 - 1])
        if n == len(s.kvs):
            s.n_kv = value
        else:
            s.n_tensors = value
    return kind, s.to_bytes()


@pytest.fixture
def no_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ImportError


def test_gguf_mutants_load_or_fail_with_one_clear_error(
    request, tmp_path, gguf_seed, no_transformers
):
    from archopt.loading.gguf import load_gguf_llama

    spec, raw, fields, header_end = gguf_seed
    path = tmp_path / "mutant.gguf"
    path.write_bytes(raw)
    check_model(load_gguf_llama(path))  # the seed itself loads (and warms the imports up)
    variants = [{}, {"keep_quantized": True, "kernel": False}, {"keep_quantized": True}]
    n, stats = n_cases(request, "gguf"), new_stats()
    seed = int(os.environ.get("ARCHOPT_FUZZ_SEED", 0))
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        label, data = gguf_mutant(rng, spec, raw, fields, header_end)
        path.write_bytes(data)
        kwargs = variants[i % len(variants)]
        run_case("gguf", i, label, lambda kw=kwargs: load_gguf_llama(path, **kw), True, stats)
    finish("gguf", stats, n)


# --------------------------------------------------------------------------------- safetensors


def safetensors_mutant(rng: random.Random, raw: bytes, data_flips: bool = True):
    """A safetensors file with one thing wrong (or, for a flip in the data, nothing wrong)."""
    spec = mf.SafetensorsSpec.parse(raw)
    header_end = len(raw) - len(spec.data)
    kind = rng.choice(["flip", "length", "truncate", "entry", "entry", "entry", "duplicate"])
    if kind == "flip":
        in_data = data_flips and rng.random() < 0.15
        return kind, flip(rng, raw, len(raw) if in_data else header_end)
    if kind == "length":
        spec.header_length = rng.choice([0, 1, header_end - 9, header_end - 7, len(raw), 2**63,
                                         2**64 - 1, 100_000_001, rng.getrandbits(64)])  # fmt: skip
    elif kind == "truncate":
        return kind, raw[: rng.randrange(len(raw))]
    elif kind == "duplicate":  # JSON with one name twice: the second entry is another's copy
        names = [k for k in spec.header if k != "__metadata__"]
        a, b = rng.sample(names, 2)
        text = json.dumps(spec.header)
        spec.header_text = text[:-1] + ", " + json.dumps({a: spec.header[b]})[1:]
    else:
        names = [k for k in spec.header if k != "__metadata__"]
        name, other = rng.choice(names), rng.choice(names)
        entry = spec.header[name]
        field = rng.choice(["dtype", "shape", "offsets", "delete", "rename", "metadata"])
        if field == "dtype":
            dtypes = ["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F4", "XX", 7]
            entry["dtype"] = rng.choice(dtypes)
        elif field == "shape":
            shape = entry["shape"]
            entry["shape"] = rng.choice([[], [0], [2**40, 0], [-1], [1.5], "x", shape[::-1],
                                         [*shape, 1], spec.header[other]["shape"]])  # fmt: skip
        elif field == "offsets":
            begin, end = entry["data_offsets"]
            offsets = [spec.header[other]["data_offsets"], [end, begin], [begin, end + 4]]
            entry["data_offsets"] = rng.choice([*offsets, [0, 2**63], [begin], None])
        elif field == "delete":
            del spec.header[name]
        elif field == "rename":
            spec.header[rng.choice(["x", "lm_head.bias", "model.layers.9.mlp.up_proj.weight"])] = (
                spec.header.pop(name)
            )
        else:
            spec.header["__metadata__"] = rng.choice([{"a": 1}, [], "x", {"format": "pt"}])
    return kind, spec.to_bytes()


def config_mutant(rng: random.Random, config: dict):
    cfg = copy.deepcopy(config)
    choice = rng.random()
    if choice < 0.1:
        return "config text", rng.choice(["", "{", "[]", "null", "[" * 100_000, '{"a": 1}'])
    key = rng.choice(sorted(cfg))
    if choice < 0.2:
        del cfg[key]
    else:
        cfg[key] = odd_value(rng)
    return "config", json.dumps(cfg)


def test_safetensors_folder_mutants_load_or_fail_with_one_clear_error(request, tmp_path):
    from archopt.loading.llama import load_hf_llama

    folder = mf.tiny_hf_folder(tmp_path / "seed")
    raw = (folder / "model.safetensors").read_bytes()
    config = json.loads((folder / "config.json").read_text())
    check_model(load_hf_llama(folder, tokenizer=False))
    n, stats = n_cases(request, "safetensors"), new_stats()
    seed = int(os.environ.get("ARCHOPT_FUZZ_SEED", 0))
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        weights, text = raw, json.dumps(config)
        if rng.random() < 0.25:
            label, text = config_mutant(rng, config)
        else:
            label, weights = safetensors_mutant(rng, raw)
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "config.json").write_text(text)
        run_case(
            "safetensors", i, label, lambda: load_hf_llama(folder, tokenizer=False), True, stats
        )
    finish("safetensors", stats, n)


# -------------------------------------------------------------------------- prepared entries


def test_prepared_entry_mutants_load_or_fail_with_a_value_error(request, tmp_path, no_transformers):
    """A damaged cache entry must fail its checks (load_llm then rebuilds it), never crash."""
    from archopt.loading.gguf import load_gguf_llama
    from archopt.loading.prepared import RECORD_FILE, WEIGHTS_FILE, load_prepared, save_prepared

    # Tied: the output projection is the embedding's Q8_0 blocks, on torch's int4 kernel.
    tied = mf.tiny_gguf(mf.tiny_config(tie_word_embeddings=True))
    gguf_path = mf.write(tmp_path / "seed.gguf", tied)
    folder = tmp_path / "entry"
    model = load_gguf_llama(gguf_path, keep_quantized=True)
    assert model.config.extra["cpu_kernel"]["packed"] >= 1 and model.config.tie_word_embeddings
    save_prepared(model, folder)
    raw = (folder / WEIGHTS_FILE).read_bytes()
    record = json.loads((folder / RECORD_FILE).read_text())
    check_model(load_prepared(folder))
    paths = list(json_paths(record))
    n, stats = n_cases(request, "prepared"), new_stats()
    seed = int(os.environ.get("ARCHOPT_FUZZ_SEED", 0))
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        weights, text = raw, json.dumps(record)
        if rng.random() < 0.5:  # the data bytes are trusted: see RELIABILITY.md
            label, weights = safetensors_mutant(rng, raw, data_flips=False)
        elif rng.random() < 0.2:
            label, text = "record text", flip(rng, text.encode(), len(text)).decode("latin1")
        else:
            path = rng.choice(paths)
            value = DELETE if rng.random() < 0.2 else odd_value(rng)
            label = "record field"
            text = json.dumps(set_path(copy.deepcopy(record), path, value))
        (folder / WEIGHTS_FILE).write_bytes(weights)
        (folder / RECORD_FILE).write_text(text)
        run_case("prepared", i, label, lambda: load_prepared(folder), False, stats)
    finish("prepared", stats, n)


def test_the_probes_see_a_hang_and_an_allocation(monkeypatch):
    """The fuzzer's own instruments: a 200 MiB allocation and a stuck call are both caught."""
    out: dict = {}
    with bounded(out):
        block = torch.ones(200 * 2**20, dtype=torch.uint8)
        del block
    assert out["peak_mib"] >= 199
    stats = new_stats()
    monkeypatch.setattr(fuzzing, "TIME_LIMIT_S", 0.2)
    run_case("probe", 0, "hang", lambda: time.sleep(5), True, stats)
    assert stats["outcomes"] == {"HANG": 1} and "no result after 0.2 s" in stats["failures"][0]
    run_case("probe", 1, "crash", lambda: [][1], True, stats)
    run_case("probe", 2, "plain", lambda: int("x"), True, stats)
    assert stats["outcomes"] == {"HANG": 1, "FAIL": 2}
    assert "IndexError" in stats["failures"][1] and "a plain ValueError" in stats["failures"][2]
