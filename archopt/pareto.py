"""Non-dominated sets: "use the Pareto frontier to judge whether you are doing better".

``pareto_front(points, objectives)`` returns the indices of the points that no other point
dominates, for any number of objectives, each minimized (latency, MACs, memory) or maximized
(accuracy, tokens/s). ``plot_front`` draws one two-objective front as a PNG.

A point dominates another when it is at least as good in every objective and strictly better
in at least one. Consequences, by design: duplicates do not dominate each other, so equal
points are all on the front or all off it; a point that ties the best in one objective but is
worse in another is off the front.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DIRECTIONS = ("min", "max")


def _directions(objectives, maximize) -> tuple[list[str] | None, list[str]]:
    """(column names or None, "min"/"max" per objective) from either calling convention."""
    if (objectives is None) == (maximize is None):
        raise ValueError(
            "pareto_front needs exactly one of objectives (e.g. ['min', 'max'] or "
            "{'latency_ms': 'min', 'top1': 'max'}) and maximize (one bool per objective)"
        )
    if maximize is not None:
        return None, ["max" if m else "min" for m in maximize]
    if isinstance(objectives, str):
        raise ValueError(
            f"objectives must be a sequence of 'min'/'max' or a mapping column -> 'min'/'max', "
            f"got the string {objectives!r}"
        )
    if isinstance(objectives, Mapping):
        names, dirs = list(objectives), [objectives[k] for k in objectives]
    else:
        names, dirs = None, list(objectives)
    for d in dirs:
        if d not in DIRECTIONS:
            raise ValueError(f"each objective must be 'min' or 'max', got {d!r}")
    if not dirs:
        raise ValueError("pareto_front needs at least one objective, got none")
    return names, dirs


def _matrix(points, names: list[str] | None, n_obj: int) -> np.ndarray:
    """The points as an (n, n_obj) float array; checks columns, lengths and NaN."""
    rows = []
    for i, p in enumerate(points):
        if names is not None:
            if not isinstance(p, Mapping):
                raise ValueError(
                    f"objectives name columns {names}, so every point must be a mapping; "
                    f"point {i} is a {type(p).__name__}"
                )
            missing = [k for k in names if k not in p]
            if missing:
                raise ValueError(
                    f"objective {missing[0]!r} is not a column of point {i}: expected one of "
                    f"{sorted(p)}"
                )
            row = [p[k] for k in names]
        else:
            row = list(p)
            if len(row) != n_obj:
                raise ValueError(
                    f"every point needs {n_obj} objective values (one per objective), point {i} "
                    f"has {len(row)}"
                )
        try:
            values = [float(v) for v in row]
        except (TypeError, ValueError) as e:
            raise ValueError(f"point {i} has a non-numeric objective value: {row}") from e
        bad = [k for k, v in enumerate(values) if math.isnan(v)]
        if bad:
            label = names[bad[0]] if names is not None else f"objective {bad[0]}"
            raise ValueError(f"point {i} has NaN for {label}: a front needs measured values")
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), n_obj)


def _front_2d(a: np.ndarray) -> np.ndarray:
    """Non-dominated mask for two minimized objectives, O(n log n).

    Sorted by (x, y), a point is dominated by one with the same x and a smaller y, or by any
    point with a smaller x and a y at most its own; so walk the groups of equal x keeping the
    smallest y seen so far.
    """
    order = np.lexsort((a[:, 1], a[:, 0]))
    x, y = a[order, 0], a[order, 1]
    keep = np.zeros(len(a), dtype=bool)
    best_y = None  # the smallest y among points with a strictly smaller x (none yet)
    start = 0
    while start < len(x):
        end = start
        while end < len(x) and x[end] == x[start]:
            end += 1
        group_min = y[start]  # sorted by y inside the group
        # Not "< inf" for the first group: a point whose y is infinite is still on the front
        # when no point has a smaller x.
        if best_y is None or group_min < best_y:
            keep[order[start:end][y[start:end] == group_min]] = True
        best_y = group_min if best_y is None else min(best_y, group_min)
        start = end
    return keep


def _front_nd(a: np.ndarray) -> np.ndarray:
    """Non-dominated mask for any number of minimized objectives.

    In lexicographic order every dominator of a point comes before it, and a point dominated
    by a dominated point is dominated by that one's dominator too, so each point is checked
    against the front found so far only.
    """
    order = np.lexsort(a.T[::-1])
    keep = np.zeros(len(a), dtype=bool)
    front = np.empty((0, a.shape[1]))
    for i in order:
        p = a[i]
        dominated = np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1))
        if not dominated:
            keep[i] = True
            front = np.vstack([front, p])
    return keep


def pareto_front(
    points: Sequence[Sequence[float]] | Sequence[Mapping[str, float]],
    objectives: Sequence[str] | Mapping[str, str] | None = None,
    *,
    maximize: Sequence[bool] | None = None,
) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    ``objectives``: one ``"min"`` or ``"max"`` per coordinate of each point, or a mapping
    ``{column: "min" | "max"}`` when the points are records (dicts), e.g.
    ``pareto_front(rows, {"latency_ms": "min", "top1": "max"})``. ``maximize`` (one bool per
    objective) is the older spelling of the same thing. Equal points are all kept. NaN is an
    error: an unmeasured point can be neither on nor off a front.
    """
    points = list(points)
    names, dirs = _directions(objectives, maximize)
    if not points:
        return []
    a = _matrix(points, names, len(dirs))
    a = a * np.array([-1.0 if d == "max" else 1.0 for d in dirs])  # everything minimized
    if a.shape[1] == 1:
        keep = a[:, 0] == a[:, 0].min()
    elif a.shape[1] == 2:
        keep = _front_2d(a)
    else:
        keep = _front_nd(a)
    return [int(i) for i in np.flatnonzero(keep)]


