"""Decoding speed: the lecture's no-cache loop vs KV caches vs Hugging Face ``generate``.

Reports, in one run on the same weights: tokens/s for a greedy continuation, time per token as
the position grows (quadratic work without a cache, linear with one), the peak memory of a
run, the cache's bytes, and next to every figure the roofline: measured memory bandwidth over
the bytes one decode step must read (weights + the K/V cache at that position).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import inspect
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from archopt.bench.anchors import llama_cpp_tokens_per_s
from archopt.bench.common import machine_line
from archopt.generate import COMPILE_MODES, generate
from archopt.measure import measure_peak_memory
from archopt.models.llama import Llama

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


def hf_twin(model: Llama):
    """A transformers ``LlamaForCausalLM`` holding exactly ``model``'s weights."""
    import transformers

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
    from archopt.loading.llama import llama_state_dict_to_hf

    sd = llama_state_dict_to_hf(model.state_dict(), cfg)
    sd.setdefault("lm_head.weight", model.embed.weight)  # tied: HF still names its head
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True, strict=False)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # buffers off the meta device
    return hf.eval()


@functools.cache
def _hf_cache_arg() -> str:
    """The keyword transformers takes a Cache by: ``cache`` in recent releases."""
    import transformers

    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def memory_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a matrix-vector product over ``nbytes`` of fp32: how decode reads weights."""
    cols = 1024
    w = torch.randn(max(nbytes // (4 * cols), 1), cols)
    x = torch.randn(cols)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mv(w, x)
        best = min(best, time.perf_counter() - t0)
    return w.numel() * 4 / best


def weight_bytes(model: Llama) -> int:
    """Bytes of the checkpoint tensors (parameters and int8 weight buffers; no RoPE tables)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def kv_bytes_per_token(model: Llama) -> int:
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.embed.weight.element_size()


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def step_times(model: Llama, hf, positions: list[int], steps: int) -> list[dict]:
    """Seconds for the decode step at each position: no cache, dense, static, HF's cache."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for pos in positions:
        ids = torch.randint(0, model.config.vocab_size, (1, pos + steps), generator=gen)
        row = {"position": pos}
        # No cache: the step at position `pos` is a forward over all pos + 1 tokens.
        row["none"] = _median_time(
            lambda ids=ids, pos=pos: model(ids[:, : pos + 1], last_only=True), 3
        )
        for kind in ("dense", "static"):
            kv = model.make_cache(kind, reserve=pos + steps)
            model(ids[:, :pos], cache=kv, last_only=True)
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                model(ids[:, pos + i : pos + i + 1], cache=kv, last_only=True)
                times.append(time.perf_counter() - t0)
            row[kind] = statistics.median(times)
        if hf is not None:
            from transformers import DynamicCache

            past = DynamicCache(config=hf.config)
            hf(ids[:, :pos], **{_hf_cache_arg(): past}, use_cache=True, logits_to_keep=1)
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                hf(ids[:, pos + i : pos + i + 1], **{_hf_cache_arg(): past}, use_cache=True)
                times.append(time.perf_counter() - t0)
            row["hf"] = statistics.median(times)
        print(
            f"  position {pos}: "
            + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row.items() if k != "position"),
            file=sys.stderr,
            flush=True,
        )
        out.append(row)
    return out


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=120)
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

    # Greedy continuation: tokens/s per contender, rounds interleaved so drift hits all alike.
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
        mask = torch.ones_like(ids)

        def hf_generate():
            with torch.inference_mode():
                return hf.generate(
                    ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                )  # fmt: skip

        contenders["hf generate"] = hf_generate
    t0 = time.perf_counter()
    generate(model, ids, 2, cache="static", compile=True, stop=None)
    compile_s = time.perf_counter() - t0
    print(f"  compiled the decode step in {compile_s:.0f} s", file=sys.stderr, flush=True)
    outputs = {k: fn() for k, fn in contenders.items()}  # warm-up, and the tokens to compare
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(rounds):
        for k, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    mid = ids.shape[1] + n // 2
    speed = {}
    for k, ts in samples.items():
        count = none_tokens if k == "ours none" else n
        speed[k] = {
            "tokens": count,
            "tokens_per_s": count / statistics.median(ts),
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
    lines = [
        f"# {r['machine']}",
        f"# {r['model']}, fp32 weights {r['weight_bytes'] / 2**20:.0f} MiB, K/V "
        f"{r['kv_bytes_per_token'] / 1024:.0f} KiB per token, measured bandwidth "
        f"{r['bandwidth_gb_s']:.1f} GB/s (matrix-vector over the weights' size)",
        "",
        "| contender | tokens | tokens/s | vs HF | roofline tokens/s | of roofline | "
        "same tokens as HF |",
        "|---|---|---|---|---|---|---|",
    ]
    hf = r["speed"].get("hf generate", {}).get("tokens_per_s")
    for k, s in r["speed"].items():
        ratio = f"{s['tokens_per_s'] / hf:.2f}x" if hf else "-"
        same = r["same_tokens_as_hf"].get(k)
        lines.append(
            f"| {k} | {s['tokens']} | {s['tokens_per_s']:.1f} | {ratio} | "
            f"{s['roofline_tokens_per_s']:.1f} | "
            f"{s['tokens_per_s'] / s['roofline_tokens_per_s']:.0%} | "
            f"{'-' if same is None else 'yes' if same else 'NO'} |"
        )
    lines += ["", "| cache | peak memory MiB (tensors) | cache MiB |", "|---|---|---|"]
    for k, m in r["memory"].items():
        lines.append(f"| {k} | {m['peak_bytes'] / 2**20:.1f} | {m['cache_bytes'] / 2**20:.2f} |")
    keys = [k for k in ("none", "dense", "static", "hf") if k in r["step_times"][0]]
    lines += [
        "",
        "| position | " + " | ".join(f"{k} ms" for k in keys) + " | roofline ms |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for row in r["step_times"]:
        lines.append(
            f"| {row['position']} | "
            + " | ".join(f"{row[k] * 1e3:.1f}" for k in keys)
            + f" | {row['roofline_s'] * 1e3:.1f} |"
        )
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="archopt bench generate", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="registered name, HF dir or .gguf")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--none-tokens", type=int, default=64, help="tokens for the no-cache loop")
    p.add_argument("--positions", type=int, nargs="+", default=[64, 256, 512, 1024, 2048])
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per position")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--plot", help="PNG of time per token vs position")
    p.add_argument("--json", help="write the figures as JSON here")
    p.add_argument(
        "--cache", nargs="+", help="sweep these cache kinds (e.g. dense int8 sliding:256)"
    )
    p.add_argument(
        "--weights",
        nargs="+",
        help="sweep these weights: fp32 bf16 int8 int4 int4-head8 gguf (the file's)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=COMPILE_MODES,
        help="sweep: compiled one-token steps for 'static' (inductor-cpp: its C++ wrapper)",
    )
    p.add_argument("--context", type=int, default=512, help="prompt length for the sweep")
    p.add_argument(
        "--long", type=int, metavar="N", help="with --cache: ms per token over an N-token run"
    )
    args = p.parse_args(argv)
    if args.long:
        caches = args.cache or ["sliding:1024", "sink:4:1020"]
        buckets = long_run(args.model, caches=caches, tokens=args.long, threads=args.threads)
        size = 1024
        print(f"# {machine_line(args.threads)}; ms per token, median over each {size} tokens")
        print(
            "| cache | "
            + " | ".join(f"{i * size}-" for i in range(max(map(len, buckets.values()))))
            + " |"
        )
        print("|---" * (1 + max(map(len, buckets.values()))) + "|")
        for spec, row in buckets.items():
            print(f"| {spec} | " + " | ".join(f"{t:.1f}" for t in row) + " |")
        return {"long": buckets}
    if args.cache or args.weights:
        rows = sweep(
            args.model,
            caches=args.cache or ["dense"],
            weights=args.weights or ["fp32"],
            new_tokens=args.new_tokens,
            context=args.context,
            rounds=args.rounds,
            threads=args.threads,
            plot_path=args.plot,
            compile=args.compile,
            hf=not args.no_hf,
        )
        print(f"# {machine_line(args.threads)}\n" + format_sweep(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
        return {"sweep": rows}
    result = run(
        args.model,
        new_tokens=args.new_tokens,
        none_tokens=args.none_tokens,
        positions=args.positions,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
        with_hf=not args.no_hf,
        plot_path=args.plot,
    )
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return result


def _gguf_path(model_name: str) -> Path | None:
    from archopt.loading.llm import resolve_llm

    try:
        path = resolve_llm(model_name)
    except (ValueError, FileNotFoundError):
        return None
    return path if path.suffix == ".gguf" else None


def _weights(kind: str, base_model: Llama, model_name: str) -> Llama:
    """``base_model`` (fp32) in the weight format ``kind``."""
    from archopt.loading.llm import WEIGHT_FORMATS, convert_weights

    if WEIGHT_FORMATS[kind].keep_gguf_blocks:
        if _gguf_path(model_name) is None:
            raise ValueError(f"--weights gguf needs a .gguf model, got {model_name!r}")
        model = load_model(model_name, "gguf")
        model.tokenizer = base_model.tokenizer
        return model
    return convert_weights(copy.deepcopy(base_model), kind)


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
    from archopt.generate import perplexity, reference_text
    from archopt.pareto import pareto_front, plot_front

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    from archopt.loading.llm import WEIGHT_FORMATS

    unknown = sorted(set(weights) - set(WEIGHT_FORMATS))
    if unknown:
        raise ValueError(f"--weights must be among {sorted(WEIGHT_FORMATS)}, got {unknown}")
    model = load_model(model_name)
    text = torch.tensor(model.tokenizer.encode(reference_text())) if model.tokenizer else None
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen)
    rows = []
    base_model = model
    for w in weights:
        model = _weights(w, base_model, model_name)
        for spec in caches:
            # fixed shapes: one graph for every step
            compiled = (compile or False) if spec == "static" else False
            how = {False: "", True: " compiled", "inductor": " compiled"}.get(
                compiled, f" compiled ({compiled})"
            )
            times = []
            # Warm-up (and compile): same lengths as the timed runs, since a static cache's
            # capacity is part of the compiled graph's shapes.
            generate(model, prompt, new_tokens, cache=spec, compile=compiled or "off", stop=None)
            for _ in range(rounds):
                t0 = time.perf_counter()
                generate(
                    model, prompt, new_tokens, cache=spec, compile=compiled or "off", stop=None
                )
                times.append(time.perf_counter() - t0)
            kv = model.make_cache(spec, reserve=context + new_tokens)
            if kv is not None:
                model(prompt, cache=kv, last_only=True)
            ppl = perplexity(model, text[:ppl_tokens], cache=spec) if text is not None else None
            row = {
                "name": f"{w} {spec}{how}",
                "weights": w,
                "cache": spec + how,
                "tokens_per_s": new_tokens / statistics.median(times),
                "weight_bytes": weight_bytes(model),
                "cache_bytes": kv.nbytes if kv is not None else 0,
                "perplexity": ppl,
            }
            row["memory_mib"] = (row["weight_bytes"] + row["cache_bytes"]) / 2**20
            print(f"  {row['name']}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
            rows.append(row)
    base_model.to(torch.float32)
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
    if hf and importlib.util.find_spec("transformers"):  # the fp32 anchor, same weights
        twin = hf_twin(base_model)
        mask = torch.ones_like(prompt)
        times = []
        for _ in range(rounds + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            with torch.inference_mode():
                twin.generate(
                    prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                    min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                )  # fmt: skip
            times.append(time.perf_counter() - t0)
        tps = new_tokens / statistics.median(times[1:])
        print(f"  HF generate fp32: {tps:.1f} tokens/s", file=sys.stderr)
        fp32_bytes = weight_bytes(base_model)
        rows.append({
            "name": "HF generate fp32", "weights": "HF generate, fp32", "cache": "its dynamic",
            "tokens_per_s": tps, "weight_bytes": fp32_bytes, "cache_bytes": 0,
            "memory_mib": fp32_bytes / 2**20, "perplexity": None,
            "perplexity_delta": None, "on_front": False, "anchor": True,
        })  # fmt: skip
        del twin
    path = _gguf_path(model_name)
    cpp = path and llama_cpp_tokens_per_s(
        path, prompt[0].tolist(), new_tokens, rounds=rounds, threads=threads
    )
    if cpp and "error" in cpp:
        print(f"  {cpp['error']}", file=sys.stderr)
    elif cpp:  # the anchor, on the same file and prompt: a row of the table, not of the front
        cfg = base_model.config
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (context + new_tokens)
        print(f"  llama.cpp: {cpp['tokens_per_s']:.1f} tokens/s", file=sys.stderr)
        rows.append({
            "name": f"llama.cpp {cpp['version']} (llama-cpp-python)",
            "weights": "llama.cpp, the GGUF file", "cache": "its own (fp16)",
            "tokens_per_s": cpp["tokens_per_s"], "weight_bytes": cpp["weight_bytes"],
            "cache_bytes": kv, "memory_mib": (cpp["weight_bytes"] + kv) / 2**20,
            "perplexity": None, "perplexity_delta": None, "on_front": False, "anchor": True,
            "llama_cpp": True,
        })  # fmt: skip
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


def format_sweep(rows: list[dict]) -> str:
    anchor = next((r["tokens_per_s"] for r in rows if r.get("llama_cpp")), None)
    lines = [
        "| weights | cache | tokens/s | vs llama.cpp | weights MiB | cache MiB | perplexity | "
        "vs fp32 | on front (memory, tokens/s, perplexity) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['perplexity']:.3f}" if r["perplexity"] else "-"
        delta = f"{r['perplexity_delta']:+.2%}" if r["perplexity_delta"] is not None else "-"
        ratio = f"{r['tokens_per_s'] / anchor:.2f}x" if anchor else "-"
        lines.append(
            f"| {r['weights']} | {r['cache']} | {r['tokens_per_s']:.1f} | {ratio} | "
            f"{r['weight_bytes'] / 2**20:.0f} | {r['cache_bytes'] / 2**20:.2f} | {ppl} | "
            f"{delta} | {'yes' if r['on_front'] else ''} |"
        )
    return "\n".join(lines)


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
    from archopt.generate import stream

    torch.set_num_threads(threads)
    model = load_model(model_name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator())
    out: dict[str, list[float]] = {}
    for spec in caches:
        times, t0 = [], time.perf_counter()
        for _ in stream(model, prompt, tokens, cache=spec, stop=None):
            now = time.perf_counter()
            times.append(now - t0)
            t0 = now
        out[spec] = [
            statistics.median(times[i : i + bucket]) * 1e3 for i in range(0, len(times), bucket)
        ]
        print(f"  {spec}: " + " ".join(f"{t:.1f}" for t in out[spec]), file=sys.stderr)
    return out
