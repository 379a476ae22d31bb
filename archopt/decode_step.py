"""The one-token decode step, compiled ahead of time (AOTInductor) and kept on disk.

Decoding runs the same small graph once per token: on SmolLM2-135M its ~60 small ops per
layer cost more in eager dispatch than the weights take to read. Compiled into one graph the
step gets 2-3x faster, but torch.compile pays its compile (about a minute on 2 cores) again in
every process, and inductor's own disk caches still leave ~20 s of tracing per process. So the
step is exported once (``torch.export``, the cache's tensors as inputs written in place, the
batch and the cache's sizes dynamic) and compiled by AOTInductor into a shared library that a
later process loads in milliseconds, with no tracing at all. Two kinds of step
(``archopt.step_graphs``): ``static``, over the static cache (``generate``'s default path),
and ``paged``, over a paged cache's pools (the serving engine's decode batch).

The library holds no weights: the model's own tensors are handed to it at load time
(``load_constants``, used in place), so one entry serves every checkpoint of the same shapes
and format, and memory holds the weights once. Constants that inductor creates itself (the
int4 kernel's group sizes) are recorded while compiling and kept beside it.

An entry is keyed by the model's structure (config, layer types, tensor names, shapes and
dtypes), the thread count (inductor decides per thread count which loops to parallelise),
torch's version, the CPU's vector capability, the kind's format and the key of archopt's CPU
kernels its graph calls (``archopt.ops.cpu_kernels``; "torch" where they cannot be built). It
is written with its record last, so an interrupted build leaves no entry; one that fails to
load is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from archopt.io import atomic_write_text, cpu_tag, writable_cache_dir
from archopt.ops import cpu_kernels
from archopt.step_graphs import KINDS, MAX_BATCH, CompiledPagedStep, CompiledStep

SUBDIR = "steps"
PACKAGE_FILE = "step.pt2"
CONSTANTS_FILE = "constants.safetensors"
RECORD_FILE = "step.json"
LOCK_FILE = "building.lock"
STALE_LOCK_S = 1800.0
BUILD_LOG = "build.log"
# How a step is compiled (part of its key: a change rebuilds it). A step's own kernels (norms,
# rotations, residual adds) work on a few rows of a few thousand values: each on one thread,
# not an OpenMP region of its own, whose start and end cost more than the work. Measured on
# SmolLM2-135M gguf-act8, 2 threads, both steps in one process in turns: tokens/s +10-12% at
# batch 1, +4% at batch 4 (benchmarks/RESULTS.md). archopt's kernels and the matmuls keep
# their parallel regions.
INDUCTOR_CONFIGS = {
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.use_runtime_constant_folding": True,
    "cpp.min_chunk_size": 1 << 16,  # values per thread before a loop is split across threads
}
__all__ = [
    "MAX_BATCH", "CompiledPagedStep", "CompiledStep", "build_in_background", "build_step",
    "building", "cached_step", "can_build_in_background", "compile_step", "load_step",
    "step_folder", "step_key",
]  # fmt: skip

log = logging.getLogger("archopt")


def step_key(model: nn.Module, threads: int | None = None, kind: str = "static") -> str:
    """The name of ``model``'s compiled step of ``kind`` at ``threads`` (default: torch's
    now)."""
    cfg = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "extra"}
    structure = [(n, type(m).__name__) for n, m in model.named_modules()]
    tensors = [
        (n, list(t.shape), str(t.dtype))
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if not n.startswith("rope.")  # tables that grow; the step gets them at full size
    ]
    parts = [
        KINDS[kind].format,
        _kernels_key() if KINDS[kind].kernels else "",
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        str(threads or torch.get_num_threads()),
        json.dumps([INDUCTOR_CONFIGS, cfg, structure, tensors], sort_keys=True, default=str),
    ]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    prefix = type(model).__name__.lower() + ("" if kind == "static" else f"-{kind}")
    return f"{prefix}-{digest}"


def _kernels_key() -> str:
    """The C++ kernels a step of a kind that uses them is built with: their key, or "torch"
    where they cannot be built (the step then runs the torch expressions)."""
    return "torch" if cpu_kernels.why_unavailable() else cpu_kernels.key()


def step_folder(model: nn.Module, kind: str = "static") -> Path | None:
    """Where ``model``'s compiled step of ``kind`` lives; None when the cache folder cannot be
    written."""
    root = writable_cache_dir(SUBDIR)
    return None if root is None else root / step_key(model, kind=kind)


def _constants(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names the exported step gives them."""
    return {f"model.{n}": t for n, t in [*model.named_parameters(), *model.named_buffers()]}


@contextlib.contextmanager
def _recording_anonymous_constants():
    """Record the constants inductor makes itself (no name from the model) while compiling."""
    from torch._inductor.graph import GraphLowering

    made: dict[str, torch.Tensor] = {}
    original = GraphLowering.add_tensor_constant

    def add(self, data, name=None):
        box = original(self, data, name)
        if name is None:
            made[box.get_name()] = data.detach().clone()
        return box

    GraphLowering.add_tensor_constant = add
    try:
        yield made
    finally:
        GraphLowering.add_tensor_constant = original


