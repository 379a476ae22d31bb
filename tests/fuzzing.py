"""The fuzzer's instruments: one case run under a time limit and a memory probe, its outcome
judged and counted, and the mutations every format shares (numbers at their edges, bit flips,
JSON values of the wrong kind). The formats' own mutations are in tests/test_fuzz_files.py.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import signal
import struct
import time
import tracemalloc
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from archopt.errors import ArchoptError

TIME_LIMIT_S = 20.0
MEMORY_LIMIT_MIB = 64  # the seeds are 50-400 KB; a load that trusts a count asks for gigabytes


class Hang(Exception):
    pass


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


@contextmanager
def bounded(out: dict):
    """Time limit (SIGALRM) and peak memory of the block, into ``out``."""
    rss_peak = _reset_peak()
    if rss_peak:
        start_kib = _status_kib("VmRSS")
    else:
        tracemalloc.start()

    def alarm(*_):
        raise Hang(f"no result after {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    # Stuck in native code, the alarm waits for it; the stacks say where it is.
    faulthandler.dump_traceback_later(TIME_LIMIT_S + 1, exit=False)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - cpu0
        if rss_peak:
            out["peak_mib"] = (_status_kib("VmHWM") - start_kib) / 1024
        else:
            out["peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()


def check_model(model) -> None:
    """What a successful load must give: finite logits, token ids that fit the embedding."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([[0, 1, 2]]) % vocab)
    assert logits.shape == (1, 3, vocab) and torch.isfinite(logits).all(), "non-finite logits"
    tok = model.tokenizer
    if tok is not None:
        ids = tok.encode("hello the world 12")
        assert all(0 <= i < vocab for i in ids), f"token ids {ids} outside the vocabulary {vocab}"
        tok.decode(ids)


def run_case(kind: str, index: int, label: str, load, strict: bool, stats: dict) -> None:
    out: dict = {}
    outcome = "loaded"
    try:
        with bounded(out):
            model = load()
            if model is not None:
                check_model(model)
    except Hang as e:  # the CPU time tells a loop from a machine that starved the process
        outcome = f"HANG: {e}"
    except ValueError as e:
        outcome = type(e).__name__
        if strict and not isinstance(e, ArchoptError):
            outcome = f"FAIL: a plain {type(e).__name__}: {e}"
        elif "\n" in str(e).strip() or not str(e).strip():
            outcome = f"FAIL: not one line: {e!r}"
    except Exception as e:
        outcome = f"FAIL: {type(e).__name__}: {e}"
    if out.get("peak_mib", 0) > MEMORY_LIMIT_MIB:
        outcome = f"FAIL: peak memory {out['peak_mib']:.0f} MiB above the case's start"
    stats["outcomes"][outcome.split(":")[0]] += 1
    stats["mutators"][label] += 1
    stats["max_seconds"] = max(stats["max_seconds"], out.get("seconds", 0.0))
    stats["max_peak_mib"] = max(stats["max_peak_mib"], out.get("peak_mib", 0.0))
    if outcome.startswith("HANG"):
        outcome += f" (returned after {out['seconds']:.0f} s, {out['cpu_seconds']:.1f} s of CPU)"
    if outcome.startswith(("FAIL", "HANG")):
        stats["failures"].append(f"{kind} case {index} ({label}): {outcome[:400]}")


def new_stats() -> dict:
    return {"outcomes": Counter(), "mutators": Counter(), "failures": [], "max_seconds": 0.0,
            "max_peak_mib": 0.0}  # fmt: skip


def finish(kind: str, stats: dict, n: int) -> None:
    stats["cases"] = n
    if os.environ.get("ARCHOPT_FUZZ_REPORT"):
        path = Path(os.environ["ARCHOPT_FUZZ_REPORT"])
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(old | {kind: stats}, indent=1, default=dict))
    assert not stats["failures"], "\n".join(stats["failures"][:20])
    assert sum(stats["outcomes"].values()) == n


# ------------------------------------------------------------------------------------ numbers


def extreme(rng: random.Random, fmt: str) -> bytes:
    """A value of struct format ``fmt`` from the edges: 0, 1, all ones (-1), the sign bit alone
    (2**63 for a u64), the largest positive, random bits; for floats NaN and the infinities."""
    size = struct.calcsize(fmt)
    bits = 8 * size
    if fmt in "fd" and rng.random() < 0.5:
        value = rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e38, 1e-45])
        return struct.pack("<" + fmt, value)
    top = rng.choice([0, 1, 2**bits - 1, 2 ** (bits - 1), 2 ** (bits - 1) - 1, 2, 9, 13, 2**32])
    top = rng.getrandbits(bits) if rng.random() < 0.2 else top % 2**bits
    return top.to_bytes(size, "little")


def flip(rng: random.Random, raw: bytes, end: int) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(end)] ^= 1 << rng.randrange(8)
    return bytes(data)


def odd_value(rng: random.Random):
    """A JSON or metadata value of the wrong kind or at an edge."""
    return rng.choice([0, -1, 1, 2**63, 2**64 + 1, 1e308, float("nan"), float("inf"), 0.5, "x",
                       "", None, True, [], [1, 2], {}, {"a": 1}])  # fmt: skip


def json_paths(obj, prefix=()):
    """Every (path) into nested dicts and lists, for replacing one value."""
    yield prefix
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for key, value in list(items)[:64]:
        yield from json_paths(value, (*prefix, key))


def set_path(obj, path, value):
    if not path:
        return None if value is DELETE else value
    *head, last = path
    target = obj
    for key in head:
        target = target[key]
    if value is DELETE and isinstance(target, dict):
        del target[last]
    else:
        target[last] = None if value is DELETE else value
    return obj


DELETE = object()
