"""The latency predictor against measured latency, on random candidates of a search space.

``archopt bench predictor [--space mobilenet] [--candidates 40] [--calibrate 6]``: draws
candidates at random (seeded), keeps those whose kernel sum is under ``--max-ms``, measures each
whole (fastest of ``--repeats``, as the search does), fits the predictor's calibration on the
first ``--calibrate`` and reports, on the rest (held out): the share within +-10%, Spearman's
rank correlation and the median and worst relative error; beside it, an affine fit
(``a * sum + b``) on the same calibration models, as a check of what a richer calibration buys.
The per-kernel table is fresh (a temporary cache folder) unless ``--keep-table``.

``--rounds R`` (default 3): after the first pass, every kernel and every whole model is timed
again R - 1 times, each round after a pause (``--round-gap``, 15 s), and both keep their fastest
round; the report gives the first round's figures and the fastest-of-R figures side by side.
On a shared machine one round can catch a slow spell (the same kernel measured 2x slower a
minute later, fastest of 20 both times), which no single window of repeats averages out.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

from archopt.bench.common import machine_line
from archopt.io import atomic_write_text, check_writable
from archopt.report import ArgumentParser, float_in, int_in


def run(args) -> dict:
    from archopt.measure import measure_latency
    from archopt.search.predictor import LatencyPredictor, check_predictions
    from archopt.search.spaces import get_space

    space = get_space(args.space)
    rng = np.random.default_rng(args.seed)
    predictor = LatencyPredictor(threads=args.threads)
    rows: list[dict] = []
    kept: list[tuple] = []  # (model, input) for the later rounds
    start = time.perf_counter()
    while len(rows) < args.candidates and time.perf_counter() - start < args.max_seconds:
        genes = space.sample(rng)
        cand = space.decode(genes)
        torch.manual_seed(0)
        model = cand.build(10, 1).eval()
        x = torch.randn(1, 1, cand.resolution, cand.resolution)
        p = predictor.kernel_sum(model, (x,))
        if p.kernel_sum_ms > args.max_ms:
            continue
        lat = measure_latency(model, (x,), warmup=3, repeats=args.repeats, threads=args.threads)
        rows.append({"genes": [int(g) for g in genes], "kernels": p.kernels,
                     "kernel_sum_rounds_ms": [p.kernel_sum_ms],
                     "measured_rounds_ms": [lat.min_ms]})  # fmt: skip
        kept.append((model, x))
        if not args.quiet:
            print(f"{len(rows)}: kernels {p.kernel_sum_ms:.2f} ms, whole {lat.min_ms:.2f} ms",
                  file=sys.stderr, flush=True)  # fmt: skip
    n = args.calibrate
    if len(rows) <= n + 2:
        raise ValueError(
            f"only {len(rows)} candidates within {args.max_seconds} s: need more than "
            f"--calibrate ({n}) + 2; raise --max-seconds or lower --candidates"
        )
    for r in range(2, args.rounds + 1):
        # Each later round times every kernel and every whole model again, after a pause;
        # tables and models alike keep their fastest round.
        time.sleep(args.round_gap)
        done: set[str] = set()
        keys = [predictor.add_round(m, (x,), done=done, repeats=args.repeats).keys for m, x in kept]
        for row, (model, x), k in zip(rows, kept, keys):
            row["kernel_sum_rounds_ms"].append(predictor.sum_ms(k))  # after the whole round
            lat = measure_latency(model, (x,), warmup=3, repeats=args.repeats,
                                  threads=args.threads)  # fmt: skip
            row["measured_rounds_ms"].append(lat.min_ms)
        if not args.quiet:
            print(f"round {r} of {args.rounds} done", file=sys.stderr, flush=True)
    report = {
        "machine": machine_line(args.threads),
        "space": args.space,
        "seed": args.seed,
        "rounds": args.rounds,
        "calibration_models": n,
        "held_out": len(rows) - n,
    }
    first = (
        np.array([r["kernel_sum_rounds_ms"][0] for r in rows]),
        np.array([r["measured_rounds_ms"][0] for r in rows]),
    )
    fastest = (
        np.array([r["kernel_sum_rounds_ms"][-1] for r in rows]),  # every kernel's fastest
        np.array([min(r["measured_rounds_ms"]) for r in rows]),
    )
    for label, (s, m) in (("first_round", first), (f"fastest_of_{args.rounds}", fastest)):
        ratio = float(np.median(m[:n] / s[:n]))
        line = np.linalg.lstsq(np.c_[s[:n], np.ones(n)], m[:n], rcond=None)[0]
        report[label] = {
            "median_ratio": {"a": ratio, **check_predictions(list(ratio * s[n:]), list(m[n:]))},
            "affine": {
                "a": float(line[0]),
                "b": float(line[1]),
                **check_predictions(list(line[0] * s[n:] + line[1]), list(m[n:])),
            },
        }
    report["rows"] = rows
    return report


def format_report(r: dict) -> str:
    head = f"space {r['space']}, seed {r['seed']}: {r['calibration_models']} calibration models"
    lines = [f"machine: {r['machine']}", f"{head}, {r['held_out']} held out", ""]
    for label in ("first_round", f"fastest_of_{r['rounds']}"):
        for name in ("median_ratio", "affine"):
            c = r[label][name]
            lines.append(
                f"{label}, {name}: within +-10% {100 * c['within_10pct']:.0f}%, Spearman "
                f"{c['spearman']:.2f}, median error {100 * c['median_abs_error']:.1f}%, "
                f"worst {100 * c['max_abs_error']:.0f}%"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="archopt bench predictor", description=__doc__)
    p.add_argument("--space", default="mobilenet")
    p.add_argument("--candidates", type=int_in(3, 10_000), default=40)
    p.add_argument("--calibrate", type=int_in(1, 10_000), default=6)
    p.add_argument("--seed", type=int_in(0), default=7)
    p.add_argument("--threads", type=int_in(1, 1024), default=1)
    p.add_argument("--repeats", type=int_in(1), default=20)
    p.add_argument("--rounds", type=int_in(1, 100), default=3,
                   help="time every kernel and whole model this many times, minutes apart, "
                        "and keep the fastest")  # fmt: skip
    p.add_argument("--round-gap", type=float_in(0), default=15.0,
                   help="seconds of pause before each later round")  # fmt: skip
    p.add_argument("--max-ms", type=float_in(0, open_low=True), default=20.0,
                   help="skip candidates whose kernels add up to more")  # fmt: skip
    p.add_argument("--max-seconds", type=float_in(0, open_low=True), default=900.0)
    p.add_argument("--keep-table", action="store_true", help="use archopt's own table")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    if not args.keep_table:
        os.environ["ARCHOPT_CACHE"] = tempfile.mkdtemp(prefix="archopt-predictor-")
    report = run(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1, default=float) + "\n")
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