class _Progress:
    """'compiling ... 12 s' on stderr, refreshed every second, while a build runs."""

    def __init__(self, message: str, enabled: bool) -> None:
        self.message, self.enabled = message, enabled
        self._stop = threading.Event()

    def __enter__(self):
        if self.enabled:
            self.start = time.perf_counter()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        tty = sys.stderr.isatty()
        if not tty:
            print(f"archopt: {self.message}", file=sys.stderr, flush=True)
        while not self._stop.wait(1.0):
            if tty:
                elapsed = time.perf_counter() - self.start
                print(f"\rarchopt: {self.message} {elapsed:.0f} s", end="", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            if sys.stderr.isatty():
                print(file=sys.stderr)


def build_step(
    model: nn.Module, folder: Path, *, kind: str = "static", progress: bool = False
) -> float:
    """Export and compile ``model``'s decode step of ``kind`` into ``folder``; returns the
    seconds it took."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    cfg = model.config
    model.rope.reserve(cfg.max_position_embeddings)
    graph = KINDS[kind].graph
    example, dynamic = graph.example(model)
    kernels = KINDS[kind].kernels and cpu_kernels.load(build=True)
    module = graph(model, kernel=True) if kernels else graph(model)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (RECORD_FILE, PACKAGE_FILE, CONSTANTS_FILE):
        (folder / stale).unlink(missing_ok=True)
    message = "compiling the decode step (once per model and machine, about a minute)..."
    with _Progress(message, progress), torch.no_grad():
        exported = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
        with _recording_anonymous_constants() as made:
            torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(folder / PACKAGE_FILE),
                inductor_configs={**INDUCTOR_CONFIGS, **_shims(kernels)},
            )
    save_file({k: v.contiguous() for k, v in made.items()}, str(folder / CONSTANTS_FILE))
    seconds = time.perf_counter() - start
    what = f"{cfg.extra.get('source', type(model).__name__)} ({cfg.extra.get('weights')} weights)"
    record = {
        "format": KINDS[kind].format,
        "kind": kind,
        "summary": f"{kind} decode step of {what}, {torch.get_num_threads()} threads, compiled in "
        f"{seconds:.0f} s",
        "key": folder.name,
        "model": cfg.extra.get("source", type(model).__name__),
        "weights": cfg.extra.get("weights"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": cpu_kernels.key() if kernels else None,
        "cpu": cpu_tag(),  # compiled for this CPU
        "compile_seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=1))
    return seconds


def _shims(kernels: bool) -> dict:
    """The setting that has a step call archopt's kernels directly, not through the
    dispatcher (``archopt.ops.cpu_kernels.c_shims``), when they are in its graph."""
    shims = cpu_kernels.c_shims() if kernels else {}
    return {"aot_inductor.custom_ops_to_c_shims": shims} if shims else {}


def load_step(model: nn.Module, folder: Path, kind: str = "static") -> CompiledStep:
    """The step of ``kind`` in ``folder``, bound to ``model``'s tensors; ValueError when it is
    unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        record = json.loads((folder / RECORD_FILE).read_text())
        expected = KINDS[kind].format
        if record.get("format") != expected or record.get("key") != folder.name:
            raise ValueError(f"record {record.get('format')!r}, expected {expected!r}")
        if record.get("kernels") and not cpu_kernels.load():
            raise ValueError(f"archopt's CPU kernels {record['kernels']} are not built here")
        made = load_file(str(folder / CONSTANTS_FILE))
        model.rope.reserve(model.config.max_position_embeddings)
        runner = torch._C._aoti.AOTIModelPackageLoader(
            str(folder / PACKAGE_FILE), "model", False, 1, -1
        )
        tensors = {**_constants(model), **made}
        # Constants folded from others (transposed weights) are computed by the library at load.
        wanted = [n for n in runner.get_constant_fqns() if not n.startswith("_FOLDED_CONST_")]
        missing = [n for n in wanted if n not in tensors]
        if missing:
            raise ValueError(f"the step wants constants the model lacks: {missing[:3]}")
        # in place (user-managed): the library reads the model's own tensors
        runner.load_constants({n: tensors[n] for n in wanted}, False, True, True)
    except (OSError, RuntimeError, json.JSONDecodeError, SafetensorError) as e:
        raise ValueError(f"compiled step in {folder} is unusable: {e}") from e
    return KINDS[kind].wrapper(runner, folder)


def cached_step(model: nn.Module, kind: str = "static") -> CompiledStep | None:
    """``model``'s compiled step of ``kind`` if one is on disk and loads; a broken one is
    removed."""
    folder = step_folder(model, kind)
    if folder is None or not (folder / RECORD_FILE).exists():
        return None
    try:
        return load_step(model, folder, kind)
    except ImportError:
        return None
    except ValueError as e:
        log.warning("archopt: rebuilding a broken compiled step (%s)", e)
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
        return None


def compile_step(
    model: nn.Module, *, kind: str = "static", progress: bool = False
) -> CompiledStep | CompiledPagedStep:
    """``model``'s compiled step of ``kind``: from the cache folder, or built now and kept
    there (in a temporary folder when the cache folder cannot be written)."""
    step = cached_step(model, kind)
    if step is not None:
        return step
    folder = step_folder(model, kind)
    if folder is None:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="archopt-step-")) / step_key(model, kind=kind)
        log.warning("archopt: the cache folder is not writable; the compiled step is not kept")
    build_step(model, folder, kind=kind, progress=progress)
    return load_step(model, folder, kind)


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
        sys.executable, "-m", "archopt.decode_step", "build", extra["source"],
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
    """``python -m archopt.decode_step build SOURCE --weights W --threads T``: what
    ``build_in_background`` runs."""
    import argparse

    from archopt.loading.llm import load_llm

    p = argparse.ArgumentParser(prog="python -m archopt.decode_step")
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
