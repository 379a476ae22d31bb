"""The search: NSGA-II (or random search) over a space, judged on the measured Pareto front.

``search(space, budget=N, objectives=("accuracy", "latency"))`` proposes candidates with
pymoo's NSGA-II (Deb et al., 2002) on integer genes, or uniformly at random, and evaluates
each one in this order:

1. predict its latency from the per-layer table (``archopt.search.predictor``); a candidate
   predicted slower than the latency bound (by default the slowest hand-designed model of the
   space, which is also the hypervolume's reference) is rejected untrained: it could not
   add to the front's hypervolume. NSGA-II sees it as infeasible (a constraint), random search
   draws again; a rejection costs no evaluation of the budget.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from archopt.io import atomic_write_text
from archopt.measure import count_macs, count_params, cpu_name, measure_latency
from archopt.pareto import pareto_front
from archopt.search.predictor import LatencyPredictor, check_predictions
from archopt.search.report import (
    ACCURACY_PROXY,
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
    write_csv,
)
from archopt.search.space import Candidate, SearchSpace
from archopt.search.spaces import get_space

ALGORITHMS = ("nsga2", "random")
RECORDS = "records.jsonl"
OUTPUTS = ("search.json", "search.csv")
# Settings that may change when a search is continued without changing what it proposes.
RESUME_FREE = ("budget", "repeats", "hand_designed", "min_time_s")


# ---------------------------------------------------------------------------- records file


class RecordFile:
    """``records.jsonl``: a header line with the settings, then one line per proposal.

    Every change rewrites the whole file atomically (a few hundred lines at most), so a crash
    leaves the previous complete file, never half a line.
    """

    def __init__(self, path: Path, header: dict, entries: list[dict]) -> None:
        self.path, self.header, self.entries = path, header, entries

    @classmethod
    def open(cls, path: Path, settings: dict) -> RecordFile:
        if not path.exists():
            return cls(path, {"kind": "header", "settings": settings}, [])
        lines = path.read_text().splitlines()
        parsed = []
        for i, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                if not isinstance(item, dict) or "kind" not in item:
                    raise ValueError("not a record object")
            except ValueError as e:
                raise ValueError(
                    f"records file {path} is broken at line {i} ({e}); it was left as it is: "
                    "repair or remove that line, or choose another output folder"
                ) from None
            parsed.append(item)
        if not parsed or parsed[0]["kind"] != "header":
            raise ValueError(
                f"records file {path} does not start with a header line; it was left as it "
                "is: choose another output folder"
            )
        header = parsed[0]
        mine = {k: v for k, v in settings.items() if k not in RESUME_FREE}
        theirs = {k: v for k, v in header.get("settings", {}).items() if k not in RESUME_FREE}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            listed = "; ".join(
                f"{k}: records have {theirs.get(k)!r}, got {mine.get(k)!r}" for k in diff
            )
            raise ValueError(
                f"cannot continue the search in {path.parent} with other settings ({listed}); "
                "choose another output folder"
            )
        header["settings"] = settings
        return cls(path, header, parsed[1:])

    def proposals(self) -> list[dict]:
        return [e for e in self.entries if e["kind"] in ("candidate", "rejected")]

    def hand_designed(self) -> list[dict]:
        return [e for e in self.entries if e["kind"] == "hand_designed"]

    def append(self, entry: dict) -> None:
        self.entries.append(entry)
        self.write()

    def write(self) -> None:
        lines = [self.header, *self.entries]
        atomic_write_text(self.path, "".join(json.dumps(x) + "\n" for x in lines))


# ------------------------------------------------------------------------------- the search


@dataclass
class _Context:
    space: SearchSpace
    objectives: list[str]
    recipe: dict
    seed: int
    threads: int
    repeats: int
    data: str
    train_size: int | None
    predictor: LatencyPredictor
    verbose: bool
    _images: dict

    def images(self, resolution: int):
        from archopt.train import load_data, parse_data_spec

        if resolution not in self._images:
            data = load_data(parse_data_spec(self.data), resolution=resolution)
            if self.train_size is not None and self.train_size < len(data.train):
                from archopt.train.data import TensorImages

                if not isinstance(data.train, TensorImages):
                    raise ValueError(
                        f"train_size works on in-memory data (digits, cifar10), got {self.data}"
                    )
                n = self.train_size
                data.train = TensorImages(data.train.images[:n], data.train.labels[:n])
            self._images[resolution] = data
        return self._images[resolution]

    def shape(self, resolution: int) -> tuple[int, int, int, int]:
        return (1, self.images(resolution).in_chans, resolution, resolution)

    def build(self, cand: Candidate):
        data = self.images(cand.resolution)
        return cand.build(data.num_classes, data.in_chans).eval()


def _cost_figures(ctx: _Context, cand: Candidate) -> dict:
    """Params, MACs and predicted latency of an untrained build of ``cand``."""
    torch.manual_seed(0)
    model = ctx.build(cand)
    shape = ctx.shape(cand.resolution)
    x = torch.randn(shape)
    p = ctx.predictor.predict(model, (x,))
    return {
        "params": count_params(model),
        "macs": count_macs(model, shape),
        "predicted_latency_ms": p.ms,
        "kernel_sum_ms": p.kernel_sum_ms,
    }


def _train_and_measure(ctx: _Context, cand: Candidate) -> dict:
    from archopt.train import train

    r = ctx.recipe
    images = ctx.images(cand.resolution)
    t0 = time.perf_counter()
    result = train(
        cand.model,
        images,
        epochs=r["epochs"],
        batch_size=r["batch_size"],
        optimizer=r["optimizer"],
        lr=r["lr"],
        warmup_epochs=r["warmup_epochs"],
        resolution=cand.resolution,
        channels=images.in_chans,
        model_overrides=cand.overrides,
        bf16="off",  # one arithmetic for every candidate; bf16 on CPUs without it is noise
        seed=ctx.seed,
        progress=False,
        verbose=False,
    )
    train_s = time.perf_counter() - t0
    model = result.model.to("cpu").eval()
    lat = measure_latency(
        model,
        torch.randn(ctx.shape(cand.resolution)),
        warmup=3,
        repeats=ctx.repeats,
        threads=ctx.threads,
    )
    return {
        "top1": result.top1,
        "latency_ms": lat.min_ms,
        "latency_median_ms": lat.median_ms,
        "latency_p90_ms": lat.p90_ms,
        "train_time_s": train_s,
        "history": [round(h["val_top1"], 4) for h in result.history],
    }


def _measure_untrained(ctx: _Context, cand: Candidate) -> float:
    torch.manual_seed(0)
    model = ctx.build(cand)
    x = torch.randn(ctx.shape(cand.resolution))
    return measure_latency(model, x, warmup=3, repeats=ctx.repeats, threads=ctx.threads).min_ms


def _progress_bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def _nsga2_proposals(
    space: SearchSpace, n_obj: int, pop_size: int, seed: int
) -> Iterator[tuple[list[list[int]], Callable]]:
    """Generations of NSGA-II: yields (genomes, tell); call tell(F, G) with the first k rows."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.core.repair import Repair
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.problems.static import StaticProblem

    class Canonical(Repair):
        """Rounded genes, then the ones the network does not use set to 0 (one genome each)."""

        def _do(self, problem, X, **kwargs):
            X = np.clip(np.round(X), problem.xl, problem.xu).astype(int)
            return np.array([space.canonical(x) for x in X], dtype=int)

    genes = space.genes()
    problem = Problem(
        n_var=len(genes),
        n_obj=n_obj,
        n_ieq_constr=1,
        xl=np.zeros(len(genes)),
        xu=np.array([len(g.choices) - 1 for g in genes], dtype=float),
        vtype=int,
    )
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        repair=Canonical(),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_evals", 10**12), seed=seed)
    while True:
        pop = algorithm.ask()
        if pop is None:  # no offspring that is not a duplicate: the population has converged
            return
        X = [[int(v) for v in x] for x in pop.get("X")]
        told = {}

        def tell(F, G, pop=pop, told=told):
            k = len(F)
            part = pop[:k]
            static = StaticProblem(problem, F=np.asarray(F, float), G=np.asarray(G, float))
            Evaluator().eval(static, part)
            algorithm.tell(infills=part)
            told["k"] = k

        yield X, tell


