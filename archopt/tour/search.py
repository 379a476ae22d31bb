"""Tour section for the lecture's last word on architecture: search, judged on the Pareto front.

"Pick and match different operators in an informed way": NSGA-II over MobileNet v1's stages
(block type, width, kernel, expansion, depth, resolution), each candidate trained briefly on
the digits and measured here, its front drawn beside the hand-designed MobileNet v1 variants.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from archopt.report import markdown_table
from archopt.tour.common import Claim, Section, tour_log

TITLE = "Architecture search on the measured Pareto front"


def search_section(
    out: Path, *, threads: int | None, repeats: int, progress: bool, quick: bool = False
) -> Section:
    try:
        import pymoo  # noqa: F401
    except ImportError:
        return Section(
            TITLE,
            "The search runs NSGA-II from pymoo, which is not installed: run `pip install "
            "pymoo` (or `pip install archopt[search]`) to measure this section.",
            data={"installed": False},
            claims=[
                Claim(
                    "Architecture search finds models beyond the hand-designed ones",
                    "not measured: pymoo is not installed",
                    None,
                    "-",
                ),
            ],
        )
    from archopt.search.loop import format_search, search
    from archopt.search.spaces import MOBILENET

    space, budget, kw = MOBILENET, 12, dict(pop_size=6)  # the space's recipe: 1 epoch
    if quick:  # one resolution, two hand-designed models, a few short trainings
        hand = [h for h in MOBILENET.hand_designed if h["label"].endswith(("1.0-32",))]
        hand.append({**hand[0], "label": "MobileNet v1 0.25-32", "overrides": {"width_mult": 0.25}})
        space = dataclasses.replace(
            MOBILENET, name="mobilenet-quick", resolution=(32,), hand_designed=tuple(hand)
        )
        # 600 training images (38 steps): on 240, one epoch left the networks at chance
        budget, kw = 3, dict(epochs=1, train_size=600, pop_size=4, calibration_size=2)
    run_dir = out / "search-run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a tour measures afresh
    tour_log(f"search: NSGA-II on the {space.name} space, {budget} candidates", progress)
    report = search(
        space,
        budget=budget,
        objectives="accuracy,latency",
        out_dir=run_dir,
        seed=0,
        threads=threads,
        repeats=max(3, repeats // 2),
        progress=False,
        verbose=False,
        **kw,
    )
    plot = "search_front_latency.png"
    shutil.copyfile(run_dir / report["plots"]["latency"], out / plot)
    by_index = {r["index"]: r for r in report["candidates"]}
    front = [by_index[i] for i in report["front"]]
    rows = [
        [
            f"searched #{r['index']}",
            f"{r['top1']:.3f}",
            f"{r['latency_ms']:.2f}",
            f"{r['predicted_latency_ms']:.2f}",
            f"{r['macs'] / 1e6:.1f}",
            f"{r['params'] / 1e6:.2f}",
            r["resolution"],
            _describe(r["overrides"]),
        ]
        for r in sorted(front, key=lambda r: r["latency_ms"])
    ] + [
        [
            h["label"],
            f"{h['top1']:.3f}",
            f"{h['latency_ms']:.2f}",
            f"{h['predicted_latency_ms']:.2f}",
            f"{h['macs'] / 1e6:.1f}",
            f"{h['params'] / 1e6:.2f}",
            h["resolution"],
            "hand-designed",
        ]
        for h in report["hand_designed"]
    ]
    p = report["predictor"]
    dominated = report["dominated_hand_designed"]
    within = p["within_10pct"]
    md = [
        f"NSGA-II (pymoo) on the `{space.name}` space ({space.description}), "
        f"{report['evaluations']} candidates trained ({report['rejected']} more rejected "
        "untrained, predicted slower than the slowest hand-designed model predicted alike). "
        f"Accuracy: {report['accuracy_proxy']}. Latency: batch 1, measured here (the fastest of "
        "the repeats), predicted first from a per-layer table (nn-Meter's idea) kept in archopt's "
        "cache folder. The hand-designed MobileNet v1 variants are trained with the same "
        "recipe.",
        "",
        markdown_table(
            ["model", "top-1", "latency ms", "predicted ms", "MMACs", "M params", "res", "stages"],
            rows,
        ),
        "",
        f"Hypervolume of the searched front {report['hypervolume']:.4f}, of the hand-designed "
        f"models {report['hypervolume_hand_designed'] or 0:.4f} (reference point: "
        + ", ".join(f"{k} {v:.3g}" for k, v in report["reference_point"].items())
        + "; error and ms, minimized).",
        "",
        f"![searched front and hand-designed models]({plot})",
        "",
        "```",
        format_search(report),
        "```",
    ]
    claims = [
        Claim(
            "Picking operators per stage (architecture search) finds models that beat the "
            "hand-designed ones on accuracy and measured latency",
            "dominated: " + ", ".join(d["hand_designed"] for d in dominated)
            if dominated
            else "no hand-designed model is dominated by the searched front",
            bool(dominated),
            "a searched front model with higher-or-equal top-1 and lower-or-equal measured "
            "latency (one strictly) than a hand-designed one",
        ),
        Claim(
            "Whole-model latency can be predicted from a per-layer table measured once",
            f"{100 * within:.0f}% of {p['n']} held-out candidates within +-10%, Spearman "
            + ("n/a" if p["spearman"] is None else f"{p['spearman']:.2f}")
            if within is not None
            else "no candidate measured",
            None if within is None else within >= 0.8,
            ">= 80% of candidates within +-10% of measured latency",
        ),
    ]
    return Section(TITLE, "\n".join(md), data=report, plots=[plot], claims=claims)


def _describe(overrides: dict) -> str:
    """Stages as 'ds64x1 ir128x2(e4,k5) ...' for the table."""
    parts = []
    for s in overrides.get("stages", []):
        extra = []
        if "expand_ratio" in s:
            extra.append(f"e{s['expand_ratio']:g}")
        if s.get("kernel_size", 3) != 3:
            extra.append(f"k{s['kernel_size']}")
        parts.append(
            f"{s['block']}{s['channels']}x{s['depth']}" + (f"({','.join(extra)})" if extra else "")
        )
    return " ".join(parts)


__all__ = ["TITLE", "search_section"]
