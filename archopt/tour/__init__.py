"""``archopt tour``: re-measure the lecture's claims on this machine and write a report.

Each technique of the lecture gets a section that exists only once archopt implements it;
the report says which are still missing, and ends with a summary table of every claim with
the figure measured here and whether it held. Output: ``report.html`` (self-contained, plots
embedded), ``report.md``, ``report.json`` and the PNG plots in the output folder.

One module per section (``mobilenet``, ``longformer``, ``mobilevit``, ``kvcache``), each
returning a ``common.Section`` with its claims; ``report`` renders the summary and the HTML.
The tour stands with the benchmarks on the floor under the CLI: it may use anything below
(measure, train, pareto, bench), never the CLI.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from archopt.tour.common import Claim, Section, tour_log
from archopt.tour.kvcache import kv_cache_section
from archopt.tour.longformer import longformer_section
from archopt.tour.mobilenet import mobilenet_section
from archopt.tour.mobilevit import mobilevit_section
from archopt.tour.report import SUMMARY_TITLE, render_html, summary_section
from archopt.tour.search import search_section

# What the tour does not measure, and where it is measured instead.
MISSING = [
    (
        "Triton GPU kernel for local attention",
        "needs a CUDA GPU: `bash benchmarks/gpu_check.sh` runs its tests and benchmark there",
    ),
]

# Name (for --sections) -> section function, in report order. The summary always follows.
SECTIONS: dict[str, Callable[..., Section]] = {
    "mobilenet": mobilenet_section,
    "longformer": longformer_section,
    "mobilevit": mobilevit_section,
    "kv_cache": kv_cache_section,
    "search": search_section,
}
OUTPUTS = ("report.html", "report.md", "report.json")


def run_tour(
    out_dir: str | Path = "archopt-report",
    *,
    threads: int | None = None,
    repeats: int = 20,
    progress: bool = True,
    quick: bool = False,
    sections: Sequence[str] | None = None,
) -> dict:
    """Run the sections (all by default); write report.html, report.md, report.json and plots.

    ``quick``: smaller sizes, fewer positions and one training epoch, for tests (well under a
    minute and a half); the figures are rougher and some claims may not show at that size.
    ``sections``: names from ``SECTIONS`` to run alone, in report order.
    """
    from archopt.errors import ArchoptError
    from archopt.io import atomic_write_text, check_writable
    from archopt.measure import cpu_name

    names = list(SECTIONS) if sections is None else [s.strip() for s in sections if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise ValueError(
            f"sections must be names from {', '.join(SECTIONS)}, got {', '.join(unknown) or 'none'}"
        )
    out = check_writable(out_dir, "--out", folder=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"got {out}: {e.strerror}"
        raise ArchoptError(f"--out must be a folder that can be created, {why}") from None
    # A failed run must not leave an older report looking like this one's result.
    for stale in OUTPUTS:
        (out / stale).unlink(missing_ok=True)
    start = time.time()
    done: list[Section] = []
    timings: dict[str, float] = {}
    for name in (n for n in SECTIONS if n in names):
        t0 = time.time()
        done.append(
            SECTIONS[name](out, threads=threads, repeats=repeats, progress=progress, quick=quick)
        )
        timings[name] = time.time() - t0
        tour_log(f"section {name} done in {timings[name]:.0f} s", progress)
    summary = summary_section(done)
    every = [summary, *done]  # the verdicts first: the details follow for whoever doubts one

    title = "archopt tour: the lecture's claims, measured here"
    header = [
        f"# {title}",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads() if threads is None else threads} "
        f"threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
        + (", quick mode (small sizes: rough figures)" if quick else "")
        + f". Sections run: {', '.join(names)}.",
        "",
    ]
    body = []
    for s in every:
        body += [f"## {s.title}", "", s.markdown, ""]
    body += ["## Not measured yet", ""] + [f"- {t} ({where})" for t, where in MISSING]
    markdown = "\n".join(header + body) + "\n"
    report = {
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "threads": threads or torch.get_num_threads(),
        "quick": quick,
        "seconds": time.time() - start,
        "section_seconds": timings,
        "sections": {s.title: s.data for s in every},
        "claims": summary.data["claims"],
        "plots": [p for s in done for p in s.plots],
        "missing": [t for t, _ in MISSING],
    }
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    atomic_write_text(out / "report.html", render_html(markdown, out, title))
    tour_log(f"wrote {out / 'report.html'} (and .md, .json) in {report['seconds']:.0f} s", progress)
    return report


__all__ = [
    "MISSING",
    "SECTIONS",
    "SUMMARY_TITLE",
    "Claim",
    "Section",
    "kv_cache_section",
    "longformer_section",
    "mobilenet_section",
    "mobilevit_section",
    "run_tour",
    "search_section",
]
