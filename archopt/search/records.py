"""The search's records file: ``records.jsonl``, a header line with the settings, then one
line per proposal (trained, or rejected with its prediction) and per hand-designed model.

Opening it checks that a search may continue from it (the lines parse, the header comes first,
the settings that decide the proposals match); every change rewrites it atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from archopt.io import atomic_write_text

RECORDS = "records.jsonl"
# Settings that may change when a search is continued without changing what it proposes.
RESUME_FREE = ("budget", "repeats", "hand_designed", "min_time_s", "rounds")


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


__all__ = ["RECORDS", "RESUME_FREE", "RecordFile"]
