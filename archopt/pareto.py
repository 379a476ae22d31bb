"""Non-dominated sets: "use the Pareto frontier to judge whether you are doing better"."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[Sequence[float]], *, maximize: Sequence[bool]) -> list[int]:
    """Indices of the points no other point dominates.

    ``maximize[k]`` says whether objective k is better larger (accuracy, tokens/s) or smaller
    (latency, MACs, memory). A point dominates another when it is at least as good in every
    objective and strictly better in one; equal points are all kept.
    """
    if any(len(p) != len(maximize) for p in points):
        raise ValueError(f"every point needs {len(maximize)} objectives (one per maximize flag)")
    signs = [1.0 if m else -1.0 for m in maximize]
    keyed = [[s * v for s, v in zip(signs, p)] for p in points]

    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(keyed) if not any(dominates(q, p) for q in keyed)]
