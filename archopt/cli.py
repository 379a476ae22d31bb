"""The ``archopt`` command: thin subcommands over importable functions."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from archopt.report import ArgumentParser, float_in, int_in


def _emit(data, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=float) if as_json else text)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _model_from_args(name: str, args) -> tuple[torch.nn.Module, tuple[int, ...]]:
    from math import prod

    from archopt.io import check_fits
    from archopt.registry import create_model, list_models, model_info

    overrides = _parse_overrides(args.set or [])
    if getattr(args, "width_mult", None) is not None:
        overrides["width_mult"] = args.width_mult
    info = model_info(name)
    if info.task != "image":
        raise ValueError(
            f"{args.command} takes an image model, got {name!r}, "
            f"{ {'lm': 'a language', 'encoder': 'a sequence encoder'}[info.task] } model "
            f"(image models: {', '.join(list_models(task='image'))})"
        )
    model = create_model(name, **overrides).eval()
    res = args.resolution or getattr(model, "default_resolution", 224)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    shape = (getattr(args, "batch_size", 1), in_chans, res, res)
    # Activations of these nets peak at a few times the input (MobileNet v1: 64 channels at
    # half resolution, 5x a 3-channel input); 32x the input, times the width, bounds them.
    width = float(overrides.get("width_mult", 1.0))
    check_fits(f"a {shape[0]}x{in_chans}x{res}x{res} input", 32 * 4 * prod(shape) * max(width, 1))
    return model, shape


def cmd_list(args) -> None:
    from archopt.registry import list_models

    names = list_models(args.pattern)
    _emit(names, args.json, "\n".join(names))


def cmd_table(args) -> None:
    from archopt.measure import count_params, format_table, layer_table

    model, shape = _model_from_args(args.model, args)
    rows = layer_table(model, shape)
    _emit(
        [r.as_dict() for r in rows],
        args.json,
        f"{args.model} at {shape[2]}x{shape[3]}\n"
        + format_table(rows, total_params=count_params(model)),
    )


def cmd_measure(args) -> None:
    from archopt.measure import measure_model
    from archopt.optimize import optimize_for_inference
    from archopt.report import log

    results = []
    for name in args.models:
        model, shape = _model_from_args(name, args)
        run = model
        if args.optimize:
            dtype = torch.bfloat16 if args.bf16 else torch.float32
            run = optimize_for_inference(
                model,
                torch.randn(shape),
                compile=None if args.compile == "none" else args.compile,
                dtype=dtype,
            )
        log(f"measuring {name} {shape} ...")
        m = measure_model(
            run, shape, name=name, threads=args.threads, repeats=args.repeats, counted_model=model
        )
        results.append(m.as_dict())
    head = (
        f"{'model':28s} {'params':>12s} {'MMACs':>10s} {'latency ms':>11s} {'p10-p90':>13s} "
        f"{'peak MiB':>9s}"
    )
    lines = [head] + [
        f"{r['name']:28s} {r['params']:12,d} {r['macs'] / 1e6:10.1f} {r['latency_ms']:11.2f} "
        f"{r['latency_p10_ms']:6.2f}-{r['latency_p90_ms']:<6.2f} "
        f"{r['peak_memory_bytes'] / 2**20:9.1f}"
        for r in results
    ]
    _emit(results, args.json, "\n".join(lines))


def cmd_export(args) -> None:
    from archopt.export import export_onnx
    from archopt.io import check_writable

    check_writable(args.output, "the output path")
    model, shape = _model_from_args(args.model, args)
    path = export_onnx(model, args.output, torch.randn(shape))
    _emit(
        {"model": args.model, "path": str(path), "input_shape": shape}, args.json, f"wrote {path}"
    )


def cmd_tour(args) -> None:
    from archopt.io import check_writable
    from archopt.tour import run_tour

    check_writable(args.out, "--out", folder=True)
    sections = args.sections.split(",") if args.sections else None
    report = run_tour(
        args.out,
        threads=args.threads,
        repeats=args.repeats,
        quick=args.quick,
        sections=sections,
    )
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        print((__import__("pathlib").Path(args.out) / "report.md").read_text())


# ``archopt bench SUITE``: the module of archopt.bench that runs it (its ``main(argv)``).
BENCH_SUITES = {
    "attention": "attention",
    "attention-gpu": "attention_gpu",
    "generate": "generate",
    "cli": "whole_process",
    "vision": "vision",
    "quant-linear": "quant_linear",
    "serve": "serve",
    "search": "search",
}


def cmd_bench(args) -> None:
    import importlib

    importlib.import_module(f"archopt.bench.{BENCH_SUITES[args.suite]}").main(args.rest)


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that is unknown."""
    import os
    from pathlib import Path

    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


