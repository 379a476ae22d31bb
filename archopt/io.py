"""Files: atomic writes, and archopt's cache folder (compiled steps, backend choices).

Writes go to a temporary file in the destination's folder, are flushed to disk, then renamed
over the destination (``os.replace``, atomic on POSIX and Windows): a crash or a full disk
mid-write leaves the previous file as it was, and a reader never sees half a file.

The cache folder is ``$ARCHOPT_CACHE`` if set, else the platform's user cache folder
(``$XDG_CACHE_HOME/archopt``, ``~/.cache/archopt``; ``~/Library/Caches/archopt`` on macOS,
``%LOCALAPPDATA%\\archopt\\cache`` on Windows). Everything in it can be rebuilt: ``archopt cache
clear`` empties it, and an entry that fails its checks is rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a temporary file older than this is from an interrupted write


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_orphaned_temporaries(path: Path) -> int:
    """Delete the temporary files of earlier writes of ``path`` whose process is gone (a
    ``kill -9`` mid-write): their names carry the writer's pid."""
    removed = 0
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*{TMP_SUFFIX}"):
        parts = tmp.name[len(path.name) + 2 : -len(TMP_SUFFIX)].split(".")
        if len(parts) == 2 and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    The file ends with the permissions the process's umask gives a new file (0644 usually),
    whatever ``write`` created it with (safetensors makes 0600 files); temporaries that an
    interrupted earlier write of ``path`` left behind are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    # A fresh name in the same folder (a rename across file systems is not atomic).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:  # named for the file asked for, not the temporary beside it
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = False) -> Path:
    """``path`` as a Path, once it is known that it can be written, before any work is done.

    For a file (``folder=False``): not an existing folder, and its nearest existing ancestor a
    folder this process may write in (the folders between are created when it is written).
    For a folder: not an existing file, and itself or its nearest existing ancestor writable.
    Nothing is created. ``ArchoptError`` naming ``what`` (``--plot``, ``--out``) otherwise.
    """
    from archopt.errors import ArchoptError

    if not str(path).strip():
        raise ArchoptError(f"{what} must name a path, got an empty one")
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise ArchoptError(f"{what} must be a file path, got {path}, which is a folder")
    if path.exists() and not path.is_dir() and folder:
        raise ArchoptError(f"{what} must be a folder, got {path}, which is a file")
    # A file is written by a rename in its folder: the folder must take new entries.
    ancestor = path if folder else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ArchoptError(
            f"{what} must be a path under folders, got {path}, but {ancestor} is a file"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ArchoptError(
            f"{what} must be a path this user may write, got {path}, but {ancestor} is not writable"
        )
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_temporaries(folder: Path, older_than_s: float = STALE_TMP_S) -> int:
    """Delete the temporary files that interrupted writes (``kill -9``) left in ``folder``."""
    removed = 0
    now = time.time()
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
    return removed


def cache_dir() -> Path:
    """archopt's cache folder (not created here); see the module docstring."""
    if os.environ.get("ARCHOPT_CACHE"):
        return Path(os.environ["ARCHOPT_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "archopt" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "archopt"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "archopt"


_SAID_UNWRITABLE: set[Path] = set()


def writable_cache_dir(sub: str) -> Path | None:
    """``cache_dir() / sub``, created; None when it cannot be written (callers run uncached,
    and the first time in a process a warning says so)."""
    folder = cache_dir() / sub
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}{TMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if cache_dir() not in _SAID_UNWRITABLE:
            _SAID_UNWRITABLE.add(cache_dir())
            import logging

            logging.getLogger("archopt").warning(
                "archopt: the cache folder %s cannot be written (%s); running uncached (set "
                "ARCHOPT_CACHE to a writable folder to keep compiled steps and loaded models)",
                cache_dir(),
                e.strerror or e,
            )
        return None
    return folder


def cache_entries() -> list[dict]:
    """What the cache folder holds: one dict per entry (``kind``: the subfolder, ``name``,
    ``bytes``, ``detail``: the ``summary`` of the entry's JSON record, if it has one)."""
    import json

    root = cache_dir()
    entries = []
    if not root.is_dir():
        return entries
    for kind in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sorted(kind.iterdir()):
            files = [f for f in entry.rglob("*") if f.is_file()] if entry.is_dir() else [entry]
            detail = ""
            for record in (f for f in files if f.suffix == ".json"):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    detail = json.loads(record.read_text()).get("summary", "") or detail
            if not detail and entry.is_dir() and not any(f.suffix == ".json" for f in files):
                detail = "incomplete (an interrupted or running build)"
            size = 0
            for f in files:
                with contextlib.suppress(OSError):
                    size += f.stat().st_size
            entries.append({"kind": kind.name, "name": entry.name, "bytes": size, "detail": detail})
    return entries


def clear_cache() -> int:
    """Delete everything in the cache folder; returns how many entries went."""
    import shutil

    root = cache_dir()
    removed = 0
    if not root.is_dir():
        return removed
    for kind in root.iterdir():
        items = list(kind.iterdir()) if kind.is_dir() else [kind]
        for entry in items:
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    return removed


def cpu_id() -> str:
    """This CPU's model name and feature flags (what a library compiled for it depends on)."""
    lines: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags") and name not in lines:
                    lines[name] = line.strip()
    except OSError:
        pass
    if lines:
        return " | ".join(lines.values())
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_tag() -> str:
    """A short digest of ``cpu_id()``: what records of builds for this CPU name it by."""
    import hashlib

    return hashlib.sha256(cpu_id().encode()).hexdigest()[:16]


# Fields of a cache entry's JSON record that change from one build of the same thing to the
# next (versions, keys, timings): records equal without them describe one thing, built twice.
VOLATILE_RECORD_FIELDS = frozenset(
    {
        "key",
        "created",
        "compile_seconds",
        "summary",
        "torch",
        "flags",
        "library_sha256",
        "format",
        "kernels",
    }
)
INCOMPLETE_AFTER_S = 3600.0  # a folder without a record this old is an interrupted build


def prune_cache(*, now: float | None = None) -> list[dict]:
    """Remove from the cache folder what nothing will load again: of the entries whose records
    describe the same thing (a decode step of one model, weights and thread count, built by an
    older archopt or torch; an older build of the CPU kernels; ...), all but the newest, and
    folders left without a record by builds interrupted over an hour ago. Files (latency
    tables, records of measurements) and entries whose record cannot be read are kept.
    Returns the removed entries (``kind``, ``name``, ``bytes``, ``why``)."""
    import json
    import shutil

    now = time.time() if now is None else now
    sizes = {(e["kind"], e["name"]): e["bytes"] for e in cache_entries()}
    root = cache_dir()
    doomed: list[tuple[Path, str]] = []
    for kind in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        groups: dict[str, list[tuple]] = {}
        for entry in sorted(p for p in kind.iterdir() if p.is_dir()):
            records = sorted(entry.glob("*.json"))
            if not records:
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > INCOMPLETE_AFTER_S:
                        doomed.append((entry, "an interrupted build"))
                continue
            try:
                record = json.loads(records[0].read_text())
                stamp = records[0].stat().st_mtime
            except (OSError, ValueError):
                continue
            if not isinstance(record, dict):
                continue
            same = {
                k: v for k, v in record.items() if k not in VOLATILE_RECORD_FIELDS and k != "cpu"
            }
            groups.setdefault(json.dumps(same, sort_keys=True, default=str), []).append(
                (str(record.get("created", "")), stamp, entry, record.get("cpu"))
            )
        for members in groups.values():
            # Newest first: the newest build for each CPU stays (a cache folder shared by
            # machines holds one for each); a record from before records named their CPU is
            # kept only when nothing newer exists.
            seen: set = set()
            for i, (*_, entry, cpu) in enumerate(sorted(members, reverse=True)):
                if (cpu is None and i == 0) or (cpu is not None and cpu not in seen):
                    seen.add(cpu)
                    continue
                doomed.append((entry, "superseded by a newer build of the same thing"))
    removed = []
    for entry, why in doomed:
        with contextlib.suppress(OSError):
            shutil.rmtree(entry)
            key = (entry.parent.name, entry.name)
            removed.append({"kind": key[0], "name": key[1], "bytes": sizes.get(key, 0), "why": why})
    return removed


def fingerprint(model, *extra) -> str:
    """A short digest of what a compiled or measured artefact of ``model`` depends on: its
    class, config, layer types and tensor names, shapes and dtypes (not the weights' values),
    plus ``extra``, torch's version, the CPU's vector capability and the thread count."""
    import hashlib
    import json

    import torch

    config = getattr(model, "config", None)
    parts = [
        type(model).__name__,
        repr({k: v for k, v in vars(config).items() if k != "extra"}) if config else "",
        [(n, type(m).__name__) for n, m in model.named_modules()],
        [(n, list(t.shape), str(t.dtype)) for n, t in model.state_dict().items()],
        [str(e) for e in extra],
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        torch.get_num_threads(),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def available_memory_bytes() -> int | None:
    """Memory the system can give a new allocation now (Linux: MemAvailable), else None."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_fits(what: str, nbytes: float) -> None:
    """ResourceError naming ``what`` when ``nbytes`` exceed the memory available now."""
    free = available_memory_bytes()
    if free is not None and nbytes > free:
        from archopt.errors import ResourceError

        raise ResourceError(
            f"{what} needs about {nbytes / 2**30:,.1f} GiB and this machine has "
            f"{free / 2**30:,.1f} GiB available"
        )
