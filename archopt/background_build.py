"""Building a compiled decode step in a separate, low-priority process, for later processes.

The first process on a machine that wants a step (``archopt.decode_step``) should not wait a
minute for it: ``generate`` and the serving engine decode eager instead and start
``build_in_background``, a detached process (``python -m archopt.background_build build``) at
nice 10 that loads the same checkpoint, builds the step into the cache folder and leaves; the
next start loads it in milliseconds, and a running server switches to it when it lands.

Other processes see a build by its lock file in the step's folder (``building``): the
builder's process id, written atomically, stale after ``STALE_LOCK_S`` or when that process
has ended. The step's own record is written last (``decode_step.build_step``), so a build
that dies leaves no entry, only a lock that ages out.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from archopt.decode_step import build_step, cached_step, load_step, step_folder
from archopt.io import atomic_write_text
from archopt.step_graphs import KINDS

LOCK_FILE = "building.lock"
STALE_LOCK_S = 1800.0
BUILD_LOG = "build.log"
__all__ = ["alive", "build_in_background", "builder", "building", "can_build_in_background"]


def can_build_in_background(model: nn.Module) -> bool:
    """Whether a separate process can rebuild ``model`` (it came from ``load_llm``)."""
    extra = getattr(model.config, "extra", {})
    return bool(extra.get("source")) and extra.get("weights") is not None


def building(folder: Path) -> bool:
    """Whether a live process is building into ``folder`` now."""
    return builder(folder) is not None


def builder(folder: Path) -> int | None:
    """The process id of the live process building into ``folder`` now, else None."""
    lock = folder / LOCK_FILE
    try:
        pid = int(lock.read_text().strip() or 0)
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return None
    if age > STALE_LOCK_S or not alive(pid):
        return None
    return pid


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a build outlives the lock of the step it built first).
    A build this process started and that has ended is reaped here: as a zombie it would
    still answer a signal."""
    if pid <= 0:
        return False
    try:
        if hasattr(os, "WNOHANG") and os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:  # not our child: the kernel says whether it runs
        pass
    except OSError:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def build_in_background(model: nn.Module, kind: str = "static") -> Path | None:
    """Start a detached, low-priority process that builds ``model``'s step into the cache for
    later processes; its folder, or None when none was started (one is running, the cache is
    not writable, the model cannot be rebuilt from a checkpoint, or
    ``ARCHOPT_BACKGROUND_COMPILE=0``)."""
    if os.environ.get("ARCHOPT_BACKGROUND_COMPILE", "1") == "0":
        return None
    if not can_build_in_background(model):
        return None
    folder = step_folder(model, kind)
    if folder is None or building(folder):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    extra = model.config.extra
    # For generate's step (its process ends with the run), weights="auto" is chosen again
    # there, after the kernels are built: the format the next run will load (gguf-act8 where
    # they make it the faster), whose step it then needs. A server's paged step is for the
    # model it is serving now, which switches to it when it lands.
    again = extra.get("weights_auto") and kind == "static"
    weights = "auto" if again else extra["weights"]
    cmd = [
        sys.executable, "-m", "archopt.background_build", "build", extra["source"],
        "--weights", weights, "--threads", str(torch.get_num_threads()),
        "--expect", folder.name, "--kind", kind,
    ]  # fmt: skip
    if extra.get("weights_auto") and not again:  # then what auto will load next time
        cmd.append("--then-auto")
    with open(folder / BUILD_LOG, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this process, and a Ctrl-C of it
        )
    atomic_write_text(folder / LOCK_FILE, str(proc.pid))
    return folder


def _main(argv: list[str] | None = None) -> int:
    """``python -m archopt.background_build build SOURCE --weights W --threads T``: what
    ``build_in_background`` runs."""
    import argparse

    from archopt.loading.llm import load_llm

    p = argparse.ArgumentParser(prog="python -m archopt.background_build")
    p.add_argument("action", choices=["build"])
    p.add_argument("source")
    p.add_argument("--weights", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--expect", help="the key the parent computed (a check)")
    p.add_argument("--kind", choices=sorted(KINDS), default="static")
    then = "then build the kernels and the step weights='auto' loads with them"
    p.add_argument("--then-auto", action="store_true", help=then)
    args = p.parse_args(argv)
    if hasattr(os, "nice"):
        os.nice(10)  # in the background: the user's own work comes first
    torch.set_num_threads(args.threads)
    if args.weights == "auto":  # the kernels first: with them, auto may choose gguf-act8
        from archopt.ops import act8, cpu_kernels

        if act8.cpu_has_vnni():
            cpu_kernels.load(build=True)
    model = load_llm(args.source, weights=args.weights)
    folder = step_folder(model, args.kind)
    if folder is None:
        print("archopt: the cache folder is not writable", file=sys.stderr)
        return 1
    parents = folder.parent / args.expect if args.expect else None
    if parents is not None and folder.name != args.expect:
        if args.weights != "auto":
            print(f"archopt: key {folder.name}, the parent's {args.expect}", file=sys.stderr)
            return 1
        # auto chose another format than the parent's: build that one, say so to later runs
        chosen = model.config.extra.get("weights")
        print(f"archopt: weights=auto is {chosen} now: building its step", file=sys.stderr)
        _lock(folder)  # before the parent's lock goes
        with contextlib.suppress(OSError):
            (parents / LOCK_FILE).unlink()
    _build_and_unlock(model, folder, args.kind)
    if args.then_auto:
        _build_for_auto(args.source, args.kind)
    return 0


def _build_and_unlock(model: nn.Module, folder: Path, kind: str) -> None:
    """Build ``model``'s step into ``folder`` (locked by this process) unless it is there."""
    try:
        if cached_step(model, kind) is None:
            seconds = build_step(model, folder, kind=kind)
            load_step(model, folder, kind)  # check that it loads before anyone relies on it
            print(f"archopt: built {folder} in {seconds:.0f} s", file=sys.stderr)
    finally:
        with contextlib.suppress(OSError):
            (folder / LOCK_FILE).unlink()


def _build_for_auto(source: str, kind: str) -> None:
    """After a server's own step: build the kernels, then the step of the format
    ``weights="auto"`` loads with them (gguf-act8 for a GGUF on an AVX512-VNNI CPU), so that
    the next server starts on the fastest format, not the one this first run could have."""
    from archopt.loading.llm import load_llm
    from archopt.ops import act8, cpu_kernels

    if act8.cpu_has_vnni():
        cpu_kernels.load(build=True)
    model = load_llm(source, weights="auto")
    folder = step_folder(model, kind)
    if folder is None or building(folder) or cached_step(model, kind) is not None:
        return
    print(f"archopt: weights=auto is {model.config.extra.get('weights')} now: building its "
          "step for the next start", file=sys.stderr)  # fmt: skip
    _lock(folder)
    _build_and_unlock(model, folder, kind)


def _lock(folder: Path) -> None:
    """Say to other processes that this one builds into ``folder`` (``building``)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / LOCK_FILE, str(os.getpid()))


if __name__ == "__main__":
    sys.exit(_main())
