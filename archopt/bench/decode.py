"""Decoding speed: the lecture's no-cache loop vs KV caches vs Hugging Face ``generate``.

Reports, in one run on the same weights: tokens/s for a greedy continuation, time per token as
the position grows (quadratic work without a cache, linear with one), the peak memory of a
run, the cache's bytes, and next to every figure the roofline: measured memory bandwidth over
the bytes one decode step must read (weights + the K/V cache at that position).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from archopt.bench.anchors import hf_cache_arg, hf_greedy, hf_twin
from archopt.bench.common import machine_line, memory_bandwidth
from archopt.generate import generate
from archopt.measure import interleaved, measure_latency, measure_peak_memory
from archopt.models.llama import Llama
from archopt.report import log, markdown_table, pyplot, save_figure

PROMPT = "Lionel Messi is a"


def load_model(name: str, weights: str = "fp32") -> Llama:
    """A language model through ``load_llm``, or a random-weight registry preset (tests, quick
    runs) in the same weight format."""
    from archopt.loading.llm import convert_weights, load_llm
    from archopt.registry import create_model, model_info

    try:
        info = model_info(name)
    except ValueError:
        info = None
    if info is not None and info.pretrained is None and not Path(name).exists():
        torch.manual_seed(0)
        return convert_weights(create_model(name).eval(), weights)
    return load_llm(name, weights=weights)


def weight_bytes(model: Llama) -> int:
    """Bytes of the checkpoint tensors (parameters and int8 weight buffers; no RoPE tables)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def kv_bytes_per_token(model: Llama) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.embed.weight.element_size()


def _step_seconds(step: Callable[[int], object], first: int, steps: int) -> float:
    """Median seconds of ``step(first)``, ``step(first + 1)``, ...: one decode step each."""
    positions = iter(range(first, first + steps))
    return measure_latency(lambda: step(next(positions)), warmup=0, repeats=steps).median_ms / 1e3


