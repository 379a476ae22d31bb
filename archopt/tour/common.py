"""What every tour section returns: the section record and its claims."""

from __future__ import annotations

from dataclasses import dataclass, field

from archopt.report import log


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


def tour_log(msg: str, progress: bool) -> None:
    """A progress line of the tour: ``[tour HH:MM:SS] msg`` on stderr."""
    log(msg, progress, tag="tour")
