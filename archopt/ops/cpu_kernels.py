"""archopt's own CPU kernels (C++ in ``archopt/csrc``), built once per machine and kept.

``act8_linear.cpp``: ``torch.ops.archopt.int4_q8_linear`` and ``int8_q8_linear``, GGUF's
4- and 8-bit blocks times int8 activations (``archopt.ops.act8``). The decode step's
attention, read straight from the cache (``decode_attention.cpp``):
``torch.ops.archopt.paged_decode_attention`` over a paged pool, where the torch expression
(``DecodeView``) copies every row's slots before two small products, and
``static_decode_attention`` over a static cache, where the torch expression scores every slot
of the capacity, empty or not. The compiled steps call them when they are here; they are
custom ops, so ``torch.export`` and AOTInductor keep each as one call. ``greedy.cpp``:
``torch.ops.archopt.greedy``, each row's argmax over the vocabulary (``archopt.sampling``).

The library is compiled from source with the machine's compiler (``-march=native``, 10-15 s
on 2 cores) by ``load(build=True)``, which the compiled step's build does, and kept in the cache
folder under a key of the source, torch's version and the CPU; a later process only loads it.
It is written with its record last, so an interrupted build leaves no entry, and the record
holds the library's SHA-256, checked before loading: a damaged library is removed and built
again, never loaded (loading a truncated one would kill the process).
``ARCHOPT_CPU_KERNELS=0`` turns it off (the torch expression runs instead).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from archopt.io import atomic_write_text, cpu_id, cpu_tag, writable_cache_dir

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = tuple(_CSRC / f for f in ("decode_attention.cpp", "act8_linear.cpp", "greedy.cpp"))
SUBDIR = "kernels"
RECORD_FILE = "kernels.json"
LIBRARY_FILE = "archopt_kernels.so"
FLAGS = ("-O3", "-march=native", "-fopenmp")
log = logging.getLogger("archopt")
_loaded: Path | None = None
_failed: str | None = None


def why_unavailable() -> str | None:
    """Why the kernels cannot be built or loaded here, or None when they can."""
    if os.environ.get("ARCHOPT_CPU_KERNELS", "1") == "0":
        return "turned off (ARCHOPT_CPU_KERNELS=0)"
    if not sys.platform.startswith("linux"):
        return f"built on Linux only, this is {sys.platform}"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ or $CXX) on the PATH"
    if not all(s.is_file() for s in SOURCES):
        return f"the kernel sources are missing ({SOURCES[0].parent})"
    return _failed


@functools.cache
def key() -> str:
    """What the built library depends on: its sources, flags, torch and the CPU (its model
    and feature flags, since it is compiled for this CPU's instructions)."""
    h = hashlib.sha256()
    for s in SOURCES:
        h.update(s.read_bytes())
    h.update(repr((FLAGS, torch.__version__, platform.machine(), cpu_id())).encode())
    return h.hexdigest()[:20]


def loaded() -> bool:
    return _loaded is not None


def load(*, build: bool = False) -> bool:
    """Load the kernels into this process (building them first when ``build`` and they are not
    kept yet); whether ``torch.ops.archopt`` has them now. A failed build is logged, remembered
    for the process and reported by ``why_unavailable``."""
    global _loaded, _failed
    if _loaded is not None:
        if build:  # keep them where later processes will look (the cache folder may be new)
            try:
                _keep_copy()
            except OSError as e:
                log.warning("archopt: could not keep the CPU kernels in the cache folder (%s)", e)
        return True
    if why_unavailable() is not None:
        return False
    root = writable_cache_dir(SUBDIR)
    if root is None:
        return False
    folder = root / key()
    library = folder / LIBRARY_FILE
    for attempt in range(2):  # a kept library that does not load is removed and built anew
        if not (folder / RECORD_FILE).exists():
            if not build:
                return False
            try:
                _build(folder)
            except Exception as e:  # a compiler error, a missing header: run without them
                _failed = f"the build failed: {str(e).strip().splitlines()[-1] if str(e) else e}"
                log.warning("archopt: building the CPU kernels failed (%s); using torch ops", e)
                return False
        try:
            _check_library(folder)  # dlopen of a damaged file can kill the process: look first
            _load_global(library)
            break
        except (OSError, ValueError) as e:  # ValueError: a record that is not JSON
            log.warning("archopt: the CPU kernels in %s do not load (%s); removed", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
            if attempt:
                _failed = f"the built library does not load: {e}"
                return False
    _register_fakes()
    _loaded = library
    return True


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_library(folder: Path) -> None:
    """OSError unless the library is the one its record describes (its SHA-256)."""
    record = json.loads((folder / RECORD_FILE).read_text() or "{}")
    library = folder / LIBRARY_FILE
    if not library.is_file():
        raise OSError(f"{LIBRARY_FILE} is missing")
    if record.get("library_sha256") != _digest(library):
        raise OSError(f"{LIBRARY_FILE} is not the library its record describes")


def _keep_copy() -> None:
    """Copy the loaded library (and its record) into the cache folder now in force, when it
    has none: the same key is the same library."""
    root = writable_cache_dir(SUBDIR)
    if root is None or _loaded is None:
        return
    folder = root / _loaded.parent.name
    if (folder / RECORD_FILE).exists() or folder == _loaded.parent:
        return
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_loaded, folder / LIBRARY_FILE)  # checked against the record when loaded
    atomic_write_text(folder / RECORD_FILE, (_loaded.parent / RECORD_FILE).read_text())


def _build(folder: Path) -> None:
    from torch.utils.cpp_extension import load as load_extension

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).unlink(missing_ok=True)
    log.info("archopt: building the CPU kernels (once per machine, 10-15 s)")
    load_extension(
        name="archopt_kernels",
        sources=[str(s) for s in SOURCES],
        extra_cflags=list(FLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )  # loads it too; a second load_library of the same path is a no-op
    seconds = time.perf_counter() - start
    record = {
        "summary": f"archopt CPU kernels ({', '.join(s.name for s in SOURCES)}), "
        f"built in {seconds:.0f} s",
        "key": folder.name,
        "torch": torch.__version__,
        "flags": list(FLAGS),
        "cpu": cpu_tag(),  # built for this CPU
        "sources": [s.name for s in SOURCES],  # what it is a build of (see io.prune_cache)
        "library_sha256": _digest(folder / LIBRARY_FILE),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=1))


