"""The ``archopt`` command: thin subcommands over importable functions."""

from __future__ import annotations

import argparse
import json
import sys

import torch


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
    from archopt.registry import create_model

    overrides = _parse_overrides(args.set or [])
    if getattr(args, "width_mult", None) is not None:
        overrides["width_mult"] = args.width_mult
    model = create_model(name, **overrides).eval()
    res = args.resolution or getattr(model, "default_resolution", 224)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    return model, (getattr(args, "batch_size", 1), in_chans, res, res)


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

    results = []
    for name in args.models:
        model, shape = _model_from_args(name, args)
        run = model
        if args.optimize:
            dtype = torch.bfloat16 if args.bf16 else torch.float32
            run = optimize_for_inference(
                model, torch.randn(shape), compile=args.compile, dtype=dtype
            )
        print(f"measuring {name} {shape} ...", file=sys.stderr, flush=True)
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

    model, shape = _model_from_args(args.model, args)
    path = export_onnx(model, args.output, torch.randn(shape))
    _emit(
        {"model": args.model, "path": str(path), "input_shape": shape}, args.json, f"wrote {path}"
    )


def cmd_tour(args) -> None:
    from archopt.tour import run_tour

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


def cmd_bench(args) -> None:
    if args.suite == "attention":
        from archopt.bench.attention import main as bench_attention

        bench_attention(args.rest)
    elif args.suite == "generate":
        from archopt.bench.generate import main as bench_generate

        bench_generate(args.rest)
    elif args.suite == "search":
        from archopt.bench.search import main as bench_search

        bench_search(args.rest)


def cmd_generate(args) -> None:
    import time

    from archopt.generate import encode_prompt, stream_text

    if args.threads:
        torch.set_num_threads(args.threads)
    from archopt.loading.llm import load_llm

    model = load_llm(args.model, weights=args.weights)
    n_prompt = len(encode_prompt(model, args.prompt, chat=args.chat))
    kwargs = dict(
        cache=args.cache, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )  # fmt: skip
    if args.ignore_eos:
        kwargs["stop"] = None
    if args.compile:
        kwargs["compile"] = args.compile
    pieces = []
    start = time.perf_counter()
    if not args.json:
        print(args.prompt if not args.chat else "", end="", flush=True)
    for piece in stream_text(model, args.prompt, args.max_new_tokens, chat=args.chat, **kwargs):
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    elapsed = time.perf_counter() - start
    text = "".join(pieces)
    count = len(model.tokenizer.encode(text)) if text else 0
    report = {
        "model": args.model,
        "weights": args.weights,
        "cache": args.cache,
        "prompt_tokens": n_prompt,
        "new_tokens": count,
        "seconds": elapsed,
        "tokens_per_s": count / elapsed if elapsed else 0.0,
        "text": text,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"\n\n[{count} tokens in {elapsed:.2f} s: {report['tokens_per_s']:.1f} tokens/s, "
            f"cache {args.cache}, {torch.get_num_threads()} threads]",
            file=sys.stderr,
        )