def pareto_front_brute_force(
    points: Sequence[Sequence[float]], objectives: Sequence[str]
) -> list[int]:
    """The definition, O(n^2): the oracle ``pareto_front`` is tested against."""
    signs = [-1.0 if d == "max" else 1.0 for d in objectives]
    keyed = [[s * float(v) for s, v in zip(signs, p)] for p in points]

    def dominates(q, p) -> bool:
        return all(x <= y for x, y in zip(q, p)) and any(x < y for x, y in zip(q, p))

    return [i for i, p in enumerate(keyed) if not any(dominates(q, p) for q in keyed)]


def plot_front(
    records: Sequence[Mapping],
    x: str,
    y: str,
    path: str | Path,
    *,
    x_objective: str = "min",
    y_objective: str = "max",
    label: str = "name",
    logx: bool = False,
    logy: bool = False,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Path:
    """A PNG of ``records`` on axes ``x`` and ``y``: every point labelled, the front as steps.

    The step line is the front's attainment curve: with ``x`` minimized and ``y`` maximized,
    the best ``y`` reachable within a budget of ``x``, so everything under it is beaten.
    """
    from archopt.report import pyplot, save_figure

    plt = pyplot()
    from matplotlib import ticker

    records = list(records)
    if not records:
        raise ValueError("plot_front needs at least one record, got none")
    front = set(pareto_front(records, {x: x_objective, y: y_objective}))
    xs = [float(r[x]) for r in records]
    ys = [float(r[y]) for r in records]
    for axis, on, vals in (("x", logx, xs), ("y", logy, ys)):
        if on and min(vals) <= 0:
            raise ValueError(
                f"a log-scale {axis} axis needs positive values, got {min(vals)} in "
                f"{x if axis == 'x' else y!r}"
            )
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    off = [i for i in range(len(records)) if i not in front]
    on = sorted(front, key=lambda i: (xs[i], ys[i]))
    ax.scatter([xs[i] for i in off], [ys[i] for i in off], color="0.6", label="dominated", zorder=2)
    ax.scatter([xs[i] for i in on], [ys[i] for i in on], color="C3", label="Pareto front", zorder=3)
    if on:
        # Minimized x: a front point's y is attainable from its x rightwards ("post"), so the
        # line runs on to the largest x; maximized x: leftwards ("pre"), from the smallest.
        fx, fy = [xs[i] for i in on], [ys[i] for i in on]
        if x_objective == "min":
            fx, fy, where = [*fx, max(xs)], [*fy, fy[-1]], "post"
        else:
            fx, fy, where = [min(xs), *fx], [fy[0], *fy], "pre"
        ax.step(fx, fy, where=where, color="C3", alpha=0.7, zorder=1)
    for i, r in enumerate(records):
        ax.annotate(
            str(r.get(label, i)),
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    # Plain numbers on log axes (a range of a few x reads badly as 2x10^0, 3x10^0).
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for on_log, axis in ((logx, ax.xaxis), (logy, ax.yaxis)):
        if on_log:
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(x=0.12, y=0.08)  # room for the labels at the edges
    arrow = {"min": "lower is better", "max": "higher is better"}
    ax.set_xlabel(xlabel or f"{x} ({arrow[x_objective]})")
    ax.set_ylabel(ylabel or f"{y} ({arrow[y_objective]})")
    ax.set_title(title or f"{y} vs {x}: Pareto front")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)
    return path
