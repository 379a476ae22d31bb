"""What every tour section shares: the section record, claims, logging, markdown tables."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class Claim:
    """One statement of the lecture, the figure measured for it here, and whether it held.

    ``held`` is computed by the section from its measurements (None: nothing to judge with).
    """

    claim: str
    measured: str
    held: bool | None
    rule: str = ""  # the test applied to the measurement, shown so a reader can disagree


@dataclass
class Section:
    title: str
    markdown: str
    data: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[tour {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _md_table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
