"""The one-token decode step, compiled ahead of time (AOTInductor) and kept on disk.

Decoding runs the same small graph once per token: on SmolLM2-135M its ~60 small ops per
layer cost more in eager dispatch than the weights take to read. Compiled into one graph the
step gets 2-3x faster, but torch.compile pays its compile (about a minute on 2 cores) again in
every process, and inductor's own disk caches still leave ~20 s of tracing per process. So the
step is exported once (``torch.export``, the cache's tensors as inputs written in place, the
batch and the cache's sizes dynamic) and compiled by AOTInductor into a shared library that a
later process loads in milliseconds, with no tracing at all (the first process on a machine
may leave the build to a background process: ``archopt.background_build``). Two kinds of step
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
import shutil
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
    "MAX_BATCH", "CompiledPagedStep", "CompiledStep", "build_step", "cached_step",
    "compile_step", "load_step", "step_folder", "step_key",
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
    return KINDS[kind].wrapper(runner, folder, kind)


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
