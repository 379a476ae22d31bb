"""The background build of a compiled step (archopt.background_build): the lock other
processes see, one thread beside it, and the build that follows weights="auto"."""

import os

import pytest
import torch

import archopt
from archopt import background_build as bb
from archopt import decode_step as ds
from archopt.generate import generate, plan_decode, stream

pytest.importorskip("safetensors")


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_while_a_build_runs_beside_it_auto_decodes_on_one_thread(cache_root):
    """With every core busy, OpenMP threads wait on each other at every barrier: beside a
    build, the eager run takes one thread (and gives the rest back when it ends)."""
    torch.manual_seed(1)
    m = archopt.create_model("llama-tiny", max_position_embeddings=128).eval()
    folder = ds.step_folder(m)
    folder.mkdir(parents=True)
    (folder / bb.LOCK_FILE).write_text(str(os.getpid()))  # a live builder: this process
    before = torch.get_num_threads()
    plan = plan_decode(m)
    assert plan.step is None and plan.threads == 1 and "still being built" in plan.how
    seen = []
    for _ in stream(m, [[1, 2, 3]], 4, stop=None):
        seen.append(torch.get_num_threads())
    assert seen == [1] * 4 and torch.get_num_threads() == before
    (folder / bb.LOCK_FILE).unlink()
    assert plan_decode(m).threads is None


def test_a_background_build_for_auto_builds_the_format_the_next_run_loads(tmp_path, monkeypatch):
    """A first run loaded weights="auto" as 'gguf' (the kernels were not built yet); its
    background build, asked for "auto", builds the kernels, then finds auto means gguf-act8
    and builds that model's step, which the next run's load finds."""
    pytest.importorskip("gguf")
    from archopt.loading.llm import load_llm
    from archopt.ops import act8, cpu_kernels
    from tests.test_gguf import Q, _hf_llama, _tiny_tokenizer, _write_hf_llama

    if not act8.cpu_has_vnni():
        pytest.skip("auto chooses int8 activations only on a CPU with AVX512-VNNI")
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "nice", lambda n: 0)  # in-process here: leave pytest's priority
    hf = _hf_llama(True)
    # a vocabulary of 16k rows: every layer, the tied head too, takes the kernels' tiles
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]), pad_to_multiple_of=16)
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    path = _write_hf_llama(tmp_path / "m.gguf", hf, Q.Q4_1, tokenizer=_tiny_tokenizer())
    first = load_llm(path, weights="gguf")  # what the first run had
    parents = ds.step_folder(first)
    parents.mkdir(parents=True)
    (parents / bb.LOCK_FILE).write_text("1")
    argv = ["build", str(path), "--weights", "auto", "--threads", "1", "--expect", parents.name]
    assert bb._main(argv) == 0
    assert cpu_kernels.loaded() and not (parents / bb.LOCK_FILE).exists()
    nxt = load_llm(path)  # the next run
    assert nxt.config.extra["weights"] == "gguf-act8" and nxt.config.extra["weights_auto"]
    assert ds.cached_step(nxt) is not None
    ids = torch.tensor([[1, 5, 9, 4]])
    fast = generate(nxt, ids, 6, stop=None)  # the step from the cache
    assert torch.equal(fast, generate(nxt, ids, 6, stop=None, cache="static", compile="off"))


def test_a_servers_build_then_builds_what_auto_loads_next(tmp_path, monkeypatch):
    """A first server loaded weights="auto" as 'gguf' (the kernels were not built yet) and
    builds its paged step in the background; the same process then builds the kernels and
    the paged step of the format the next server's auto loads (gguf-act8). Before, a machine
    that only ever served stayed on 'gguf'. (Compiling is stubbed: the order is the test.)"""
    pytest.importorskip("gguf")
    from types import SimpleNamespace

    from archopt.loading.llm import load_llm
    from archopt.ops import act8, cpu_kernels
    from tests.test_gguf import Q, _hf_llama, _tiny_tokenizer, _write_hf_llama

    if not act8.cpu_has_vnni():
        pytest.skip("auto chooses int8 activations only on a CPU with AVX512-VNNI")
    assert cpu_kernels.load(build=True)  # in the usual cache: this test is not about them
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "nice", lambda n: 0)
    hf = _hf_llama(True)
    hf.resize_token_embeddings(len(_tiny_tokenizer()["tokens"]), pad_to_multiple_of=16)
    hf.config.vocab_size = hf.model.embed_tokens.weight.shape[0]
    path = _write_hf_llama(tmp_path / "m.gguf", hf, Q.Q4_1, tokenizer=_tiny_tokenizer())
    first = load_llm(path, weights="gguf")
    first.config.extra["weights_auto"] = True  # what auto gave before the kernels existed

    cmds = []
    popen = lambda cmd, **kw: cmds.append(cmd) or SimpleNamespace(pid=os.getpid())  # noqa: E731
    monkeypatch.setattr(bb.subprocess, "Popen", popen)
    monkeypatch.setattr(bb, "can_build_in_background", lambda m: True)
    monkeypatch.setenv("ARCHOPT_BACKGROUND_COMPILE", "1")  # the suite turns it off
    folder = bb.build_in_background(first, "paged")
    cmd = cmds[0]
    assert cmd[cmd.index("--weights") + 1] == "gguf" and "--then-auto" in cmd

    built = []

    def build_step(model, where, kind):
        built.append((model.config.extra["weights"], where.name, kind))
        assert (where / bb.LOCK_FILE).exists()  # others see it is being built
        return 0.0

    monkeypatch.setattr(bb, "build_step", build_step)
    monkeypatch.setattr(bb, "load_step", lambda *a, **k: None)
    assert bb._main(cmd[3:]) == 0
    assert [(w, k) for w, _, k in built] == [("gguf", "paged"), ("gguf-act8", "paged")]
    assert built[0][1] == folder.name and built[1][1] != folder.name
    assert not list((tmp_path / "cache").rglob(bb.LOCK_FILE))  # every lock let go