def cmd_train(args) -> None:
    import os

    from archopt.train import train

    overrides = _parse_overrides(args.set or [])
    if args.width_mult is not None:
        overrides["width_mult"] = args.width_mult
    out = args.out or f"runs/{args.model}"
    try:
        result = train(
            args.model,
            args.data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            warmup_epochs=args.warmup,
            label_smoothing=args.label_smoothing,
            resolution=args.resolution,
            channels=args.channels,
            model_overrides=overrides,
            bf16=args.bf16,
            seed=args.seed,
            num_workers=args.workers,
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
    from archopt.train.study import format_study, pareto_study

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

    p = argparse.ArgumentParser(prog="archopt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_opts(sp, batch: bool = False):
        sp.add_argument("--resolution", type=int, help="input height = width (default: model's)")
        sp.add_argument("--width-mult", type=float, help="width multiplier alpha")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
        if batch:
            sp.add_argument("--batch-size", type=int, default=1)
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
    sp.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    sp.add_argument("--repeats", type=int, default=30)
    sp.add_argument("--optimize", action="store_true", help="run optimize_for_inference first")
    sp.add_argument("--compile", choices=["auto", "jit", "inductor", "onnxruntime"], default=None)
    sp.add_argument("--bf16", action="store_true", help="optimize in bfloat16 (with --optimize)")
    sp.set_defaults(func=cmd_measure)

    sp = sub.add_parser("export", help="export a model to ONNX")
    sp.add_argument("model")
    sp.add_argument("output")
    model_opts(sp, batch=True)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("bench", help="benchmarks against the reference implementations")
    sp.add_argument("suite", choices=["attention", "generate", "search"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("generate", help="stream a continuation from a language model")
    sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m, HF dir or .gguf")
    sp.add_argument("--prompt", default="Lionel Messi is a")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument(
        "--cache", default="dense", help="none | dense | static | sliding:W | sink:S:W | int8[:R]"
    )
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    sp.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    sp.add_argument("--top-k", type=int)
    sp.add_argument("--top-p", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    sp.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=COMPILE_MODES,
        help="compiled one-token steps (needs --cache static; inductor-cpp: C++ wrapper)",
    )
    sp.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHT_CHOICES,
        help="auto: a GGUF file's own blocks, else fp32; int8/int4: quantized here (int4-head8: "
        "with an int8 output projection); gguf: the file's own blocks",
    )
    sp.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("tour", help="re-measure the lecture's claims and write a report")
    sp.add_argument("--out", default="archopt-report", help="output folder")
    sp.add_argument("--threads", type=int)
    sp.add_argument("--repeats", type=int, default=20)
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
        sp.add_argument("--epochs", type=int, default=epochs)
        sp.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks)")
        sp.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
        sp.add_argument("--lr", type=float, help="peak learning rate (sgd 0.1, adamw 2e-3)")
        sp.add_argument("--resolution", type=int, help="image side (digits, CIFAR-10: 32)")
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
    sp.add_argument("--weight-decay", type=float, help="default: sgd 5e-4, adamw 0.05")
    sp.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    sp.add_argument("--warmup", type=float, default=1.0, help="linear warm-up, in epochs")
    sp.add_argument("--label-smoothing", type=float, default=0.1)
    sp.add_argument("--width-mult", type=float, help="width multiplier alpha")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    sp.add_argument("--out", help="run folder (default: runs/MODEL)")
    sp.add_argument("--resume", action="store_true", help="continue the run in --out")
    sp.add_argument("--stop-after", type=int, metavar="N", help="stop after epoch N, resumable")
    sp.add_argument("--workers", type=int, default=0, help="data loader workers (folders)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "pareto", help="train, measure, and plot accuracy against MACs, latency, params, memory"
    )
    sp.add_argument("--models", required=True, help="comma-separated, e.g. a,b:width_mult=0.5")
    recipe_opts(sp, epochs=5)
    sp.add_argument("--x", choices=["macs", "latency", "params", "memory"], default="macs")
    sp.add_argument("--y", choices=["accuracy"], default="accuracy")
    sp.add_argument("--out", default="archopt-pareto", help="output folder (runs are reused)")
    sp.add_argument("--threads", type=int, help="torch threads for latency")
    sp.add_argument("--repeats", type=int, default=20, help="timed latency repeats")
    sp.add_argument("--logx", action="store_true", help="log-scale cost axis")
    sp.set_defaults(func=cmd_pareto)

    sp = sub.add_parser(
        "search", help="architecture search (NSGA-II) on the measured accuracy / cost front"
    )
    sp.add_argument("--space", help="a built-in space (see --list-spaces) or a JSON file")
    sp.add_argument("--list-spaces", action="store_true", help="print the built-in spaces")
    sp.add_argument("--budget", type=int, help="candidates to train (rejections are free)")
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
    sp.add_argument("--pop-size", type=int, help="NSGA-II population (default: budget/4, 4-16)")
    sp.add_argument("--epochs", type=int, help="training epochs per candidate (space's default)")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--optimizer", choices=["sgd", "adamw"])
    sp.add_argument("--lr", type=float)
    sp.add_argument("--train-size", type=int, help="train on the first N images only (a proxy)")
    sp.add_argument("--threads", type=int, help="torch threads for latency (default: torch's)")
    sp.add_argument("--repeats", type=int, default=20, help="timed latency repeats")
    sp.add_argument(
        "--max-latency", default="auto", metavar="MS|auto|none",
        help="reject candidates predicted slower (auto: the slowest hand-designed model)",
    )  # fmt: skip
    sp.add_argument("--no-hand-designed", action="store_true", help="do not train them")
    sp.add_argument("--stop-after", type=int, metavar="N", help="stop after N, resumable")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_search)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"archopt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
