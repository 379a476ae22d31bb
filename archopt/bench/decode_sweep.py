"""Decoding as a Pareto study: tokens/s, memory and perplexity for every (weights, cache) pair,
next to HF ``generate`` and llama.cpp on the same weights; and long runs of bounded caches.
"""

from __future__ import annotations

import copy
import importlib.util
import time
import warnings
from pathlib import Path

import torch

from archopt.bench.anchors import hf_greedy, hf_twin, llama_cpp_tokens_per_s
from archopt.bench.decode import load_model, weight_bytes
from archopt.generate import generate
from archopt.measure import measure_latency
from archopt.models.llama import Llama
from archopt.report import log, markdown_table


def gguf_path(model_name: str) -> Path | None:
    """The GGUF file ``model_name`` resolves to, or None (not a GGUF, or not found)."""
    from archopt.loading.llm import resolve_llm

    try:
        path = resolve_llm(model_name)
    except (ValueError, FileNotFoundError):
        return None
    return path if path.suffix == ".gguf" else None


def in_weight_format(kind: str, base_model: Llama, model_name: str) -> Llama:
    """``base_model`` (fp32) in the weight format ``kind``."""
    from archopt.choices import WEIGHT_FORMATS
    from archopt.loading.llm import convert_weights

    if WEIGHT_FORMATS[kind].keep_gguf_blocks:
        if gguf_path(model_name) is None:
            raise ValueError(f"--weights gguf needs a .gguf model, got {model_name!r}")
        model = load_model(model_name, "gguf")
        model.tokenizer = base_model.tokenizer
        return model
    return convert_weights(copy.deepcopy(base_model), kind)


def _seconds(fn, rounds: int) -> float:
    """Median seconds of ``rounds`` calls of ``fn`` after one untimed call (and compile)."""
    return measure_latency(fn, warmup=1, repeats=rounds).median_ms / 1e3


def sweep(
    model_name: str = "smollm2-135m",
    *,
    caches: list[str],
    weights: list[str],
    new_tokens: int = 64,
    context: int = 512,
    ppl_tokens: int = 512,
    rounds: int = 2,
    threads: int = 2,
    plot_path: str | None = None,
    compile: bool | str = False,
    hf: bool = True,
) -> list[dict]:
    """tokens/s, bytes and perplexity for every (weights, cache) pair: a Pareto study.

    Speed is measured decoding ``new_tokens`` after a ``context``-token prompt (so caches hold
    something); memory is weights plus the cache's bytes at that point; perplexity is on the
    fixed reference text, fed through the cache.
    """
    from archopt.choices import WEIGHT_FORMATS
    from archopt.pareto import pareto_front, plot_front
    from archopt.perplexity import perplexity, reference_text

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    unknown = sorted(set(weights) - set(WEIGHT_FORMATS))
    if unknown:
        raise ValueError(f"--weights must be among {sorted(WEIGHT_FORMATS)}, got {unknown}")
    base_model = load_model(model_name)
    tok = base_model.tokenizer
    text = torch.tensor(tok.encode(reference_text())) if tok else None
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, base_model.config.vocab_size, (1, context), generator=gen)
    rows = []
    for w in weights:
        model = in_weight_format(w, base_model, model_name)
        for spec in caches:
            # fixed shapes: one graph for every step
            compiled = (compile or False) if spec == "static" else False
            how = {False: "", True: " compiled", "inductor": " compiled"}.get(
                compiled, f" compiled ({compiled})"
            )
            # The warm-up (and compile) has the timed runs' lengths: a static cache's
            # capacity is part of the compiled graph's shapes.
            seconds = _seconds(
                lambda m=model, s=spec, c=compiled: generate(
                    m, prompt, new_tokens, cache=s, compile=c or "off", stop=None
                ),
                rounds,
            )
            kv = model.make_cache(spec, reserve=context + new_tokens)
            if kv is not None:
                model(prompt, cache=kv, last_only=True)
            ppl = perplexity(model, text[:ppl_tokens], cache=spec) if text is not None else None
            row = {
                "name": f"{w} {spec}{how}",
                "weights": w,
                "cache": spec + how,
                "tokens_per_s": new_tokens / seconds,
                "weight_bytes": weight_bytes(model),
                "cache_bytes": kv.nbytes if kv is not None else 0,
                "perplexity": ppl,
            }
            row["memory_mib"] = (row["weight_bytes"] + row["cache_bytes"]) / 2**20
            log(f"  {row['name']}: {row['tokens_per_s']:.1f} tokens/s")
            rows.append(row)
    base_model.to(torch.float32)
    _mark_front(rows, pareto_front)
    if hf and importlib.util.find_spec("transformers"):  # the fp32 anchor, same weights
        rows.append(_hf_row(base_model, prompt, new_tokens, rounds))
    cpp = _llama_cpp_row(model_name, base_model, prompt, new_tokens, context, rounds, threads)
    if cpp is not None:
        rows.append(cpp)
    if plot_path:
        labelled = [
            {
                **r,
                "label": f"{r['name']} (ppl {r['perplexity']:.2f})"
                if r["perplexity"]
                else r["name"],
            }
            for r in rows
            if not r.get("anchor")
        ]
        plot_front(
            labelled, "memory_mib", "tokens_per_s", plot_path, label="label",
            title=f"{model_name}: decode speed vs memory (weights + cache at {context} tokens)",
            xlabel="memory (MiB)", ylabel="tokens/s",
        )  # fmt: skip
    return rows


