"""The tour's outputs: the summary of claims, and the report as markdown, JSON and HTML.

The HTML is rendered from the same markdown the sections write (a small converter for the
subset they use: headings, paragraphs, lists, tables, code blocks, images, bold and code
spans), with every PNG embedded as a data URI so the one file can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from archopt.report import markdown_table
from archopt.tour.common import Claim, Section

SUMMARY_TITLE = "Summary: every claim, measured here"


def summary_section(sections: list[Section]) -> Section:
    """One table of every section's claims with the measured figure and the verdict."""
    claims = [(s.title, c) for s in sections for c in s.claims]
    verdict = {True: "held", False: "NOT held", None: "not measured"}
    rows = [[c.claim, c.measured, verdict[c.held], c.rule, title] for title, c in claims]
    held = sum(c.held is True for _, c in claims)
    judged = sum(c.held is not None for _, c in claims)
    md = [
        f"{held} of {judged} claims held on this machine. Each verdict is computed from the "
        "measurement with the rule shown; the rules are deliberately loose, so 'NOT held' "
        "means the effect was clearly not there in this run, not that it missed a decimal.",
        "",
        markdown_table(["claim", "measured here", "verdict", "rule", "section"], rows)
        if rows
        else "No section with claims ran.",
    ]
    return Section(
        title=SUMMARY_TITLE,
        markdown="\n".join(md),
        data={
            "held": held,
            "judged": judged,
            "claims": [
                {
                    "section": title,
                    "claim": c.claim,
                    "measured": c.measured,
                    "held": c.held,
                    "rule": c.rule,
                }
                for title, c in claims
            ],
        },
    )


def _inline(text: str, out: Path) -> str:
    """Escape, then the inline markdown the sections use: images, bold, code spans."""

    def image(m: re.Match) -> str:
        alt, src = m.group(1), m.group(2)
        path = out / src
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{alt}" src="data:image/png;base64,{data}">'

    parts = re.split(r"(`[^`]*`)", text)
    done = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            done.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", image, s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        done.append(s)
    return "".join(done)


def markdown_to_html(markdown: str, out: Path) -> str:
    """HTML for the markdown subset the tour writes; images under ``out`` become data URIs."""
    lines = markdown.split("\n")
    html_parts: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            html_parts.append("<pre>" + html.escape("\n".join(lines[i + 1 : j])) + "</pre>")
            i = j + 1
        elif m := re.match(r"^(#{1,6}) (.*)", line):
            n = len(m.group(1))
            html_parts.append(f"<h{n}>{_inline(m.group(2), out)}</h{n}>")
            i += 1
        elif line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in lines[i:j]]
            head, body = cells[0], [r for r in cells[1:] if not all(set(c) <= {"-"} for c in r)]
            rows = ["<tr>" + "".join(f"<th>{_inline(c, out)}</th>" for c in head) + "</tr>"]
            for r in body:
                tds = []
                for c in r:
                    cls = {"NOT held": ' class="bad"', "held": ' class="ok"'}.get(c, "")
                    tds.append(f"<td{cls}>{_inline(c, out)}</td>")
                rows.append("<tr>" + "".join(tds) + "</tr>")
            html_parts.append("<table>" + "\n".join(rows) + "</table>")
            i = j
        elif line.startswith("- "):
            j = i
            while j < len(lines) and lines[j].startswith("- "):
                j += 1
            items = "".join(f"<li>{_inline(x[2:], out)}</li>" for x in lines[i:j])
            html_parts.append(f"<ul>{items}</ul>")
            i = j
        elif not line.strip():
            i += 1
        else:
            j = i
            while j < len(lines) and lines[j].strip() and not re.match(r"^(#|\||```|- )", lines[j]):
                j += 1
            html_parts.append("<p>" + _inline(" ".join(lines[i:j]), out) + "</p>")
            i = j
    return "\n".join(html_parts)


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.ok { background: #e6f4e6; } td.bad { background: #fbe3e3; }
pre { background: #f6f6f6; padding: 0.75em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; display: block; margin: 1em 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
"""


def render_html(markdown: str, out: Path, title: str) -> str:
    """The report as one HTML page with its plots (PNG files in ``out``) embedded."""
    body = markdown_to_html(markdown, out)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"{body}\n</body>\n</html>\n"
    )


__all__ = ["SUMMARY_TITLE", "Claim", "markdown_to_html", "render_html", "summary_section"]
