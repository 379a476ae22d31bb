"""The search: NSGA-II (or random search) over a space, judged on the measured Pareto front.

``search(space, budget=N, objectives=("accuracy", "latency"))`` proposes candidates with
pymoo's NSGA-II (Deb et al., 2002) on integer genes, or uniformly at random, and evaluates
each one in this order:

1. predict its latency from the per-layer table (``archopt.search.predictor``); a candidate
   predicted slower than the latency bound (by default the slowest hand-designed model of the
   space, predicted the same way; measured, that model is the hypervolume's reference) is
   rejected untrained: it could not add to the front's hypervolume. NSGA-II sees it as
   infeasible (a constraint), random search draws again; a rejection costs no evaluation of
   the budget.
2. train it from scratch with the space's short recipe (a few epochs on the embedded digits
   by default): an early-stopped proxy for accuracy, reported as such;
3. count its parameters and MACs and measure its latency on this machine.

NSGA-II selects on the predicted latency (the search sees the table's figure, which is cheap
and the same on a rerun); every figure reported, the front and its hypervolume, uses the
measured latency. The hypervolume is pymoo's, on minimized objectives (1 - top-1, ms, MMACs,
M params), with its reference point written beside it.

Records: ``out_dir/records.jsonl`` holds the settings, then every proposal in order (trained,
or rejected with its prediction), rewritten atomically after each one, so an interrupted
search loses at most the candidate it was training. Running again with the same settings
replays the records through the same seeded algorithm, which proposes the same candidates,
and continues where they end; a larger budget extends a finished search.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from archopt.search.evaluate import (
    Context,
    cost_figures,
    fixed_start,
    settle_latency,
    train_and_measure,
    train_hand_designed,
)
from archopt.search.predictor import LatencyPredictor
from archopt.search.propose import nsga2_proposals, random_proposals
from archopt.search.records import RECORDS, RecordFile
from archopt.search.report import (
    OBJECTIVES,
    dominated_hand_designed,
    format_search,
    format_spaces,
    front_of,
    hypervolume,
    list_spaces,
    minimized,
    parse_objectives,
    plot_search,
)
from archopt.search.result import write_result
from archopt.search.space import SearchSpace
from archopt.search.spaces import get_space

ALGORITHMS = ("nsga2", "random")
OUTPUTS = ("search.json", "search.csv")


def _progress_bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def search(
    space: str | dict | SearchSpace,
    *,
    budget: int,
    objectives: str | Sequence[str] = ("accuracy", "latency"),
    data: str = "digits",
    out_dir: str | Path = "archopt-search",
    seed: int = 0,
    algorithm: str = "nsga2",
    pop_size: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    train_size: int | None = None,
    threads: int | None = None,
    repeats: int = 20,
    max_latency_ms: float | str | None = "auto",
    hand_designed: bool = True,
    calibration_size: int = 6,
    stop_after: int | None = None,
    min_time_s: float | None = None,
    rounds: int = 1,
    round_gap_s: float = 15.0,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict:
    """Search ``space`` for ``budget`` trained candidates; write the records, table and plots.

    ``objectives``: two or more of accuracy, latency, macs, params. ``algorithm``: ``"nsga2"``
    or ``"random"`` (the baseline). ``epochs``/``batch_size``/``optimizer``/``lr`` override the
    space's recipe; ``train_size`` trains on the first N training images only (a proxy, for
    tests and tours). ``max_latency_ms``: reject candidates predicted slower ("auto": the
    slowest hand-designed model of the space, as predicted; None: no bound). ``hand_designed``:
    also train the space's hand-designed models with the same recipe for the plots.
    ``stop_after``: stop once that many candidates are trained, as if interrupted (rerun to
    continue).
    ``min_time_s``: keep searching past ``budget`` until this much search time has passed
    (equal wall time for a benchmark). ``rounds``: after the search, time every trained
    candidate's kernels and whole model ``rounds - 1`` more times, ``round_gap_s`` apart, and
    report the predictor's check on the fastest rounds too (``predictor_settled``). Returns
    what ``search.json`` holds.
    """
    _check_counts(
        budget=budget,
        seed=seed,
        repeats=repeats,
        calibration_size=calibration_size,
        stop_after=stop_after,
        train_size=train_size,
    )
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    names = parse_objectives(objectives)
    sp = get_space(space)
    recipe = _recipe(sp, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr)
    pop = pop_size if pop_size is not None else max(4, min(16, budget // 4))
    _check_int("pop_size", pop, 2)
    _check_latency_bound(max_latency_ms)
    _check_int("rounds", rounds, 1)
    if threads is not None:
        _check_int("threads", threads, 1)
    if not round_gap_s >= 0:
        raise ValueError(f"round_gap_s must be >= 0, got {round_gap_s}")
    threads = threads or torch.get_num_threads()
    from archopt.train import parse_data_spec

    data_name = str(parse_data_spec(data))
    settings = {
        "space": sp.as_dict(),
        "objectives": names,
        "algorithm": algorithm,
        "pop_size": pop if algorithm == "nsga2" else None,
        "seed": seed,
        "data": data_name,
        "train_size": train_size,
        "recipe": recipe,
        "threads": threads,
        "max_latency_ms": max_latency_ms,
        "calibration_size": calibration_size,
        "budget": budget,
        "repeats": repeats,
        "hand_designed": hand_designed,
        "min_time_s": min_time_s,
        "rounds": rounds,
    }
    out = Path(out_dir)
    records = _open_records(out, settings)
    show = sys.stderr.isatty() if progress is None else progress
    ctx = Context(
        sp,
        names,
        recipe,
        seed,
        threads,
        repeats,
        data_name,
        train_size,
        LatencyPredictor(threads=threads),
        verbose,
        {},
    )

    def log(msg: str) -> None:
        if verbose:
            print(f"[search] {msg}", file=sys.stderr, flush=True)

    ref, bound = _fix_start(ctx, records, max_latency_ms, calibration_size, log)
    limit = budget if stop_after is None else min(budget, stop_after)
    run = _Run(ctx, records, out, ref, bound, limit, stop_after, min_time_s, log)
    run.bar = _progress_bar(budget, f"{algorithm} on {sp.name}", show)
    proposals = (
        nsga2_proposals(sp, len(names), pop, seed)
        if algorithm == "nsga2"
        else random_proposals(sp, seed)
    )
    stalled = run.loop(proposals)
    n_trained = run.trained()
    if stalled:
        log(f"no new candidate in 50 rounds: stopping after {n_trained} evaluations")

    finished = stop_after is None or n_trained < stop_after
    if hand_designed and finished:
        train_hand_designed(ctx, records, log)
    if finished:
        settle_latency(ctx, records, rounds, round_gap_s, log)
    done_proposals = records.proposals()
    search_s = done_proposals[-1]["elapsed_s"] if done_proposals else 0.0
    report = write_result(ctx, records, out, ref, bound, search_s, n_trained, stalled)
    return report


def _check_counts(*, budget, seed, repeats, calibration_size, stop_after, train_size) -> None:
    _check_int("budget", budget, 1)
    _check_int("seed", seed, 0)
    _check_int("repeats", repeats, 1)
    _check_int("calibration_size", calibration_size, 0)
    if stop_after is not None:
        _check_int("stop_after", stop_after, 1)
    if train_size is not None:
        _check_int("train_size", train_size, 1)


def _check_latency_bound(max_latency_ms) -> None:
    if isinstance(max_latency_ms, str) and max_latency_ms != "auto":
        raise ValueError(f"max_latency_ms must be a number, 'auto' or None, got {max_latency_ms!r}")
    if isinstance(max_latency_ms, (int, float)) and not max_latency_ms > 0:
        raise ValueError(f"max_latency_ms must be > 0, got {max_latency_ms}")


def _recipe(sp: SearchSpace, **overrides) -> dict:
    """The space's training recipe with the arguments given (not None) in place, completed."""
    recipe = dict(sp.recipe)
    for key, value in overrides.items():
        if value is not None:
            recipe[key] = value
    recipe.setdefault("epochs", 3)
    recipe.setdefault("batch_size", 64)
    recipe.setdefault("optimizer", "sgd")
    recipe.setdefault("lr", None)
    recipe.setdefault("warmup_epochs", 1.0)
    _check_int("epochs", recipe["epochs"], 1)
    return recipe


