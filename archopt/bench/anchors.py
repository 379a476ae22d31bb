"""The anchors archopt's benchmarks measure themselves against: Hugging Face transformers
on the same weights, and llama.cpp through llama-cpp-python (decode rate, and whole processes
from start to exit).

llama.cpp runs in a child process: llama.cpp and torch each bring an OpenMP runtime and thread
settings, and a crash in a native build (seen: a llama.cpp built with AMX kernels that
segfault on this VM) must not take the benchmark down. A failure is reported as an error.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def hf_twin(model):
    """A transformers ``LlamaForCausalLM`` holding exactly ``model``'s weights (a ``Llama``)."""
    import transformers

    from archopt.loading.llama import llama_state_dict_to_hf

    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=cfg.rope_scaling,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    sd = llama_state_dict_to_hf(model.state_dict(), cfg)
    sd.setdefault("lm_head.weight", model.embed.weight)  # tied: HF still names its head
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # buffers off the meta device
    return hf.eval()


@functools.cache
def hf_cache_arg() -> str:
    """The keyword transformers takes a Cache by: ``cache`` in recent releases."""
    import transformers

    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def hf_greedy(
    hf, ids: torch.Tensor, new_tokens: int, *, exact: bool = False
) -> Callable[[], torch.Tensor]:
    """A call of HF ``generate``: up to ``new_tokens`` greedy tokens after ``ids`` (``exact``:
    never fewer, as a timed run must)."""
    mask = torch.ones_like(ids)
    at_least = {"min_new_tokens": new_tokens} if exact else {}

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return hf.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0, **at_least,
            )  # fmt: skip

    return call


def have_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


_LLAMA_CPP_SCRIPT = r"""
import json, statistics, sys, time
import llama_cpp
path, prompt, new_tokens, rounds, threads = json.loads(sys.argv[1])
llm = llama_cpp.Llama(path, n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                      n_threads_batch=threads, n_batch=512, verbose=False)
times = []
for _ in range(rounds + 1):  # the first is a warm-up
    llm.reset()
    t0 = time.perf_counter()
    for i, _tok in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        if i + 1 == new_tokens:
            break
    times.append(time.perf_counter() - t0)
print(json.dumps({"version": llama_cpp.__version__, "seconds": statistics.median(times[1:])}))
"""


def llama_cpp_tokens_per_s(
    path: Path, prompt: list[int], new_tokens: int, *, rounds: int, threads: int
) -> dict | None:
    """llama.cpp (llama-cpp-python) greedy decoding on the same GGUF and prompt, timed as the
    sweep times ours (prompt evaluation included). None when llama_cpp is not installed."""
    if not have_llama_cpp():
        return None
    args = json.dumps([str(path), prompt, new_tokens, rounds, threads])
    proc = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_SCRIPT, args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"llama.cpp exited with {proc.returncode}: {tail}"}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "version": out["version"],
        "tokens_per_s": new_tokens / out["seconds"],
        "weight_bytes": path.stat().st_size,
    }


# One whole generation, as a user's script would run it: import, load, generate, exit. The
# parent times the process from start to exit; the child reports its parts.
LLAMA_CPP_PROCESS = r"""
import json, sys, time
t0 = time.perf_counter()
import llama_cpp
t1 = time.perf_counter()
path, prompt, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
t2 = time.perf_counter()
ids, first = [], None
for tok in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, top_k=1, reset=True):
    first = first or time.perf_counter()
    ids.append(tok)
    if len(ids) == new_tokens or tok == llm.token_eos():
        break
t3 = time.perf_counter()
print(json.dumps({
    "import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": first - t2,
    "decode_tokens_per_s": (len(ids) - 1) / (t3 - first), "new_tokens": len(ids),
    "text": llm.detokenize(ids).decode(errors="replace"), "version": llama_cpp.__version__,
}))
"""


def llama_cpp_process(path: Path, prompt: str, new_tokens: int, threads: int) -> list[str]:
    """The command line of one llama.cpp generation as a process of its own."""
    return [
        sys.executable,
        "-c",
        LLAMA_CPP_PROCESS,
        str(path),
        prompt,
        str(new_tokens),
        str(threads),
    ]


def run_json(cmd: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Run ``cmd``; its last stdout line as JSON, or {"error": ...} naming the failure."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exited with {proc.returncode}: {tail}"}
    for text in (proc.stdout, *proc.stdout.strip().splitlines()[-1:]):  # all, or its last line
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return {"error": f"printed no JSON: {proc.stdout[-200:]!r}"}
