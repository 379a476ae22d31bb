"""The search's result: what ``search.json`` holds (the settings, the measured front and its
hypervolume beside the predicted front's and the hand-designed models', the predictor's check,
every candidate), built from the records and written with the table and the plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from archopt.io import atomic_write_text
from archopt.pareto import pareto_front
from archopt.search.evaluate import Context
from archopt.search.predictor import check_predictions
from archopt.search.records import RecordFile
from archopt.search.report import (
    ACCURACY_PROXY,
    dominated_hand_designed,
    front_of,
    hypervolume,
    minimized,
    plot_search,
    write_csv,
)


def write_result(
    ctx: Context, records: RecordFile, out: Path, ref, bound, elapsed_s, n_trained, stalled
) -> dict:
    """Build the result from the records, write ``search.json``, ``search.csv`` and the
    plots in ``out``, and return it."""
    names = ctx.objectives
    proposals = records.proposals()
    cands = [e for e in proposals if e["kind"] == "candidate"]
    hand = records.hand_designed()
    idx = front_of(cands, names)
    front = [cands[i] for i in idx]
    pts = np.array([[minimized(r, o) for o in names] for r in front])
    pred_idx = (
        pareto_front(
            [[minimized(r, o, predicted=True) for o in names] for r in cands], ["min"] * len(names)
        )
        if cands
        else []
    )
    pred_front = [cands[i] for i in pred_idx]
    check = check_predictions(
        [r["predicted_latency_ms"] for r in cands], [r["latency_ms"] for r in cands]
    )
    settled = [r["settled"] for r in cands if "settled" in r]
    check_settled = (
        check_predictions(
            [r["predicted_latency_ms"] for r in settled], [r["latency_ms"] for r in settled]
        )
        if settled
        else None
    )
    hand_front = front_of(hand, names)
    report = {
        "settings": records.header["settings"],
        "environment": records.header["environment"],
        "accuracy_proxy": ACCURACY_PROXY.format(epochs=ctx.recipe["epochs"])
        + (f", first {ctx.train_size} training images" if ctx.train_size else ""),
        "latency_measure": "batch 1, fastest of the timed repeats (median kept beside it)",
        "evaluations": n_trained,
        "rejected": sum(1 for e in proposals if e["kind"] == "rejected"),
        "stalled": stalled,
        "elapsed_s": elapsed_s,  # the search loop's time, all sessions (no hand-designed)
        "objectives": names,
        "reference_point": {o: r for o, r in zip(names, ref)},
        "reference_rule": records.header["reference_rule"],
        "latency_bound_ms": bound,
        # records of an earlier archopt: their bound was the slowest hand-designed model measured
        "latency_bound_rule": records.header.get("latency_bound_rule", "measured"),
        "hypervolume": hypervolume(pts, ref) if len(front) else 0.0,
        "hypervolume_predicted_front": hypervolume(
            np.array([[minimized(r, o, predicted=True) for o in names] for r in pred_front]), ref
        )
        if pred_front
        else 0.0,
        "hypervolume_hand_designed": hypervolume(
            np.array([[minimized(hand[i], o) for o in names] for i in hand_front]), ref
        )
        if hand
        else None,
        "front": [r["index"] for r in front],
        "predictor": {**check, "calibration": records.header["calibration"]},
        # the same check with every kernel and whole model at its fastest of several rounds
        "predictor_settled": (
            {**check_settled, "rounds": settled[0]["rounds"]} if check_settled else None
        ),
        "dominated_hand_designed": dominated_hand_designed(front, hand) if hand else [],
        "candidates": cands,
        "rejected_candidates": [e for e in proposals if e["kind"] == "rejected"],
        "hand_designed": hand,
        "plots": {},
    }
    report["plots"] = plot_search(report, out)
    atomic_write_text(out / "search.csv", write_csv(report))
    atomic_write_text(out / "search.json", json.dumps(report, indent=1, default=float) + "\n")
    return report


__all__ = ["write_result"]