def _random_proposals(space: SearchSpace, seed: int) -> Iterator[tuple[list[list[int]], Callable]]:
    rng = np.random.default_rng(seed)
    while True:
        yield [space.sample(rng)], lambda F, G: None


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
    progress: bool | None = None,
    verbose: bool = True,
) -> dict:
    """Search ``space`` for ``budget`` trained candidates; write the records, table and plots.

    ``objectives``: two or more of accuracy, latency, macs, params. ``algorithm``: ``"nsga2"``
    or ``"random"`` (the baseline). ``epochs``/``batch_size``/``optimizer``/``lr`` override the
    space's recipe; ``train_size`` trains on the first N training images only (a proxy, for
    tests and tours). ``max_latency_ms``: reject candidates predicted slower ("auto": the
    slowest hand-designed model of the space, None: no bound). ``hand_designed``: also train
    the space's hand-designed models with the same recipe for the plots. ``stop_after``: stop
    once that many candidates are trained, as if interrupted (rerun to continue).
    ``min_time_s``: keep searching past ``budget`` until this much search time has passed
    (equal wall time for a benchmark). Returns what ``search.json`` holds.
    """
    _check_int("budget", budget, 1)
    _check_int("seed", seed, 0)
    _check_int("repeats", repeats, 1)
    _check_int("calibration_size", calibration_size, 0)
    if stop_after is not None:
        _check_int("stop_after", stop_after, 1)
    if train_size is not None:
        _check_int("train_size", train_size, 1)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    names = parse_objectives(objectives)
    sp = get_space(space)
    recipe = dict(sp.recipe)
    for key, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("optimizer", optimizer),
        ("lr", lr),
    ):
        if value is not None:
            recipe[key] = value
    recipe.setdefault("epochs", 3)
    recipe.setdefault("batch_size", 64)
    recipe.setdefault("optimizer", "sgd")
    recipe.setdefault("lr", None)
    recipe.setdefault("warmup_epochs", 1.0)
    _check_int("epochs", recipe["epochs"], 1)
    pop = pop_size if pop_size is not None else max(4, min(16, budget // 4))
    _check_int("pop_size", pop, 2)
    if isinstance(max_latency_ms, str) and max_latency_ms != "auto":
        raise ValueError(f"max_latency_ms must be a number, 'auto' or None, got {max_latency_ms!r}")
    if isinstance(max_latency_ms, (int, float)) and not max_latency_ms > 0:
        raise ValueError(f"max_latency_ms must be > 0, got {max_latency_ms}")
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
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = RecordFile.open(out / RECORDS, settings)
    for stale in OUTPUTS:  # a failed run must not leave an older result looking current
        (out / stale).unlink(missing_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    ctx = _Context(
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

    header = records.header
    if "reference" not in header:
        header.update(_start(ctx, max_latency_ms, calibration_size, log))
        records.write()
    ctx.predictor.a, ctx.predictor.b = header["calibration"]["a"], header["calibration"]["b"]
    ref = [header["reference"][o] for o in names]
    bound = header["latency_bound_ms"]

    recorded = records.proposals()
    cursor = 0
    seen: dict[str, dict] = {}
    elapsed_before = recorded[-1]["elapsed_s"] if recorded else 0.0
    session_start = time.perf_counter()
    limit = budget if stop_after is None else min(budget, stop_after)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - session_start

    def done() -> bool:
        n = sum(1 for e in seen.values() if e["kind"] == "candidate")
        if n < limit:
            return False
        if stop_after is not None and n >= stop_after:
            return True
        return min_time_s is None or elapsed() >= min_time_s

    bar = _progress_bar(budget, f"{algorithm} on {sp.name}", show)

    def evaluate(genes: list[int]) -> dict:
        nonlocal cursor
        cand = sp.decode(genes)
        if cand.key in seen:
            return seen[cand.key]
        if cursor < len(recorded):
            entry = recorded[cursor]
            if entry["key"] != cand.key:
                raise ValueError(
                    f"the records in {out} do not follow from these settings: proposal "
                    f"{cursor} is {entry['key']} in the records, {cand.key} now (was the space "
                    "or pymoo changed?); choose another output folder"
                )
            cursor += 1
        else:
            entry = {
                "kind": "rejected",
                "index": len(records.proposals()),
                "genes": genes,
                "key": cand.key,
                **cand.as_dict(),
                **_cost_figures(ctx, cand),
            }
            if bound is None or entry["predicted_latency_ms"] <= bound:
                entry["kind"] = "candidate"
                log(f"training {cand.resolution}px {json.dumps(cand.overrides)[:120]} ...")
                entry.update(_train_and_measure(ctx, cand))
            entry["elapsed_s"] = elapsed()
            records.append(entry)
        seen[cand.key] = entry
        if entry["kind"] == "candidate" and bar is not None:
            done_rows = [e for e in seen.values() if e["kind"] == "candidate"]
            idx = front_of(done_rows, names)
            hv = hypervolume(
                np.array([[minimized(done_rows[i], o) for o in names] for i in idx]), ref
            )
            bar.update(1)
            bar.set_postfix(front=len(idx), hv=f"{hv:.4g}", refresh=True)
        return entry

    def search_point(entry: dict) -> tuple[list[float], list[float]]:
        if entry["kind"] == "rejected":  # infeasible: F barely matters, the constraint decides
            f = [
                ref[i] if o == "accuracy" else minimized(entry, o, predicted=True)
                for i, o in enumerate(names)
            ]
        else:
            f = [minimized(entry, o, predicted=True) for o in names]
        g = entry["predicted_latency_ms"] - bound if bound is not None else -1.0
        return f, [g]

    proposals = (
        _nsga2_proposals(sp, len(names), pop, seed)
        if algorithm == "nsga2"
        else _random_proposals(sp, seed)
    )
    idle, stalled = 0, False
    try:
        for genomes, tell in proposals:
            if done():
                break
            F, G = [], []
            before = len(seen)
            for g in genomes:
                if done():
                    break
                f, c = search_point(evaluate(g))
                F.append(f)
                G.append(c)
            if F:
                tell(F, G)
            idle = idle + 1 if len(seen) == before else 0
            if idle >= 50:  # nothing new in 50 rounds: the algorithm has converged
                stalled = True
                break
    finally:
        if bar is not None:
            bar.close()
    n_trained = sum(1 for e in seen.values() if e["kind"] == "candidate")
    if stalled:
        log(f"no new candidate in 50 rounds: stopping after {n_trained} evaluations")

    if hand_designed and (stop_after is None or n_trained < stop_after):
        _train_hand_designed(ctx, records, log)
    done_proposals = records.proposals()
    search_s = done_proposals[-1]["elapsed_s"] if done_proposals else 0.0
    report = _report(ctx, records, out, ref, bound, search_s, n_trained, stalled)
    return report


def _start(ctx: _Context, max_latency_ms, calibration_size: int, log) -> dict:
    """Reference point, latency bound and predictor calibration, fixed before the search."""
    sp = ctx.space
    hand = sp.hand_designed_candidates()
    chance = 1.0 - 1.0 / ctx.images(sp.resolution[0]).num_classes
    log(f"calibrating the latency predictor on {calibration_size} candidates ...")
    rng = np.random.default_rng(10_000)  # not the search's seed: the same for every run
    calib = [sp.decode(sp.sample(rng)) for _ in range(calibration_size)]
    models = []
    for c in calib:
        torch.manual_seed(0)
        models.append((ctx.build(c), (torch.randn(ctx.shape(c.resolution)),)))
    name = f"{sp.name}:{hash_space(sp)}:{ctx.shape(sp.resolution[0])[1]}"
    calibration = ctx.predictor.calibrate(name, models, repeats=ctx.repeats)
    basis = hand or calib
    log(f"measuring {len(basis)} {'hand-designed' if hand else 'calibration'} models ...")
    costs = [{"latency": _measure_untrained(ctx, c), **_cost_figures(ctx, c)} for c in basis]
    reference = {
        "accuracy": chance,
        "latency": max(c["latency"] for c in costs),
        "macs": max(c["macs"] for c in costs) / 1e6,
        "params": max(c["params"] for c in costs) / 1e6,
    }
    bound = reference["latency"] if max_latency_ms == "auto" else max_latency_ms
    return {
        "reference": reference,
        "reference_rule": "accuracy: chance (1 - 1/classes as error); costs: the largest among "
        + ("the hand-designed models" if hand else "the calibration candidates")
        + " of the space, measured (latency: fastest of the repeats) or counted",
        "latency_bound_ms": bound,
        "calibration": {k: calibration[k] for k in ("a", "b", "kernel_sum_ms", "measured_ms")},
        "calibration_candidates": [c.key for c in calib],
        "environment": {
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "threads": ctx.threads,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }


def hash_space(space: SearchSpace) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(space.as_dict(), sort_keys=True).encode()).hexdigest()[:10]


def _train_hand_designed(ctx: _Context, records: RecordFile, log) -> None:
    have = {e["label"] for e in records.hand_designed()}
    for cand in ctx.space.hand_designed_candidates():
        if cand.label in have:
            continue
        log(f"training hand-designed {cand.label} ...")
        entry = {
            "kind": "hand_designed",
            "key": cand.key,
            **cand.as_dict(),
            **_cost_figures(ctx, cand),
            **_train_and_measure(ctx, cand),
        }
        records.append(entry)


def _report(ctx, records: RecordFile, out: Path, ref, bound, elapsed_s, n_trained, stalled):
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