def cmd_generate(args) -> None:
    import time

    from archopt.generate import plan_decode, stream_text
    from archopt.loading.llm import load_llm
    from archopt.ops.kv_cache import check_cache_spec

    # Everything that can be wrong with the arguments fails here, before a model is read.
    check_cache_spec(args.cache)
    if args.compile not in ("auto", "off") and args.cache not in ("auto", "static"):
        raise ValueError(
            f"--compile {args.compile} needs --cache static (or auto, which picks it), got "
            f"--cache {args.cache}"
        )
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import_s = _process_age_s()  # the interpreter's start and the imports, torch's included
    start = time.perf_counter()
    model = load_llm(args.model, weights=args.weights)
    load_s = time.perf_counter() - start
    plan = plan_decode(
        model, cache=args.cache, compile=args.compile, new_tokens=args.max_new_tokens,
        progress=not args.json,
    )  # fmt: skip
    kwargs = dict(
        compile=plan, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )  # fmt: skip
    if args.ignore_eos:
        kwargs["stop"] = None
    pieces, stats = [], {}
    if not args.json:
        print(args.prompt if not args.chat else "", end="", flush=True)
    text_stream = stream_text(
        model, args.prompt, args.max_new_tokens, chat=args.chat, stats=stats, **kwargs
    )
    for piece in text_stream:
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    n = stats["new_tokens"]
    decode_s = stats.get("last_token_s", 0.0) - stats.get("first_token_s", 0.0)
    report = {
        "model": args.model,
        "weights": model.config.extra.get("weights", args.weights),
        "loaded_from": model.config.extra.get("loaded_from"),
        "cache": plan.cache if isinstance(plan.cache, str) else type(plan.cache).__name__,
        "decode": plan.how,
        "prompt_tokens": stats["prompt_tokens"],
        "new_tokens": n,
        "import_s": import_s,
        "load_s": load_s,
        "compile_s": plan.compile_seconds,
        "first_token_s": stats.get("first_token_s"),
        "decode_tokens_per_s": (stats["new_tokens"] - 1) / decode_s if decode_s > 0 else None,
        "threads": torch.get_num_threads(),
        "text": "".join(pieces),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rate = report["decode_tokens_per_s"]
    print(
        f"\n\n[{n} tokens; load {load_s:.2f} s ({report['loaded_from']}), decode "
        f"{plan.how}, first token {report['first_token_s'] or 0:.2f} s, "
        + (f"{rate:.1f} tokens/s" if rate else "one token")
        + f"; {report['weights']} weights, {report['cache']} cache, {report['threads']} threads]",
        file=sys.stderr,
    )


def cmd_cache(args) -> None:
    from archopt.io import cache_dir, cache_entries, clear_cache

    if args.action == "clear":
        removed = clear_cache()
        _emit({"removed": removed}, args.json, f"removed {removed} entries from {cache_dir()}")
        return
    entries = cache_entries()
    lines = [f"{cache_dir()}:"] + [
        f"  {e['kind']:6s} {e['name']:60s} {e['bytes'] / 2**20:8.1f} MiB  {e['detail']}"
        for e in entries
    ]
    if not entries:
        lines.append("  (empty)")
    _emit(entries, args.json, "\n".join(lines))


def cmd_serve(args) -> None:
    from archopt.serve.app import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    serve(
        args.model,
        weights=args.weights,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        block_size=args.block_size,
        max_blocks=args.max_blocks,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        attention=args.attention,
    )


def cmd_train(args) -> None:
    import os

    from archopt.io import check_writable
    from archopt.train import TrainConfig, parse_data_spec, train

    overrides = _parse_overrides(args.set or [])
    if args.width_mult is not None:
        overrides["width_mult"] = args.width_mult
    out = args.out or f"runs/{args.model}"
    check_writable(out, "--out", folder=True)
    # The options are named after TrainConfig's fields: one place says what a run is.
    options = {**vars(args), "data": str(parse_data_spec(args.data))}
    config = TrainConfig.from_options(options, model_overrides=overrides)
    try:
        result = train(
            config,
            out_dir=out,
            resume=args.resume,
            stop_after=args.stop_after,
            progress=False if args.no_progress else None,
            verbose=not args.json,
        )
    except FloatingPointError as e:  # divergence: a bad setting, reported like the others
        raise ValueError(str(e)) from e
    if result.world_size > 1 and int(os.environ.get("RANK", "0")) != 0:
        return  # one report per job, from rank 0
    _emit(
        result.as_dict(),
        args.json,
        f"{result.model_name} on {result.data}: val top-1 {result.top1:.4f} after "
        f"{result.epochs_done}/{result.epochs} epochs, {result.time_s:.1f} s"
        + (", bf16" if result.bf16 else "")
        + f"; metrics and checkpoint in {out}",
    )


def cmd_pareto(args) -> None:
    from archopt.io import check_writable
    from archopt.train.study import format_study, pareto_study

    check_writable(args.out, "--out", folder=True)
    try:
        report = pareto_study(
            args.models.split(","),
            data=args.data,
            epochs=args.epochs,
            x=args.x,
            y=args.y,
            out_dir=args.out,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            resolution=args.resolution,
            channels=args.channels,
            seed=args.seed,
            bf16=args.bf16,
            threads=args.threads,
            repeats=args.repeats,
            logx=args.logx,
            progress=False if args.no_progress else None,
            verbose=not args.json,
        )
    except FloatingPointError as e:  # a model diverged under the shared recipe
        raise ValueError(str(e)) from e
    _emit(report, args.json, format_study(report) + f"\ntable and plots in {args.out}")


THREADS = int_in(1, 1024)
POSITIVE = int_in(1)
RESOLUTION = int_in(1, 1 << 16)


def cmd_search(args) -> None:
    from archopt.search.loop import format_search, format_spaces, list_spaces, search

    if args.list_spaces:
        spaces = list_spaces()
        _emit(spaces, args.json, format_spaces(spaces))
        return
    if args.space is None:
        raise ValueError("search needs --space NAME or --space path.json (see --list-spaces)")
    if args.budget is None:
        raise ValueError("search needs --budget N (how many candidates to train), got none")
    from archopt.io import check_writable

    check_writable(args.out, "--out", folder=True)
    bound = args.max_latency
    if bound not in ("auto", "none"):
        try:
            bound = float(bound)
        except ValueError:
            raise ValueError(
                f"--max-latency must be a number of ms, auto or none, got {bound!r}"
            ) from None
    try:
        report = search(
            args.space,
            budget=args.budget,
            objectives=args.objectives,
            data=args.data,
            out_dir=args.out,
            seed=args.seed,
            algorithm=args.algorithm,
            pop_size=args.pop_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            train_size=args.train_size,
            threads=args.threads,
            repeats=args.repeats,
            max_latency_ms=None if bound == "none" else bound,
            hand_designed=not args.no_hand_designed,
            stop_after=args.stop_after,
            progress=False if args.no_progress else None,
            verbose=not args.json,
        )
    except FloatingPointError as e:  # a candidate diverged under the shared recipe
        raise ValueError(str(e)) from e
    _emit(report, args.json, format_search(report) + f"\nrecords, table and plots in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from archopt.generate import COMPILE_MODES
    from archopt.loading.llm import WEIGHT_CHOICES

    p = ArgumentParser(
        prog="archopt",
        description=__doc__,
        epilog="--debug (anywhere): show the traceback of an error instead of one line",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def model_opts(sp, batch: bool = False):
        sp.add_argument(
            "--resolution", type=RESOLUTION, help="input height = width (default: model's)"
        )
        sp.add_argument(
            "--width-mult", type=float_in(0, 16, open_low=True), help="width multiplier alpha"
        )
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
        if batch:
            sp.add_argument("--batch-size", type=POSITIVE, default=1)
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("list", help="registered models")
    sp.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'mobilenet*'")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("table", help="per-layer architecture table (the paper's Table 1 form)")
    sp.add_argument("model")
    model_opts(sp)
    sp.set_defaults(func=cmd_table)

    sp = sub.add_parser("measure", help="params, MACs, latency, peak memory")
    sp.add_argument("models", nargs="+")
    model_opts(sp, batch=True)
    sp.add_argument("--threads", type=THREADS, help="torch intra-op threads (default: torch's)")
    sp.add_argument("--repeats", type=POSITIVE, default=30)
    sp.add_argument("--optimize", action="store_true", help="run optimize_for_inference first")
    sp.add_argument(
        "--compile",
        choices=["auto", "none", "jit", "inductor", "onnxruntime"],
        default="auto",
        help="with --optimize: auto (default) = the fastest checked backend, remembered per "
        "model, shape and machine; none = eager",
    )
    sp.add_argument("--bf16", action="store_true", help="optimize in bfloat16 (with --optimize)")
    sp.set_defaults(func=cmd_measure)

    sp = sub.add_parser("export", help="export a model to ONNX")
    sp.add_argument("model")
    sp.add_argument("output")
    model_opts(sp, batch=True)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("bench", help="benchmarks against the reference implementations")
    sp.add_argument("suite", choices=list(BENCH_SUITES))
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("generate", help="stream a continuation from a language model")
    sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m, HF dir or .gguf")
    sp.add_argument("--prompt", default="Lionel Messi is a")
    sp.add_argument("--max-new-tokens", type=POSITIVE, default=128)
    sp.add_argument(
        "--cache",
        default="auto",
        help="auto (static with the compiled step, else dense) | none | dense | static | "
        "sliding:W | sink:S:W | int8[:R]",
    )
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    sp.add_argument("--temperature", type=float_in(0, 100), default=0.0, help="0: greedy")
    sp.add_argument("--top-k", type=POSITIVE)
    sp.add_argument("--top-p", type=float_in(0, 1, open_low=True))
    sp.add_argument("--seed", type=int)
    sp.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    sp.add_argument(
        "--compile",
        nargs="?",
        default="auto",
        const="aot",
        choices=COMPILE_MODES,
        help="auto (default): the compiled step if it is in the cache, else eager while it is "
        "built in the background for later runs; aot (or --compile alone): compile now if "
        "needed; off: eager; inductor[-cpp]: torch.compile in this process",
    )
    sp.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHT_CHOICES,
        help="auto: a GGUF file's own blocks, else fp32; int8/int4: quantized here (int4-head8: "
        "with an int8 output projection); gguf: the file's own blocks",
    )
    sp.add_argument("--threads", type=THREADS, help="torch intra-op threads (default: torch's)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("cache", help="what archopt keeps in its cache folder")
    sp.add_argument("action", choices=["list", "clear"])
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_cache)

    sp = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m, HF dir or .gguf")
    sp.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES)
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    sp.add_argument("--port", type=int_in(0, 65535), default=8000)
    sp.add_argument(
        "--max-batch", type=int_in(1, 4096), default=8, help="sequences decoded together"
    )
    sp.add_argument("--block-size", type=int_in(1, 1 << 16), default=16, help="tokens per KV block")
    sp.add_argument(
        "--max-blocks", type=POSITIVE, help="KV pool limit in blocks (default: max-batch contexts)"
    )
    sp.add_argument("--prefill-chunk", type=POSITIVE, default=256, help="prompt tokens per step")
    sp.add_argument("--max-queue", type=POSITIVE, default=256, help="waiting requests before 503")
    sp.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "span", "gather"],
        help="auto: batched requests decode exactly as alone; span: no per-step copy",
    )
    sp.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    sp.add_argument("--threads", type=THREADS, help="torch intra-op threads (default: torch's)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("tour", help="re-measure the lecture's claims and write a report")
    sp.add_argument("--out", default="archopt-report", help="output folder")
    sp.add_argument("--threads", type=THREADS)
    sp.add_argument("--repeats", type=POSITIVE, default=20)
    sp.add_argument(
        "--quick", action="store_true", help="a smaller, rougher version (about a minute)"
    )
    sp.add_argument(
        "--sections",
        metavar="NAME[,NAME]",
        help="run only these: mobilenet, longformer, mobilevit, kv_cache, search (the summary "
        "follows)",
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_tour)

    def recipe_opts(sp, epochs: int):
        sp.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
        sp.add_argument("--epochs", type=int_in(1, 100_000), default=epochs)
        sp.add_argument(
            "--batch-size", type=int_in(1, 1 << 20), default=64, help="global batch (all ranks)"
        )
        sp.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
        sp.add_argument(
            "--lr",
            type=float_in(0, open_low=True),
            help="peak learning rate (sgd 0.1, adamw 2e-3)",
        )
        sp.add_argument("--resolution", type=RESOLUTION, help="image side (digits, CIFAR-10: 32)")
        sp.add_argument("--channels", type=int, choices=[1, 3], help="default: as stored")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser(
        "train",
        help="train an image model from scratch; under torchrun, with DDP",
        description="Train from scratch with checkpoints after every epoch. More processes: "
        "torchrun --nproc-per-node N -m archopt.cli train MODEL ...",
    )
    sp.add_argument("model")
    recipe_opts(sp, epochs=10)
    sp.add_argument("--weight-decay", type=float_in(0, 10), help="default: sgd 5e-4, adamw 0.05")
    sp.add_argument("--momentum", type=float_in(0, 1), default=0.9, help="SGD momentum")
    sp.add_argument(
        "--warmup",
        type=float_in(0, 100_000),
        default=1.0,
        dest="warmup_epochs",
        help="linear warm-up, in epochs",
    )
    sp.add_argument("--label-smoothing", type=float_in(0, 1), default=0.1)
    sp.add_argument(
        "--width-mult", type=float_in(0, 16, open_low=True), help="width multiplier alpha"
    )
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    sp.add_argument("--out", help="run folder (default: runs/MODEL)")
    sp.add_argument("--resume", action="store_true", help="continue the run in --out")
    sp.add_argument(
        "--stop-after", type=POSITIVE, metavar="N", help="stop after epoch N, resumable"
    )
    sp.add_argument(
        "--workers",
        type=int_in(0, 256),
        default=0,
        dest="num_workers",
        help="data loader workers (folders)",
    )
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "pareto", help="train, measure, and plot accuracy against MACs, latency, params, memory"
    )
    sp.add_argument("--models", required=True, help="comma-separated, e.g. a,b:width_mult=0.5")
    recipe_opts(sp, epochs=5)
    sp.add_argument("--x", choices=["macs", "latency", "params", "memory"], default="macs")
    sp.add_argument("--y", choices=["accuracy"], default="accuracy")
    sp.add_argument("--out", default="archopt-pareto", help="output folder (runs are reused)")
    sp.add_argument("--threads", type=THREADS, help="torch threads for latency")
    sp.add_argument("--repeats", type=POSITIVE, default=20, help="timed latency repeats")
    sp.add_argument("--logx", action="store_true", help="log-scale cost axis")
    sp.set_defaults(func=cmd_pareto)

    sp = sub.add_parser(
        "search", help="architecture search (NSGA-II) on the measured accuracy / cost front"
    )
    sp.add_argument("--space", help="a built-in space (see --list-spaces) or a JSON file")
    sp.add_argument("--list-spaces", action="store_true", help="print the built-in spaces")
    sp.add_argument(
        "--budget", type=int_in(1, 100_000), help="candidates to train (rejections are free)"
    )
    sp.add_argument(
        "--objectives", default="accuracy,latency", help="two or more of accuracy, latency, "
        "macs, params",
    )  # fmt: skip
    sp.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
    sp.add_argument(
        "--out", default="archopt-search", help="output folder (resumed if it has records)"
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--algorithm", choices=["nsga2", "random"], default="nsga2")
    sp.add_argument(
        "--pop-size", type=int_in(2, 10_000), help="NSGA-II population (default: budget/4, 4-16)"
    )
    sp.add_argument(
        "--epochs", type=int_in(1, 100_000), help="training epochs per candidate (space's default)"
    )
    sp.add_argument("--batch-size", type=int_in(1, 1 << 20))
    sp.add_argument("--optimizer", choices=["sgd", "adamw"])
    sp.add_argument("--lr", type=float_in(0, open_low=True))
    sp.add_argument(
        "--train-size", type=POSITIVE, help="train on the first N images only (a proxy)"
    )
    sp.add_argument("--threads", type=THREADS, help="torch threads for latency (default: torch's)")
    sp.add_argument("--repeats", type=POSITIVE, default=20, help="timed latency repeats")
    sp.add_argument(
        "--max-latency", default="auto", metavar="MS|auto|none",
        help="reject candidates predicted slower (auto: the slowest hand-designed model)",
    )  # fmt: skip
    sp.add_argument("--no-hand-designed", action="store_true", help="do not train them")
    sp.add_argument("--stop-after", type=POSITIVE, metavar="N", help="stop after N, resumable")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user's mistake (a bad argument, a missing or malformed file) is one
    line on stderr and exit code 2; anything else is a bug of archopt's, one line pointing to
    ``--debug`` (which shows the traceback) and exit code 1; Ctrl-C exits with 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (
        ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError
    ) as e:  # fmt: skip
        if debug:
            raise
        print(f"archopt: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        if debug:
            raise
        print(f"archopt: error: permission denied: {e.filename or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("archopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours, not the user's: say so, briefly
        if debug:
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(
            f"archopt: internal error: {type(e).__name__}: {first} (run with --debug for the "
            "traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
    return 0


def run() -> None:
    """The ``archopt`` command: ``main``, then exit. Objects alive at exit are frozen first, so
    the interpreter's last garbage collection skips torch's hundreds of thousands of them:
    0.6 s of every process's wall time on the machine of benchmarks/RESULTS.md (issue 15)."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