# The ops with a C entry point (``aoti_torch_cpu_<op>``, defined beside each op in
# archopt/csrc, its arguments the op's own in order, then the result's handle): a compiled step
# built with ``c_shims()`` calls them directly, where it would otherwise box every call's
# arguments through the dispatcher (its proxy executor). The library is loaded with its symbols
# global so that the step's library finds them when it is loaded.
C_SHIM_OPS = ("int4_q8_linear", "int8_q8_linear", "paged_decode_attention",
              "static_decode_attention")  # fmt: skip
_C_TYPES = {"Tensor": "AtenTensorHandle", "int": "int64_t", "float": "double"}


def c_shim_declaration(op: str) -> str:
    """The C declaration of ``op``'s entry point, from its registered schema."""
    schema = getattr(torch.ops.archopt, op).default._schema
    params = [f"{_C_TYPES[str(a.type)]} {a.name}" for a in schema.arguments]
    return f"AOTITorchError aoti_torch_cpu_{op}({', '.join([*params, 'AtenTensorHandle* ret'])})"


def c_shims() -> dict:
    """AOTInductor's ``custom_ops_to_c_shims`` for the loaded kernels ({} when they are not
    loaded, or when this torch's AOTInductor has no such setting)."""
    from torch._inductor import config

    if _loaded is None or not hasattr(config.aot_inductor, "custom_ops_to_c_shims"):
        return {}
    return {getattr(torch.ops.archopt, op).default: [c_shim_declaration(op)] for op in C_SHIM_OPS}


def _load_global(library: Path) -> None:
    """Load ``library`` as torch does, then make its symbols global (the C entry points)."""
    import ctypes

    torch.ops.load_library(str(library))
    ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL | os.RTLD_NOW)


def _register_fakes() -> None:
    """Shapes for tracing (torch.export), without running the kernels."""
    fakes = {
        "archopt::paged_decode_attention": _like_q,
        "archopt::static_decode_attention": _like_q,
        "archopt::int4_q8_linear": _linear_out,
        "archopt::int8_q8_linear": _linear_out,
    }
    for name, fake in fakes.items():
        if torch._library.simple_registry.singleton.find(name).fake_impl.kernel is None:
            torch.library.register_fake(name, fake)


def _like_q(q, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _linear_out(x, packed, scales, out_features):
    return x.new_empty((*x.shape[:-1], out_features))
