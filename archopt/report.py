"""What archopt writes for people to read: markdown tables, plots, progress lines.

One place for each, so that every benchmark, tour section and command writes them the same
way: tables as GitHub markdown (a header, a ``|---|`` rule, one line per row), plots through
matplotlib's file-only ``Agg`` backend (no display needed, nothing opens a window), progress
on stderr so that stdout stays the result. Files themselves are written by ``archopt.io``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence


def table_row(cells: Iterable[object]) -> str:
    """One markdown table line: ``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table_head(head: Sequence[object]) -> str:
    """A markdown table's header line and its rule, as two lines."""
    return table_row(head) + "\n|" + "---|" * len(head)


def markdown_table(head: Sequence[object], rows: Iterable[Iterable[object]]) -> str:
    """A markdown table: ``head``, then one line per row (cells through ``str``)."""
    return "\n".join([table_head(head), *(table_row(row) for row in rows)])


def pyplot():
    """``matplotlib.pyplot`` on the ``Agg`` backend: how every archopt plot is drawn.

    ImportError when matplotlib is not installed (the ``plot`` extra); callers that can do
    without a plot catch it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(msg: str, enabled: bool = True, *, tag: str | None = None) -> None:
    """A progress line on stderr, flushed; ``tag`` prefixes it with ``[tag HH:MM:SS]``."""
    if not enabled:
        return
    if tag is not None:
        msg = f"[{tag} {time.strftime('%H:%M:%S')}] {msg}"
    print(msg, file=sys.stderr, flush=True)
