"""Serving throughput and latency: ``archopt serve`` against llama.cpp's servers, side by side.

One run, on the same GGUF file and thread count: 1, 4 and 8 concurrent streams of
``--new-tokens`` tokens each (greedy, end-of-sequence ignored), through each server's
OpenAI-compatible ``/v1/completions`` with streaming; for each, aggregate tokens/s and the
p50/p99 time to first token (TTFT) and inter-token latency (ITL), measured at the client.
``archopt serve`` runs as a user gets it (its decode batches through the compiled paged step,
built here into the cache folder first if it is not there) and, by default, also with
``--compile off`` (eager). Anchors in the same run: archopt's single-stream ``generate``
(eager dense cache, and the compiled static-cache step: by default the ahead-of-time step
that plain ``generate`` uses), llama-cpp-python's
``llama_cpp.server`` and, when given ``--llama-server PATH``, llama.cpp's own ``llama-server``
started with ``-np`` equal to the stream count. Then prefix reuse: 8 chat requests sharing a
512-token system prompt, the time to first token of the later ones against the cold first one.
Every server is a subprocess bound to 127.0.0.1; every request loop is bounded.

A shared host's speed drifts by 15-20% within minutes, so besides the ratios to the best single
stream of the whole run, ``generate``'s fastest single stream is timed again just before each
run of the default ``archopt serve`` (in this process, the server idle meanwhile), and each
stream count is also compared with that one.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from archopt.bench.common import machine_line
from archopt.bench.serve_load import (
    PROMPTS,
    Server,
    completion_bodies,
    free_port,
    prefix_reuse,
    run_streams,
)
from archopt.choices import WEIGHT_CHOICES
from archopt.io import atomic_write_text, check_writable
from archopt.report import ArgumentParser, int_in, save_figure


def single_stream_generate(model, prompt_ids, new_tokens: int, compile: str | None) -> dict:
    """archopt's own single-stream ``generate`` (in this process): tokens/s after warm-up."""
    from archopt.generate import generate

    kwargs = {"cache": "static", "compile": compile} if compile else {"cache": "dense"}
    t0 = time.perf_counter()
    generate(model, [prompt_ids], 8, stop=None, **kwargs)  # warm-up (and compile)
    first = time.perf_counter() - t0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        generate(model, [prompt_ids], new_tokens, stop=None, **kwargs)
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": new_tokens / min(times), "warmup_s": first}