@torch.inference_mode()
def step_times(model: Llama, hf, positions: list[int], steps: int) -> list[dict]:
    """Seconds for the decode step at each position: no cache, dense, static, HF's cache."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for pos in positions:
        ids = torch.randint(0, model.config.vocab_size, (1, pos + steps), generator=gen)
        row = {"position": pos}
        # No cache: the step at position `pos` is a forward over all pos + 1 tokens.
        row["none"] = (
            measure_latency(
                lambda ids=ids, pos=pos: model(ids[:, : pos + 1], last_only=True),
                warmup=0,
                repeats=3,
            ).median_ms
            / 1e3
        )
        for kind in ("dense", "static"):
            kv = model.make_cache(kind, reserve=pos + steps)
            model(ids[:, :pos], cache=kv, last_only=True)
            row[kind] = _step_seconds(
                lambda i, ids=ids, kv=kv: model(ids[:, i : i + 1], cache=kv, last_only=True),
                pos,
                steps,
            )
        if hf is not None:
            from transformers import DynamicCache

            past = {hf_cache_arg(): DynamicCache(config=hf.config)}
            hf(ids[:, :pos], **past, use_cache=True, logits_to_keep=1)
            row["hf"] = _step_seconds(
                lambda i, ids=ids, past=past: hf(ids[:, i : i + 1], **past, use_cache=True),
                pos,
                steps,
            )
        log(
            f"  position {pos}: "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items() if k != "position")
        )
        out.append(row)
    return out


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pos = [r["position"] for r in rows]
    styles = {"none": "o-", "dense": "s-", "static": "^-", "hf": "x--"}
    labels = {
        "none": "no cache (the lecture's loop)",
        "dense": "ours, dense cache",
        "static": "ours, static cache",
        "hf": "HF, its cache",
    }
    for key, style in styles.items():
        if key in rows[0]:
            ax.plot(pos, [r[key] * 1e3 for r in rows], style, label=labels[key])
    ax.set_xlabel("position of the generated token")
    ax.set_ylabel("time per token (ms)")
    ax.set_title(title, fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def run(
    model_name: str = "smollm2-135m",
    *,
    new_tokens: int = 128,
    none_tokens: int = 64,
    positions: list[int] | None = None,
    steps: int = 8,
    rounds: int = 3,
    threads: int = 2,
    with_hf: bool = True,
    plot_path: str | None = None,
) -> dict:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    model = load_model(model_name)
    hf = hf_twin(model) if with_hf else None
    tok = model.tokenizer
    if tok is not None:
        ids = torch.tensor([tok.encode(PROMPT)])
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator())
    positions = positions or [64, 256, 512, 1024, 2048]
    positions = [p for p in positions if p + steps <= model.config.max_position_embeddings]
    wbytes, per_tok = weight_bytes(model), kv_bytes_per_token(model)
    bandwidth = memory_bandwidth(wbytes)

    def roofline(position: int) -> float:  # tokens/s if reading the bytes were all it cost
        return bandwidth / (wbytes + per_tok * position)

    n = new_tokens
    contenders = {
        "ours dense": lambda: generate(model, ids, n, cache="dense", compile="off", stop=None),
        "ours static": lambda: generate(model, ids, n, cache="static", compile="off", stop=None),
        # One-token steps through the step compiled ahead of time (archopt.decode_step).
        "ours static compiled": lambda: generate(
            model, ids, n, cache="static", compile=True, stop=None
        ),
        "ours none": lambda: generate(model, ids, none_tokens, cache="none", stop=None),
    }
    if hf is not None:
        contenders["hf generate"] = hf_greedy(hf, ids, n)
    t0 = time.perf_counter()
    generate(model, ids, 2, cache="static", compile=True, stop=None)
    compile_s = time.perf_counter() - t0
    log(f"  compiled the decode step in {compile_s:.0f} s")
    outputs = {k: fn() for k, fn in contenders.items()}  # warm-up, and the tokens to compare
    # Greedy continuation: tokens/s per contender, rounds interleaved so drift hits all alike.
    stats = interleaved(contenders, rounds=rounds, per_round=1, warmup=0)
    mid = ids.shape[1] + n // 2
    speed = {}
    for k, s in stats.items():
        count = none_tokens if k == "ours none" else n
        speed[k] = {
            "tokens": count,
            "tokens_per_s": count / (s["median_ms"] / 1e3),
            "roofline_tokens_per_s": roofline(ids.shape[1] + count // 2),
        }
    hf_out = outputs.get("hf generate")
    same = {
        k: None if hf_out is None else torch.equal(v, hf_out[:, : v.shape[1]])
        for k, v in outputs.items()
        if k != "hf generate"
    }
    memory = {}
    for kind in ("none", "dense", "static"):
        count = none_tokens if kind == "none" else n
        peak = measure_peak_memory(
            lambda kind=kind, c=count: generate(model, ids, c, cache=kind, compile="off", stop=None)
        )
        kv = model.make_cache(kind, reserve=ids.shape[1] + count)
        memory[kind] = {"peak_bytes": peak.bytes, "cache_bytes": kv.nbytes if kv else 0}
    rows = step_times(model, hf, positions, steps)
    result = {
        "machine": machine_line(threads),
        "model": model_name,
        "prompt_tokens": ids.shape[1],
        "weight_bytes": wbytes,
        "kv_bytes_per_token": per_tok,
        "bandwidth_gb_s": bandwidth / 1e9,
        "compile_s": compile_s,
        "speed": speed,
        "same_tokens_as_hf": same,
        "memory": memory,
        "step_times": [{**r, "roofline_s": 1 / roofline(r["position"])} for r in rows],
        "text": tok.decode(outputs["ours dense"][0]) if tok is not None else None,
        "mid_position": mid,
    }
    if plot_path:
        plot(rows, plot_path, f"{model_name}, fp32\n{machine_line(threads)}")
    return result


def format_report(r: dict) -> str:
    hf = r["speed"].get("hf generate", {}).get("tokens_per_s")
    speed = []
    for k, s in r["speed"].items():
        same = r["same_tokens_as_hf"].get(k)
        speed.append([
            k, s["tokens"], f"{s['tokens_per_s']:.1f}",
            f"{s['tokens_per_s'] / hf:.2f}x" if hf else "-",
            f"{s['roofline_tokens_per_s']:.1f}",
            f"{s['tokens_per_s'] / s['roofline_tokens_per_s']:.0%}",
            "-" if same is None else "yes" if same else "NO",
        ])  # fmt: skip
    memory = [
        [k, f"{m['peak_bytes'] / 2**20:.1f}", f"{m['cache_bytes'] / 2**20:.2f}"]
        for k, m in r["memory"].items()
    ]
    keys = [k for k in ("none", "dense", "static", "hf") if k in r["step_times"][0]]
    per_position = [
        [row["position"], *(f"{row[k] * 1e3:.1f}" for k in keys), f"{row['roofline_s'] * 1e3:.1f}"]
        for row in r["step_times"]
    ]
    speed_head = [
        "contender", "tokens", "tokens/s", "vs HF", "roofline tokens/s", "of roofline",
        "same tokens as HF",
    ]  # fmt: skip
    lines = [
        f"# {r['machine']}",
        f"# {r['model']}, fp32 weights {r['weight_bytes'] / 2**20:.0f} MiB, K/V "
        f"{r['kv_bytes_per_token'] / 1024:.0f} KiB per token, measured bandwidth "
        f"{r['bandwidth_gb_s']:.1f} GB/s (matrix-vector over the weights' size)",
        "",
        markdown_table(speed_head, speed),
        "",
        markdown_table(["cache", "peak memory MiB (tensors)", "cache MiB"], memory),
        "",
        markdown_table(["position", *(f"{k} ms" for k in keys), "roofline ms"], per_position),
    ]
    st = r["step_times"]
    if len(st) > 1:
        lines.append(
            f"\ndense cache: time per token at position {st[-1]['position']} is "
            f"{st[-1]['dense'] / st[0]['dense']:.2f}x that at {st[0]['position']}; "
            f"no cache: {st[-1]['none'] / st[0]['none']:.1f}x"
        )
    if r.get("text"):
        lines.append(f"\nours, dense cache, greedy: {r['text']!r}")
    lines.append(f"\ncompiling the decode step took {r['compile_s']:.0f} s (once per process)")
    return "\n".join(lines)