def _open_records(out: Path, settings: dict) -> RecordFile:
    """The records in ``out`` (checked against ``settings``); older outputs removed."""
    out.mkdir(parents=True, exist_ok=True)
    records = RecordFile.open(out / RECORDS, settings)
    for stale in OUTPUTS:  # a failed run must not leave an older result looking current
        (out / stale).unlink(missing_ok=True)
    return records


def _fix_start(ctx: Context, records: RecordFile, max_latency_ms, calibration_size, log):
    """The reference point and latency bound: from the records' header, or fixed now and
    written there; the predictor takes the header's calibration."""
    header = records.header
    if "reference" not in header:
        header.update(fixed_start(ctx, max_latency_ms, calibration_size, log))
        records.write()
    ctx.predictor.a, ctx.predictor.b = header["calibration"]["a"], header["calibration"]["b"]
    ref = [header["reference"][o] for o in ctx.objectives]
    return ref, header["latency_bound_ms"]


class _Run:
    """One session of the search loop: replays the recorded proposals in order, then
    evaluates (rejects, or trains and measures) and records the new ones."""

    def __init__(self, ctx, records, out, ref, bound, limit, stop_after, min_time_s, log):
        self.ctx, self.records, self.out, self.ref, self.bound = ctx, records, out, ref, bound
        self.limit, self.stop_after, self.min_time_s, self.log = limit, stop_after, min_time_s, log
        self.recorded = records.proposals()
        self.cursor = 0
        self.seen: dict[str, dict] = {}
        self.elapsed_before = self.recorded[-1]["elapsed_s"] if self.recorded else 0.0
        self.session_start = time.perf_counter()
        self.bar = None

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def trained(self) -> int:
        return sum(1 for e in self.seen.values() if e["kind"] == "candidate")

    def done(self) -> bool:
        n = self.trained()
        if n < self.limit:
            return False
        if self.stop_after is not None and n >= self.stop_after:
            return True
        return self.min_time_s is None or self.elapsed() >= self.min_time_s

    def loop(self, proposals) -> bool:
        """Evaluate proposals and tell the algorithm their figures until done; True if it
        stalled (nothing new in 50 rounds: the algorithm has converged)."""
        idle, stalled = 0, False
        try:
            for genomes, tell in proposals:
                if self.done():
                    break
                F, G = [], []
                before = len(self.seen)
                for g in genomes:
                    if self.done():
                        break
                    f, c = self.search_point(self.evaluate(g))
                    F.append(f)
                    G.append(c)
                if F:
                    tell(F, G)
                idle = idle + 1 if len(self.seen) == before else 0
                if idle >= 50:
                    stalled = True
                    break
        finally:
            if self.bar is not None:
                self.bar.close()
        return stalled

    def evaluate(self, genes: list[int]) -> dict:
        """The record of ``genes``: seen this session, next in the records, or new."""
        ctx, sp, seen, recorded = self.ctx, self.ctx.space, self.seen, self.recorded
        cand = sp.decode(genes)
        if cand.key in seen:
            return seen[cand.key]
        if self.cursor < len(recorded):
            entry = recorded[self.cursor]
            if entry["key"] != cand.key:
                raise ValueError(
                    f"the records in {self.out} do not follow from these settings: proposal "
                    f"{self.cursor} is {entry['key']} in the records, {cand.key} now (was the "
                    "space or pymoo changed?); choose another output folder"
                )
            self.cursor += 1
        else:
            entry = {
                "kind": "rejected",
                "index": len(self.records.proposals()),
                "genes": genes,
                "key": cand.key,
                **cand.as_dict(),
                **cost_figures(ctx, cand),
            }
            if self.bound is None or entry["predicted_latency_ms"] <= self.bound:
                entry["kind"] = "candidate"
                self.log(f"training {cand.resolution}px {json.dumps(cand.overrides)[:120]} ...")
                entry.update(train_and_measure(ctx, cand))
            entry["elapsed_s"] = self.elapsed()
            self.records.append(entry)
        seen[cand.key] = entry
        if entry["kind"] == "candidate" and self.bar is not None:
            self._show_front()
        return entry

    def _show_front(self) -> None:
        names = self.ctx.objectives
        done_rows = [e for e in self.seen.values() if e["kind"] == "candidate"]
        idx = front_of(done_rows, names)
        hv = hypervolume(
            np.array([[minimized(done_rows[i], o) for o in names] for i in idx]), self.ref
        )
        self.bar.update(1)
        self.bar.set_postfix(front=len(idx), hv=f"{hv:.4g}", refresh=True)

    def search_point(self, entry: dict) -> tuple[list[float], list[float]]:
        """What the algorithm sees of ``entry``: objectives on the predicted latency, and the
        constraint (predicted latency - bound <= 0)."""
        names, ref, bound = self.ctx.objectives, self.ref, self.bound
        if entry["kind"] == "rejected":  # infeasible: F barely matters, the constraint decides
            f = [
                ref[i] if o == "accuracy" else minimized(entry, o, predicted=True)
                for i, o in enumerate(names)
            ]
        else:
            f = [minimized(entry, o, predicted=True) for o in names]
        g = entry["predicted_latency_ms"] - bound if bound is not None else -1.0
        return f, [g]


__all__ = [
    "ALGORITHMS",
    "OBJECTIVES",
    "RecordFile",
    "dominated_hand_designed",
    "format_search",
    "format_spaces",
    "hypervolume",
    "list_spaces",
    "minimized",
    "parse_objectives",
    "plot_search",
    "search",
]
