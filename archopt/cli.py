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

    report = run_tour(args.out, threads=args.threads, repeats=args.repeats)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        print((__import__("pathlib").Path(args.out) / "report.md").read_text())


def cmd_bench(args) -> None:
    if args.suite == "attention":
        from archopt.bench.attention import main as bench_attention

        bench_attention(args.rest)


def build_parser() -> argparse.ArgumentParser:
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
    sp.add_argument("suite", choices=["attention"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("tour", help="re-measure the lecture's claims and write a report")
    sp.add_argument("--out", default="archopt-report", help="output folder")
    sp.add_argument("--threads", type=int)
    sp.add_argument("--repeats", type=int, default=20)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_tour)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        print(f"archopt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
