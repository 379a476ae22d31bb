"""The search's figures: objectives as minimized values, fronts, the hypervolume, the table,
the plots and the text summary; and the list of built-in spaces.

The hypervolume is pymoo's (imported when one is computed). Objectives are minimized here:
accuracy as 1 - top-1, latency in ms (measured; the search itself sees the predicted figure),
MACs and parameters in millions.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archopt.pareto import pareto_front
from archopt.report import save_figure


@dataclass(frozen=True)
class Objective:
    name: str
    column: str  # the record's field
    direction: str  # "min" | "max"
    label: str
    scale: float = 1.0  # minimized value = column / scale (1 - top1 for accuracy)


OBJECTIVES = {
    "accuracy": Objective("accuracy", "top1", "max", "validation top-1"),
    "latency": Objective("latency", "latency_ms", "min", "latency, batch 1 (ms)"),
    "macs": Objective("macs", "macs", "min", "MACs per image (M)", 1e6),
    "params": Objective("params", "params", "min", "parameters (M)", 1e6),
}
ACCURACY_PROXY = "validation top-1 after {epochs} epoch(s) from scratch (an early-stopped proxy)"
CSV_COLUMNS = (
    "kind",
    "index",
    "label",
    "model",
    "resolution",
    "top1",
    "params",
    "macs",
    "latency_ms",
    "latency_median_ms",
    "predicted_latency_ms",
    "train_time_s",
    "on_front",
    "overrides",
)


def parse_objectives(objectives: str | Sequence[str]) -> list[str]:
    """``"accuracy,latency"`` or a sequence of names; each measured, none twice, at least two."""
    names = objectives.split(",") if isinstance(objectives, str) else list(objectives)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ValueError(
            f"objectives must be measured quantities from {', '.join(OBJECTIVES)}, got "
            f"{unknown[0]!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"objectives must each appear once, got {','.join(names)}")
    if len(names) < 2:
        raise ValueError(
            f"objectives must name at least two quantities (a front trades one against "
            f"another), got {','.join(names) or 'none'}"
        )
    return names


def minimized(record: dict, objective: str, *, predicted: bool = False) -> float:
    """The record's value of ``objective`` as a quantity to minimize."""
    o = OBJECTIVES[objective]
    if objective == "accuracy":
        return 1.0 - float(record["top1"])
    column = "predicted_latency_ms" if predicted and objective == "latency" else o.column
    return float(record[column]) / o.scale


def hypervolume(points: np.ndarray, ref: Sequence[float]) -> float:
    """pymoo's hypervolume of minimized ``points`` (n, k) against ``ref``; 0 for none."""
    from pymoo.indicators.hv import HV

    pts = np.asarray(points, dtype=float).reshape(-1, len(ref))
    pts = pts[np.all(pts < np.asarray(ref), axis=1)]  # points beyond the reference add nothing
    return float(HV(ref_point=np.asarray(ref, dtype=float))(pts)) if len(pts) else 0.0


def front_of(records: list[dict], objectives: Sequence[str]) -> list[int]:
    """Indices of the non-dominated records on the measured objectives."""
    points = [[minimized(r, o) for o in objectives] for r in records]
    return pareto_front(points, ["min"] * len(objectives)) if points else []


def dominated_hand_designed(
    front: list[dict], hand: list[dict], objectives: Sequence[str] = ("accuracy", "latency")
) -> list[dict]:
    """Hand-designed models a front member dominates on ``objectives`` (measured values)."""
    out = []
    for h in hand:
        hv = [minimized(h, o) for o in objectives]
        for r in front:
            rv = [minimized(r, o) for o in objectives]
            if all(a <= b for a, b in zip(rv, hv)) and any(a < b for a, b in zip(rv, hv)):
                out.append(
                    {
                        "hand_designed": h["label"],
                        "by": r["index"],
                        **{o: (minimized(r, o), minimized(h, o)) for o in objectives},
                    }
                )
                break
    return out


