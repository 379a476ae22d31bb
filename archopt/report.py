"""What archopt writes for people to read: markdown tables, plots, progress lines, usage errors.

One place for each, so that every benchmark, tour section and command writes them the same
way: tables as GitHub markdown (a header, a ``|---|`` rule, one line per row), plots through
matplotlib's file-only ``Agg`` backend (no display needed, nothing opens a window), progress
on stderr so that stdout stays the result, and a bad command-line argument as one line
(``ArgumentParser``, with the range types ``int_in`` and ``float_in``) from the command and
from every benchmark suite alike. Files themselves are written by ``archopt.io``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path


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


def save_figure(fig, path, **kwargs) -> Path:
    """Write a matplotlib figure atomically, creating its folders (a plot path was checked for
    writability before the work: ``archopt.io.check_writable``); the format from the suffix."""
    from archopt.io import atomic_write

    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def log(msg: str, enabled: bool = True, *, tag: str | None = None) -> None:
    """A progress line on stderr, flushed; ``tag`` prefixes it with ``[tag HH:MM:SS]``."""
    if not enabled:
        return
    if tag is not None:
        msg = f"[{tag} {time.strftime('%H:%M:%S')}] {msg}"
    print(msg, file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``archopt: error: ...``) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"archopt: error: {message} (see `{self.prog} --help`)\n")


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def float_in(low: float, high: float | None = None, *, open_low: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with ``open_low``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if open_low else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            span = (
                ("(" if open_low else "[") + f"{low}, " + ("inf)" if high is None else f"{high}]")
            )
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, got {text}")
        return value

    return parse