def _mark_front(rows: list[dict], pareto_front) -> None:
    """Perplexity against fp32's, and ``on_front`` for every row."""
    fp32 = sorted((r["cache"] != "dense", r["perplexity"]) for r in rows if r["weights"] == "fp32")
    base = fp32[0][1] if fp32 else None  # fp32 with the dense cache, else with another
    for r in rows:
        r["perplexity_delta"] = r["perplexity"] / base - 1 if base and r["perplexity"] else None
    # Quality is an objective too: a window that is fast and small but loses the text is not
    # "better". The plot shows two axes and labels each point with its perplexity.
    objectives = {"memory_mib": "min", "tokens_per_s": "max"}
    if all(r["perplexity"] is not None for r in rows):
        objectives["perplexity"] = "min"
    front = set(pareto_front(rows, objectives))
    for i, r in enumerate(rows):
        r["on_front"] = i in front


def _hf_row(base_model: Llama, prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    twin = hf_twin(base_model)
    tps = new_tokens / _seconds(hf_greedy(twin, prompt, new_tokens, exact=True), rounds)
    log(f"  HF generate fp32: {tps:.1f} tokens/s")
    fp32_bytes = weight_bytes(base_model)
    return {
        "name": "HF generate fp32", "weights": "HF generate, fp32", "cache": "its dynamic",
        "tokens_per_s": tps, "weight_bytes": fp32_bytes, "cache_bytes": 0,
        "memory_mib": fp32_bytes / 2**20, "perplexity": None,
        "perplexity_delta": None, "on_front": False, "anchor": True,
    }  # fmt: skip


def _llama_cpp_row(model_name, base_model, prompt, new_tokens, context, rounds, threads):
    """The anchor on the same file and prompt: a row of the table, not of the front. None
    without a GGUF or llama_cpp, or when it failed (the error is logged)."""
    path = gguf_path(model_name)
    cpp = path and llama_cpp_tokens_per_s(
        path, prompt[0].tolist(), new_tokens, rounds=rounds, threads=threads
    )
    if not cpp:
        return None
    if "error" in cpp:
        log(f"  {cpp['error']}")
        return None
    cfg = base_model.config
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (context + new_tokens)
    log(f"  llama.cpp: {cpp['tokens_per_s']:.1f} tokens/s")
    return {
        "name": f"llama.cpp {cpp['version']} (llama-cpp-python)",
        "weights": "llama.cpp, the GGUF file", "cache": "its own (fp16)",
        "tokens_per_s": cpp["tokens_per_s"], "weight_bytes": cpp["weight_bytes"],
        "cache_bytes": kv, "memory_mib": (cpp["weight_bytes"] + kv) / 2**20,
        "perplexity": None, "perplexity_delta": None, "on_front": False, "anchor": True,
        "llama_cpp": True,
    }  # fmt: skip


def format_sweep(rows: list[dict]) -> str:
    anchor = next((r["tokens_per_s"] for r in rows if r.get("llama_cpp")), None)
    head = [
        "weights", "cache", "tokens/s", "vs llama.cpp", "weights MiB", "cache MiB", "perplexity",
        "vs fp32", "on front (memory, tokens/s, perplexity)",
    ]  # fmt: skip
    cells = []
    for r in rows:
        cells.append([
            r["weights"], r["cache"], f"{r['tokens_per_s']:.1f}",
            f"{r['tokens_per_s'] / anchor:.2f}x" if anchor else "-",
            f"{r['weight_bytes'] / 2**20:.0f}", f"{r['cache_bytes'] / 2**20:.2f}",
            f"{r['perplexity']:.3f}" if r["perplexity"] else "-",
            f"{r['perplexity_delta']:+.2%}" if r["perplexity_delta"] is not None else "-",
            "yes" if r["on_front"] else "",
        ])  # fmt: skip
    return markdown_table(head, cells)


def long_run(
    model_name: str = "smollm2-135m",
    *,
    caches: list[str],
    tokens: int = 8192,
    bucket: int = 1024,
    threads: int = 2,
) -> dict[str, list[float]]:
    """Median ms per token in each ``bucket`` of a ``tokens``-long greedy generation.

    Bounded caches should stay flat however long the run; a dense cache grows with the
    position (and stops at the model's context).
    """
    import statistics

    from archopt.generate import stream

    torch.set_num_threads(threads)
    model = load_model(model_name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator())
    out: dict[str, list[float]] = {}
    for spec in caches:
        # The time between tokens of one stream: no call to time on its own.
        times, t0 = [], time.perf_counter()
        for _ in stream(model, prompt, tokens, cache=spec, stop=None):
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
        out[spec] = [
            statistics.median(times[i : i + bucket]) * 1e3 for i in range(0, len(times), bucket)
        ]
        log(f"  {spec}: " + " ".join(f"{t:.1f}" for t in out[spec]))
    return out


def format_long_run(buckets: dict[str, list[float]], size: int) -> str:
    """ms per token per bucket of ``size`` tokens, one row per cache."""
    width = max(map(len, buckets.values()))
    head = ["cache", *(f"{i * size}-" for i in range(width))]
    rows = ([spec, *(f"{t:.1f}" for t in row)] for spec, row in buckets.items())
    return markdown_table(head, rows)