def write_csv(report: dict) -> str:
    """The candidates and the hand-designed models as CSV text, one row each."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    w.writeheader()
    on_front = set(report["front"])
    for r in report["candidates"] + report["hand_designed"]:
        row = dict(r)
        row["on_front"] = r["kind"] == "candidate" and r["index"] in on_front
        row["overrides"] = json.dumps(r["overrides"])
        w.writerow(row)
    return buf.getvalue()


def plot_search(report: dict, out: Path) -> dict[str, str]:
    """One PNG per cost objective: accuracy against it, every candidate, the searched front
    as steps, and the hand-designed models on the same axes (without accuracy: the first two
    objectives against each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = report["objectives"]
    cands, hand = report["candidates"], report["hand_designed"]
    if not cands and not hand:  # nothing to draw (with hand-designed models only: them)
        return {}
    if "accuracy" in names:
        pairs = [(o, "accuracy") for o in names if o != "accuracy"]
    else:
        pairs = [(names[0], names[1])]
    plots = {}
    for x, y in pairs:
        ox, oy = OBJECTIVES[x], OBJECTIVES[y]

        def val(r, o):
            return float(r[o.column]) / o.scale

        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
        idx = set(front_of(cands, [x, y]))
        off = [r for i, r in enumerate(cands) if i not in idx]
        on = sorted((cands[i] for i in idx), key=lambda r: val(r, ox))
        ax.scatter(
            [val(r, ox) for r in off],
            [val(r, oy) for r in off],
            color="0.65",
            s=18,
            label=f"searched ({report['settings']['algorithm']}), dominated",
        )
        ax.scatter(
            [val(r, ox) for r in on],
            [val(r, oy) for r in on],
            color="C3",
            s=30,
            zorder=3,
            label="searched front",
        )
        if on:
            fx = [val(r, ox) for r in on]
            fy = [val(r, oy) for r in on]
            ax.step(fx, fy, where="post", color="C3", alpha=0.7, zorder=2)
        if hand:
            ax.scatter(
                [val(h, ox) for h in hand],
                [val(h, oy) for h in hand],
                marker="s",
                color="C0",
                s=36,
                zorder=4,
                label="hand-designed",
            )
            for h in hand:
                ax.annotate(
                    h["label"],
                    (val(h, ox), val(h, oy)),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color="C0",
                )
        ax.set_xscale("log")
        # plain numbers on the log axis (a 3x range reads badly as 3x10^0)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(f"{ox.label} ({'lower' if ox.direction == 'min' else 'higher'} is better)")
        ax.set_ylabel(f"{oy.label} ({'lower' if oy.direction == 'min' else 'higher'} is better)")
        ax.set_title(
            f"{report['settings']['space']['name']} space: {report['evaluations']} evaluations, "
            f"{report['accuracy_proxy'].split(' (')[0]}",
            fontsize=9,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        path = out / f"search_front_{x}.png"
        save_figure(fig, path)
        plt.close(fig)
        plots[x] = path.name
    return plots


def format_search(report: dict) -> str:
    """The search as text: settings, the front, the hypervolume, the predictor's check."""
    names = report["objectives"]
    s = report["settings"]
    bound = report["latency_bound_ms"]
    rejected = (
        f"{report['rejected']} rejected by predicted latency > {bound:.2f} ms"
        if bound is not None
        else "no latency bound"
    )
    lines = [
        f"{s['algorithm']} on space {s['space']['name']}: {report['evaluations']} evaluations "
        f"({rejected}), {report['elapsed_s']:.0f} s; accuracy: {report['accuracy_proxy']}",
        f"hypervolume {report['hypervolume']:.4g} (reference point "
        + ", ".join(f"{o}={v:.4g}" for o, v in report["reference_point"].items())
        + "; minimized: 1 - top-1, ms, M MACs, M params)",
        "",
        f"{'front':>5s} {'top-1':>7s} {'latency ms':>10s} {'pred ms':>8s} {'MMACs':>8s} "
        f"{'params':>9s} {'res':>4s}",
    ]
    by_index = {r["index"]: r for r in report["candidates"]}
    for i in report["front"]:
        r = by_index[i]
        lines.append(
            f"{i:5d} {r['top1']:7.4f} {r['latency_ms']:10.3f} {r['predicted_latency_ms']:8.3f} "
            f"{r['macs'] / 1e6:8.2f} {r['params']:9,d} {r['resolution']:4d}"
        )
    for h in report["hand_designed"]:
        lines.append(
            f"{'hand':>5s} {h['top1']:7.4f} {h['latency_ms']:10.3f} "
            f"{h['predicted_latency_ms']:8.3f} {h['macs'] / 1e6:8.2f} {h['params']:9,d} "
            f"{h['resolution']:4d}  {h['label']}"
        )
    p = report["predictor"]
    if p["n"]:
        rho = "n/a" if p["spearman"] is None else f"{p['spearman']:.3f}"
        lines += [
            "",
            f"latency predictor on {p['n']} held-out candidates: "
            f"{100 * p['within_10pct']:.0f}% within +-10% of measured, Spearman {rho}",
        ]
        q = report.get("predictor_settled")
        if q and q["n"]:
            rho = "n/a" if q["spearman"] is None else f"{q['spearman']:.3f}"
            lines.append(
                f"  with kernels and models at their fastest of {q['rounds']} rounds: "
                f"{100 * q['within_10pct']:.0f}% within +-10%, Spearman {rho}"
            )
    dom = report["dominated_hand_designed"]
    if dom:
        lines.append(
            "front members dominate (accuracy, measured latency) of: "
            + ", ".join(d["hand_designed"] for d in dom)
        )
    lines.append(
        "objectives: " + ", ".join(names) + "; plots: " + ", ".join(report["plots"].values())
    )
    return "\n".join(lines)


def list_spaces() -> list[dict]:
    from archopt.search.spaces import SPACES

    return [
        {
            "name": s.name,
            "model": s.model,
            "genes": len(s.genes()),
            "genomes": s.size,
            "description": s.description,
            "hand_designed": [h["label"] for h in s.hand_designed],
        }
        for s in SPACES.values()
    ]


def format_spaces(spaces: list[dict]) -> str:
    lines = []
    for s in spaces:
        lines.append(
            f"{s['name']}: {s['model']}, {s['genes']} choices, {s['genomes']:.3g} genomes; "
            f"{s['description']}; hand-designed: {', '.join(s['hand_designed'])}"
        )
    return "\n".join(lines)


__all__ = [
    "ACCURACY_PROXY",
    "OBJECTIVES",
    "Objective",
    "dominated_hand_designed",
    "format_search",
    "format_spaces",
    "front_of",
    "hypervolume",
    "list_spaces",
    "minimized",
    "parse_objectives",
    "plot_search",
    "write_csv",
]
