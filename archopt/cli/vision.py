"""Subcommands over image models and the studies: list, table, measure, export, tour, bench,
train, pareto, search."""

from __future__ import annotations

import json

from archopt.cli.common import emit, model_from_args, parse_overrides


def cmd_list(args) -> None:
    from archopt.registry import list_models

    names = list_models(args.pattern)
    emit(names, args.json, "\n".join(names))


def cmd_table(args) -> None:
    from archopt.measure import count_params, format_table, layer_table

    model, shape = model_from_args(args.model, args)
    rows = layer_table(model, shape)
    emit(
        [r.as_dict() for r in rows],
        args.json,
        f"{args.model} at {shape[2]}x{shape[3]}\n"
        + format_table(rows, total_params=count_params(model)),
    )


def cmd_measure(args) -> None:
    import torch

    from archopt.measure import measure_model
    from archopt.optimize import optimize_for_inference
    from archopt.report import log

    results = []
    for name in args.models:
        model, shape = model_from_args(name, args)
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
    emit(results, args.json, "\n".join(lines))


def cmd_export(args) -> None:
    import torch

    from archopt.export import export_onnx
    from archopt.io import check_writable

    check_writable(args.output, "the output path")
    model, shape = model_from_args(args.model, args)
    path = export_onnx(model, args.output, torch.randn(shape))
    emit({"model": args.model, "path": str(path), "input_shape": shape}, args.json, f"wrote {path}")


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
    "decode-gpu": "decode_gpu",
    "cli": "whole_process",
    "vision": "vision",
    "quant-linear": "quant_linear",
    "serve": "serve",
    "search": "search",
    "predictor": "predictor",
    "decode-kernels": "decode_kernels",
    "speculate": "speculate",
}


def cmd_bench(args) -> None:
    import importlib

    importlib.import_module(f"archopt.bench.{BENCH_SUITES[args.suite]}").main(args.rest)


def cmd_train(args) -> None:
    import os

    from archopt.io import check_writable
    from archopt.train import TrainConfig, parse_data_spec, train

    overrides = parse_overrides(args.set or [])
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
    emit(
        result.as_dict(),
        args.json,
        f"{result.model_name} on {result.data}: val top-1 {result.top1:.4f} after "
        f"{result.epochs_done}/{result.epochs} epochs, {result.time_s:.1f} s"
        + (", bf16" if result.bf16 else "")
        + f"; metrics and checkpoint in {out}",
    )


def cmd_pareto(args) -> None:
    from archopt.errors import ArchoptError
    from archopt.io import check_writable
    from archopt.train.study import format_study, pareto_study

    check_writable(args.out, "--out", folder=True)
    models = [m.strip() for m in args.models.split(",")]
    if not all(models):
        raise ArchoptError(
            f"--models must be names separated by single commas, got {args.models!r} "
            "(an empty name between commas)"
        )
    try:
        report = pareto_study(
            models,
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
    emit(report, args.json, format_study(report) + f"\ntable and plots in {args.out}")


def cmd_search(args) -> None:
    from archopt.search.loop import format_search, format_spaces, list_spaces, search

    if args.list_spaces:
        spaces = list_spaces()
        emit(spaces, args.json, format_spaces(spaces))
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
            rounds=args.rounds,
            round_gap_s=args.round_gap,
            progress=False if args.no_progress else None,
            verbose=not args.json,
        )
    except FloatingPointError as e:  # a candidate diverged under the shared recipe
        raise ValueError(str(e)) from e
    emit(report, args.json, format_search(report) + f"\nrecords, table and plots in {args.out}")
