"""Architecture search against random search and the hand-designed models, at equal budgets.

For each seed: NSGA-II with ``--budget`` trained candidates, then random search over the same
space with the same recipe, the same latency bound and at least the same number of trained
candidates and the same search time, so that both equal-budget comparisons can be read from
its records (the first N candidates; the candidates finished within NSGA-II's time). The
hand-designed models of the space are trained with the same recipe and seed. Reported:

- the hypervolume of each front on (1 - top-1, measured latency) against one reference point
  (the first run's: chance accuracy, the slowest hand-designed model), the ratio NSGA-II /
  random per seed, its mean and spread;
- whether a model of the searched front dominates a hand-designed one on (accuracy, measured
  latency), with latencies measured again side by side in one process (interleaved rounds,
  untrained builds: latency does not depend on the weights), not predicted;
- the latency predictor on every trained candidate (all held out from its calibration): the
  share within +-10% of the measured latency and Spearman's rank correlation.

    archopt bench search [--space mobilenet] [--budget 24] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from archopt.bench.common import machine_line
from archopt.io import atomic_write_text, check_writable
from archopt.measure import interleaved
from archopt.report import ArgumentParser, int_in, save_figure


def _hv(records: list[dict], objectives: list[str], ref: list[float]) -> float:
    from archopt.search.loop import front_of, hypervolume, minimized

    idx = front_of(records, objectives)
    pts = np.array([[minimized(records[i], o) for o in objectives] for i in idx])
    return hypervolume(pts, ref) if idx else 0.0


def _remeasure(space, front: list[dict], hand: list[dict], threads: int, rounds: int) -> dict:
    """Latency (ms, median of interleaved rounds) of front members and hand-designed models."""
    from archopt.search.space import Candidate
    from archopt.train import load_data, parse_data_spec

    fns = {}
    for r in [*front, *hand]:
        cand = Candidate(r["model"], r["overrides"], r["resolution"])
        data = load_data(parse_data_spec("digits"), resolution=cand.resolution)
        torch.manual_seed(0)
        model = cand.build(data.num_classes, data.in_chans).eval()
        x = torch.randn(1, data.in_chans, cand.resolution, cand.resolution)

        def call(model=model, x=x):
            with torch.inference_mode():
                return model(x)

        name = r.get("label") or f"candidate {r['index']}"
        fns[name] = call
    with torch.inference_mode():
        torch.set_num_threads(threads)
        timed = interleaved(fns, rounds=rounds, per_round=5, warmup=3, progress=False)
    return {k: v["median_ms"] for k, v in timed.items()}


def run(args) -> dict:
    from archopt.search.loop import dominated_hand_designed, front_of, search
    from archopt.search.predictor import check_predictions
    from archopt.search.spaces import get_space

    space = get_space(args.space)
    out = Path(args.out)
    objectives = ["accuracy", "latency"]
    common = dict(
        objectives=objectives,
        epochs=args.epochs,
        train_size=args.train_size,
        threads=args.threads,
        repeats=args.repeats,
        progress=False,
        verbose=not args.quiet,
    )
    runs, bound, ref = [], "auto", None
    for seed in args.seeds:
        nsga = search(
            space,
            budget=args.budget,
            seed=seed,
            algorithm="nsga2",
            pop_size=args.pop_size,
            out_dir=out / f"nsga2-seed{seed}",
            max_latency_ms=bound,
            hand_designed=True,
            **common,
        )
        if ref is None:  # one reference point and one latency bound for every run
            ref = [nsga["reference_point"][o] for o in objectives]
            bound = nsga["latency_bound_ms"]
        rand = search(
            space,
            budget=args.budget,
            seed=seed,
            algorithm="random",
            out_dir=out / f"random-seed{seed}",
            max_latency_ms=bound,
            hand_designed=False,
            min_time_s=nsga["elapsed_s"],
            **common,
        )
        runs.append((seed, nsga, rand))

    rows, pred, meas = [], [], []
    for seed, nsga, rand in runs:
        n_cands, r_cands = nsga["candidates"], rand["candidates"]
        r_equal_n = r_cands[: args.budget]
        r_equal_t = [r for r in r_cands if r["elapsed_s"] <= nsga["elapsed_s"]]
        front = [n_cands[i] for i in front_of(n_cands, objectives)]
        hand = nsga["hand_designed"]
        lat = _remeasure(space, front, hand, args.threads, args.rounds)
        front_m = [{**r, "latency_ms": lat[f"candidate {r['index']}"]} for r in front]
        hand_m = [{**h, "latency_ms": lat[h["label"]]} for h in hand]
        for r in n_cands + r_cands:
            pred.append(r["predicted_latency_ms"])
            meas.append(r["latency_ms"])
        hv_n = _hv(n_cands, objectives, ref)
        hv_r, hv_rt = _hv(r_equal_n, objectives, ref), _hv(r_equal_t, objectives, ref)
        rows.append(
            {
                "seed": seed,
                "nsga2_hv": hv_n,
                "random_hv_equal_evals": hv_r,
                "random_hv_equal_time": hv_rt,
                "ratio_equal_evals": hv_n / hv_r if hv_r else None,
                "ratio_equal_time": hv_n / hv_rt if hv_rt else None,
                "nsga2_evals": nsga["evaluations"],
                "nsga2_rejected": nsga["rejected"],
                "nsga2_time_s": nsga["elapsed_s"],
                "random_evals_equal_time": len(r_equal_t),
                "random_time_s_equal_evals": r_equal_n[-1]["elapsed_s"] if r_equal_n else 0.0,
                "random_rejected": rand["rejected"],
                "hand_designed_hv": _hv(hand, objectives, ref),
                "front": [
                    {k: r[k] for k in ("index", "top1", "latency_ms", "resolution")}
                    for r in front_m
                ],
                "hand_designed": [
                    {k: h[k] for k in ("label", "top1", "latency_ms")} for h in hand_m
                ],
                "dominated_remeasured": dominated_hand_designed(front_m, hand_m, objectives),
                "nsga2_dir": str(out / f"nsga2-seed{seed}"),
                "random_dir": str(out / f"random-seed{seed}"),
            }
        )
    ratios = [r["ratio_equal_evals"] for r in rows if r["ratio_equal_evals"] is not None]
    ratios_t = [r["ratio_equal_time"] for r in rows if r["ratio_equal_time"] is not None]
    report = {
        "machine": machine_line(args.threads),
        "space": space.name,
        "budget": args.budget,
        "seeds": args.seeds,
        "recipe": runs[0][1]["settings"]["recipe"],
        "train_size": args.train_size,
        "accuracy_proxy": runs[0][1]["accuracy_proxy"],
        "reference_point": dict(zip(objectives, ref)),
        "latency_bound_ms": bound,
        "rows": rows,
        "hv_ratio_equal_evals": _stats(ratios),
        "hv_ratio_equal_time": _stats(ratios_t),
        "seeds_with_dominated_hand_designed": sum(bool(r["dominated_remeasured"]) for r in rows),
        "predictor": check_predictions(pred, meas),
    }
    if args.plot:
        report["plot"] = str(_plot(runs, report, Path(args.plot)))
    return report


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "values": []}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def _plot(runs, report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from archopt.search.loop import front_of

    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.4), dpi=110, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (seed, nsga, rand), row in zip(axes, runs, report["rows"]):
        for name, recs, color in (
            ("random", rand["candidates"][: report["budget"]], "0.5"),
            ("NSGA-II", nsga["candidates"], "C3"),
        ):
            ax.scatter(
                [r["latency_ms"] for r in recs],
                [r["top1"] for r in recs],
                s=12,
                color=color,
                alpha=0.45,
            )
            front = sorted(
                (recs[i] for i in front_of(recs, ["accuracy", "latency"])),
                key=lambda r: r["latency_ms"],
            )
            ax.step(
                [r["latency_ms"] for r in front],
                [r["top1"] for r in front],
                where="post",
                color=color,
                label=f"{name} front",
            )
        for h in nsga["hand_designed"]:
            ax.scatter([h["latency_ms"]], [h["top1"]], marker="s", color="C0", s=30)
            ax.annotate(
                h["label"].replace("MobileNet v1 ", "MNv1 "),
                (h["latency_ms"], h["top1"]),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=6,
                color="C0",
            )
        ratio = row["ratio_equal_evals"]
        ax.set_title(f"seed {seed}: HV ratio {ratio:.2f}" if ratio else f"seed {seed}", fontsize=9)
        ax.set_xscale("log")
        # plain numbers on the log axis (a 3x range reads badly as 3x10^0)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("measured latency, batch 1 (ms, fastest repeat)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"validation top-1 ({report['accuracy_proxy'].split(' (')[0]})")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{report['space']} space, {report['budget']} evaluations each", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path


def format_report(r: dict) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"{r['machine']}; space {r['space']}, budget {r['budget']} trained candidates per run, "
        f"seeds {r['seeds']}; accuracy: {r['accuracy_proxy']}",
        "",
        "| seed | HV NSGA-II | HV random (equal evals) | ratio | HV random (equal time) | "
        "ratio | NSGA-II s | random s at N | hand-designed dominated (re-measured) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        dom = ", ".join(d["hand_designed"] for d in row["dominated_remeasured"]) or "none"
        lines.append(
            f"| {row['seed']} | {f(row['nsga2_hv'], '.4f')} | "
            f"{f(row['random_hv_equal_evals'], '.4f')} | {f(row['ratio_equal_evals'], '.2f')} | "
            f"{f(row['random_hv_equal_time'], '.4f')} ({row['random_evals_equal_time']} evals) | "
            f"{f(row['ratio_equal_time'], '.2f')} | {row['nsga2_time_s']:.0f} | "
            f"{row['random_time_s_equal_evals']:.0f} | {dom} |"
        )
    s, t, p = r["hv_ratio_equal_evals"], r["hv_ratio_equal_time"], r["predictor"]
    lines += [
        "",
        f"hypervolume ratio NSGA-II / random, equal evaluations: mean {f(s['mean'], '.2f')} "
        f"(std {f(s['std'], '.2f')}, range {f(s['min'], '.2f')}-{f(s['max'], '.2f')}); equal "
        f"time: mean {f(t['mean'], '.2f')} (range {f(t['min'], '.2f')}-{f(t['max'], '.2f')})",
        f"reference point: {r['reference_point']}; latency bound {r['latency_bound_ms']:.2f} ms",
        f"latency predictor on {p['n']} held-out candidates: {f(100 * p['within_10pct'], '.0f')}%"
        f" within +-10%, Spearman {f(p['spearman'])}, median error "
        f"{f(100 * p['median_abs_error'], '.1f')}%",
        f"seeds where a searched front model dominates a hand-designed one (re-measured): "
        f"{r['seeds_with_dominated_hand_designed']} of {len(r['rows'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="archopt bench search", description=__doc__)
    p.add_argument("--space", default="mobilenet")
    p.add_argument("--budget", type=int_in(1, 100_000), default=24)
    p.add_argument("--pop-size", type=int_in(2, 10_000), default=8)
    p.add_argument("--seeds", type=int_in(0), nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int_in(1, 100_000), help="default: the space's recipe")
    p.add_argument(
        "--train-size", type=int_in(1), help="train on the first N images (default: all)"
    )
    p.add_argument("--threads", type=int_in(1, 1024), default=2)
    p.add_argument("--repeats", type=int_in(1), default=20)
    p.add_argument("--rounds", type=int_in(1), default=7, help="interleaved re-measurement rounds")
    p.add_argument("--out", default="archopt-bench-search")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="PNG of the fronts, one panel per seed")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    check_writable(args.out, "--out", folder=True)  # before the hours of work, not after
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)
    if args.budget < 1:
        raise ValueError(f"--budget must be >= 1, got {args.budget}")
    torch.set_num_threads(args.threads)
    report = run(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1, default=float) + "\n")
    print(format_report(report))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