@torch.inference_mode()
def paged_vs_dense_step(model, contexts=(128, 512), steps: int = 24, compiled=None) -> list[dict]:
    """Decode-step time at batch 1, paged cache against dense, interleaved step by step: the
    eager model on both, and with ``compiled`` = (static step, paged step) the two compiled
    steps (what ``generate`` and the serving engine run)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for ctx in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, ctx + steps), generator=gen)
        kinds = {"dense": "dense", "paged": "paged"}
        if compiled is not None:
            kinds |= {"static (compiled)": "static", "paged (compiled)": "paged"}
        caches = {k: model.make_cache(kind, reserve=ctx + steps) for k, kind in kinds.items()}
        for kv in caches.values():
            model(ids[:, :ctx], cache=kv, last_only=True)
        run = {k: (lambda t, p, kv: model(t, positions=p, cache=kv, last_only=True)) for k in kinds}
        if compiled is not None:
            run["static (compiled)"], run["paged (compiled)"] = compiled
        times = {k: [] for k in caches}
        for i in range(steps):
            tok, pos = ids[:, ctx + i : ctx + i + 1], torch.tensor([[ctx + i]])
            for k, kv in caches.items() if i % 2 else reversed(caches.items()):
                t0 = time.perf_counter()
                run[k](tok, pos, kv)
                times[k].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = {"context": ctx, "dense_ms": ms["dense"], "paged_ms": ms["paged"]}
        row["ratio"] = row["paged_ms"] / row["dense_ms"]
        if compiled is not None:
            row |= {"static_compiled_ms": ms["static (compiled)"],
                    "paged_compiled_ms": ms["paged (compiled)"]}  # fmt: skip
            row["compiled_ratio"] = row["paged_compiled_ms"] / row["static_compiled_ms"]
        rows.append(row)
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, runs in report["servers"].items():
        xs = [r["streams"] for r in runs]
        a.plot(xs, [r["tokens_per_s"] for r in runs], "o-", label=name)
        b.plot(xs, [r["ttft_p50_ms"] for r in runs], "o-", label=name)
    for name, v in report["single_stream"].items():
        a.axhline(v["tokens_per_s"], ls="--", lw=1, color="gray")
        a.annotate(name, (1, v["tokens_per_s"]), fontsize=7, color="gray")
    a.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", title="throughput")
    b.set(xlabel="concurrent streams", ylabel="p50 time to first token (ms)", title="TTFT")
    b.set_yscale("log")
    a.legend(fontsize=8)
    fig.suptitle(report["machine"], fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def format_report(report: dict) -> str:
    lines = [f"machine: {report['machine']}", "",
             "| server | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms"
             " |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in report["servers"].items():
        for r in runs:
            lines.append(
                f"| {name} | {r['streams']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |"
            )
    lines.append("")
    for name, v in report["single_stream"].items():
        lines.append(f"single stream, {name}: {v['tokens_per_s']:.1f} tokens/s")
    for k, v in report.get("ratios", {}).items():
        lines.append(f"{k}: {v:.2f}x")
    for r in report["servers"].get("archopt serve", []):
        if "generate_just_before" in r:
            lines.append(
                f"archopt serve, {r['streams']} streams / generate timed just before "
                f"({r['generate_just_before']:.1f} tokens/s): "
                f"{r['tokens_per_s'] / r['generate_just_before']:.2f}x"
            )
    for name, why in report.get("failed", {}).items():
        lines.append(f"{name}: FAILED, no figures ({why})")
    for name, p in report.get("prefix", {}).items():
        lines.append(
            f"prefix reuse ({name}): cold TTFT {p['cold_ttft_ms']:.0f} ms, cached "
            f"{p['cached_ttft_ms']:.0f} ms ({100 * p['ratio']:.1f}% of cold)"
        )
    for r in report.get("paged_step", []):
        lines.append(
            f"decode step at batch 1, context {r['context']}: dense {r['dense_ms']:.2f} ms, "
            f"paged {r['paged_ms']:.2f} ms ({r['ratio']:.3f}x)"
            + (
                f"; compiled: static {r['static_compiled_ms']:.2f} ms, paged "
                f"{r['paged_compiled_ms']:.2f} ms ({r['compiled_ratio']:.3f}x)"
                if "compiled_ratio" in r
                else ""
            )
        )
    if "greedy_same" in report:
        lines.append(f"greedy text of stream 0, same at 1/4/8 streams: {report['greedy_same']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="archopt bench serve", description=__doc__)
    ap.add_argument("--model", default="smollm2-135m", help="a name with a GGUF, or a .gguf")
    ap.add_argument("--threads", type=int_in(1, 1024), default=2)
    ap.add_argument("--streams", type=int_in(1, 4096), nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int_in(1, 1 << 20), default=128)
    ap.add_argument("--prefix-tokens", type=int_in(0, 1 << 20), default=512)
    ap.add_argument(
        "--compile",
        choices=["aot", "inductor", "inductor-cpp", "off"],
        default="aot",
        help="generate's compiled step to time beside the eager one (aot, the default: the "
        "step plain generate uses, kept in the cache folder); unless off, the compiled paged "
        "step archopt serve decodes with is built into the cache folder first, so the "
        "servers start with it (off: a server compiles in the background while measured)",
    )
    ap.add_argument("--serve-flags", nargs="*", default=["", "--compile off"],
                    help="archopt serve configurations to run besides the default one, each "
                    "its extra flags in one string (e.g. '--attention span')")  # fmt: skip
    ap.add_argument(
        "--weights", choices=WEIGHT_CHOICES, default="auto",
        help="archopt's weight format, for generate and every archopt serve (auto: the GGUF's "
        "blocks; gguf-act8: the same blocks times int8 activations, as llama.cpp computes)",
    )  # fmt: skip
    ap.add_argument("--llama-server", help="path of a llama.cpp llama-server binary")
    ap.add_argument("--no-llama-cpp-python", action="store_true")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--plot", help="write tokens/s and TTFT against streams here (PNG)")
    args = ap.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)  # before the minutes of work, not after

    from archopt.loading.llm import load_llm, resolve_llm

    torch.set_num_threads(args.threads)
    gguf = resolve_llm(args.model)
    if gguf.suffix != ".gguf":
        raise ValueError(
            f"bench serve compares against llama.cpp: --model must have a GGUF file, got {gguf}"
        )
    report: dict = {"machine": machine_line(args.threads), "model": str(gguf), "servers": {},
                    "single_stream": {}, "prefix": {}, "failed": {}}  # fmt: skip
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    model = load_llm(args.model, weights=args.weights)
    report["weights"] = args.weights
    ids = model.tokenizer.encode(PROMPTS[0])
    eos = model.config.eos_ids[0]
    say("single-stream generate (eager, dense cache) ...")
    report["single_stream"]["archopt generate (eager dense)"] = single_stream_generate(
        model, ids, args.new_tokens, None
    )
    if args.compile != "off":
        say(f"single-stream generate (compiled {args.compile}, static cache) ...")
        report["single_stream"][f"archopt generate ({args.compile})"] = single_stream_generate(
            model, ids, args.new_tokens, args.compile
        )
    compiled = None
    if args.compile != "off":
        from archopt.decode_step import compile_step

        say("the compiled paged step archopt serve decodes with (kept in the cache folder) ...")
        t0 = time.perf_counter()
        paged = compile_step(model, kind="paged", progress=True)
        report["paged_step_ready_s"] = time.perf_counter() - t0
        if args.compile == "aot":
            compiled = (compile_step(model), paged)
    say("decode step at batch 1, paged against dense ...")
    report["paged_step"] = paged_vs_dense_step(model, compiled=compiled)
    tok = model.tokenizer
    system = tok.decode(tok.encode(_system_text())[: args.prefix_tokens])
    fastest = None if args.compile == "off" else args.compile
    report["paired_anchor"] = f"archopt generate ({fastest or 'eager dense'})"

    def single_now() -> float:
        return single_stream_generate(model, ids, args.new_tokens, fastest)["tokens_per_s"]

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    servers: list[tuple[str, object, str]] = []
    flags = [""] + [f for f in args.serve_flags if f.strip()]  # the default always runs
    for extra in dict.fromkeys(f.strip() for f in flags):
        port = free_port()
        name = f"archopt serve {extra}".strip()
        ours = Server(
            name,
            [sys.executable, "-m", "archopt.cli", "serve", "--model", str(gguf), "--port",
             str(port), "--threads", str(args.threads), "--max-batch", str(max(args.streams)),
             "--weights", args.weights, *shlex.split(extra)],
            port, health="/health", env=env,
        )  # fmt: skip
        servers.append(
            (name, lambda n, srv=ours: srv, "ignore_eos", single_now if not extra else None)
        )
    if not args.no_llama_cpp_python:
        try:
            import llama_cpp.server  # noqa: F401

            port2 = free_port()
            lcp = Server(
                "llama-cpp-python server",
                [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                 "127.0.0.1", "--port", str(port2), "--n_threads", str(args.threads),
                 "--n_threads_batch", str(args.threads), "--n_ctx", "4096",
                 "--interrupt_requests", "False"],
                port2, health="/v1/models", env=env,
            )  # fmt: skip
            servers.append(("llama-cpp-python server", lambda n: lcp, "logit_bias", None))
        except ImportError:
            say("llama-cpp-python is not installed: its server is skipped")
    if args.llama_server:

        def llama_server(n: int) -> Server:
            p = free_port()
            return Server(
                f"llama-server -np {n}",
                [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(p),
                 "-t", str(args.threads), "-tb", str(args.threads), "-np", str(n),
                 "-c", str(n * 2048), "--no-webui"],
                p, health="/health", env=env,
            )  # fmt: skip

        servers.append(("llama-server", llama_server, "ignore_eos", None))

    for name, make, how, paired in servers:
        try:
            report["servers"][name] = serve_runs(
                args, name, make, how, eos, system, report, say, paired
            )
        except RuntimeError as e:  # an anchor that fails is a row that says so, not a lost run
            if name.startswith("archopt serve"):
                raise
            say(f"{name} failed: {e}")
            report["failed"][name] = str(e).splitlines()[0][:300]

    # Our best single stream: generate's, or our own server's at one stream if faster (the
    # machine's speed drifts, and generate is timed minutes before the servers).
    singles = [v["tokens_per_s"] for v in report["single_stream"].values()]
    singles += [r["tokens_per_s"] for name, runs in report["servers"].items()
                if name.startswith("archopt serve") for r in runs if r["streams"] == 1]  # fmt: skip
    best_single = max(singles)
    report["best_single_stream_tokens_per_s"] = best_single
    ratios = {}
    for ours_name, ours_list in report["servers"].items():
        if not ours_name.startswith("archopt serve"):
            continue
        ours_runs = {r["streams"]: r for r in ours_list}
        for n, r in ours_runs.items():
            key = f"{ours_name}, {n} streams / our best single stream"
            ratios[key] = r["tokens_per_s"] / best_single
        for name, runs in report["servers"].items():
            if name.startswith("archopt serve"):
                continue
            for r in runs:
                if r["streams"] in ours_runs:
                    key = f"{ours_name} / {name}, {r['streams']} streams"
                    ratios[key] = ours_runs[r["streams"]]["tokens_per_s"] / r["tokens_per_s"]
    report["ratios"] = ratios
    texts = [r["texts"][0] for r in report["servers"]["archopt serve"]]
    report["greedy_same"] = all(t == texts[0] for t in texts)
    report["greedy_texts"] = texts
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2, default=float))
    if args.plot:
        plot(report, Path(args.plot))
    return report


def serve_runs(
    args, name: str, make, how: str, eos: int, system: str, report: dict, say, paired=None
):
    """Server ``name``'s runs at each stream count (started once per distinct server ``make``
    returns), then its prefix-reuse probe at the last count; ``paired``: a single stream timed
    just before each run (``generate_just_before``, tokens/s)."""
    runs, shared = [], None
    try:
        for n in args.streams:
            srv = make(n)
            if srv is not shared:
                if shared is not None:
                    shared.down()
                say(f"starting {srv.name} ...")
                shared = srv.up()
                warm = completion_bodies(1, 8, eos_id=eos, how=how)
                run_streams(srv.base, warm, "/v1/completions")
            before = paired() if paired is not None else None
            say(f"{name}: {n} streams of {args.new_tokens} tokens ...")
            bodies = completion_bodies(n, args.new_tokens, eos_id=eos, how=how)
            r = run_streams(srv.base, bodies, "/v1/completions")
            if before is not None:
                r["generate_just_before"] = before
            r["server_start_s"] = srv.start_s
            runs.append(r)
            if n == args.streams[-1]:
                say(f"{name}: prefix reuse, 8 requests sharing {args.prefix_tokens} tokens")
                report["prefix"][name] = prefix_reuse(srv.base, system, how=how, eos_id=eos)
    finally:
        if shared is not None:
            shared.down()
    return runs


def _system_text() -> str:
    from archopt.perplexity import reference_text

    return "You are a careful assistant. Here is a reference you may need:\n\n" + reference_text()


if __name__ == "__main__":
    main()
