"""archopt.io: atomic writes, their leftovers and permissions, the cache folder."""

import os
from pathlib import Path

import pytest

from archopt.io import (
    atomic_write,
    atomic_write_text,
    cache_dir,
    cache_entries,
    check_fits,
    clear_cache,
    writable_cache_dir,
)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt.json"
    atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]  # no temporary left


def test_files_get_the_umask_permissions_whatever_the_writer_made(tmp_path):
    target = tmp_path / "weights.bin"

    def private(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors creates them
        os.write(fd, b"data")
        os.close(fd)

    old = os.umask(0o022)
    try:
        atomic_write(target, private)
    finally:
        os.umask(old)
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.safetensors.999999999.0123abcd.tmp"  # no such pid
    live = tmp_path / f".model.safetensors.{os.getpid()}.89abcdef.tmp"
    other = tmp_path / ".other.999999999.0123abcd.tmp"
    for p in (dead, live, other):
        p.write_text("partial")
    atomic_write_text(target, "done")
    assert not dead.exists() and live.exists() and other.exists()
    assert target.read_text() == "done"


def test_cache_folder_from_the_environment_and_unwritable_ones(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert writable_cache_dir("steps") == tmp_path / "c" / "steps"
    assert cache_entries() == []
    (tmp_path / "c" / "steps" / "half-built").mkdir()
    (entry,) = cache_entries()
    assert entry["detail"].startswith("incomplete")
    assert clear_cache() == 1 and cache_entries() == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("ARCHOPT_CACHE", str(blocker))
    with caplog.at_level("WARNING", logger="archopt"):
        assert writable_cache_dir("steps") is None
        assert writable_cache_dir("llm") is None
    said = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(said) == 1 and "running uncached" in said[0].getMessage()  # once


def test_check_fits_names_the_request_and_the_machine():
    check_fits("a small tensor", 1024)
    with pytest.raises(ValueError, match=r"a planet needs about [\d,.]+ GiB and this machine has"):
        check_fits("a planet", 1e18)


def test_check_writable_refuses_before_any_work_and_creates_nothing(tmp_path, monkeypatch):
    import archopt.io
    from archopt.errors import ArchoptError
    from archopt.io import check_writable

    a_file = tmp_path / "a file"
    a_file.write_text("x")
    deep = tmp_path / "new" / "deeper" / "x.png"
    assert check_writable(deep, "--plot") == deep and not (tmp_path / "new").exists()
    assert check_writable(tmp_path / "run", "--out", folder=True) == tmp_path / "run"
    assert check_writable(a_file, "--json") == a_file  # replaced when written
    cases = [
        ((tmp_path, "--plot"), {}, rf"--plot must be a file path, got {tmp_path}, which is a"),
        ((a_file, "--out"), {"folder": True}, rf"--out must be a folder, got {a_file}, which is"),
        ((a_file / "x.png", "--plot"), {}, rf"under folders, got {a_file}/x\.png, but {a_file} is"),
        (("", "--json"), {}, "--json must name a path, got an empty one"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ArchoptError, match=message):
            check_writable(*args, **kwargs)
    # a folder this user may not write (monkeypatched: root may write anywhere)
    monkeypatch.setattr(archopt.io.os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(ArchoptError, match=rf"may write, got {tmp_path}/x\.png, but {tmp_path} is"):
        check_writable(tmp_path / "x.png", "--plot")


def test_save_figure_creates_its_folders_and_writes_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    from archopt.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "a" / "b" / "front.png", dpi=50)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["front.png"]  # no temporary left


def test_prune_keeps_the_newest_build_of_each_thing_and_what_it_cannot_read(tmp_path, monkeypatch):
    import json
    import time

    from archopt.io import cache_entries, prune_cache

    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path))

    def entry(kind: str, name: str, record: dict | str | None, age_s: float = 0.0) -> Path:
        folder = tmp_path / kind / name
        folder.mkdir(parents=True)
        (folder / "payload.bin").write_bytes(b"x" * 1000)
        if record is not None:
            text = record if isinstance(record, str) else json.dumps(record)
            (folder / "record.json").write_text(text)
        stamp = time.time() - age_s
        os.utime(folder, (stamp, stamp))
        return folder

    step = {"kind": "static", "model": "m.gguf", "weights": "gguf", "threads": 2}
    old = entry("steps", "llama-old", {**step, "key": "a", "created": "2026-01-01 00:00:00"})
    new = entry("steps", "llama-new", {**step, "key": "b", "created": "2026-02-01 00:00:00",
                                       "torch": "9.9", "kernels": "k2", "cpu": "A"})  # fmt: skip
    other_cpu = entry("steps", "llama-b", {**step, "created": "2026-01-15 00:00:00", "cpu": "B"})
    other_model = entry("steps", "llama-m2", {**step, "model": "m2.gguf", "created": "2025"})
    paged = entry("steps", "llama-paged-x", {**step, "kind": "paged", "created": "2025"})
    k_old = entry("kernels", "k1", {"key": "k1", "created": "2026-01-01 00:00:00"})
    k_new = entry("kernels", "k2", {"key": "k2", "created": "2026-02-01 00:00:00"})
    stuck = entry("kernels", "k-interrupted", None, age_s=7200)
    running = entry("kernels", "k-building", None)  # a build in progress: no record yet
    unreadable = entry("llm", "odd", "{not json")
    (tmp_path / "latency").mkdir()
    (tmp_path / "latency" / "table-1.json").write_text("{}")

    removed = prune_cache()
    assert {e["name"] for e in removed} == {"llama-old", "k1", "k-interrupted"}
    assert all(e["bytes"] >= 1000 for e in removed)
    for gone in (old, k_old, stuck):
        assert not gone.exists()
    for kept in (new, other_cpu, other_model, paged, k_new, running, unreadable):
        assert kept.exists()
    assert (tmp_path / "latency" / "table-1.json").exists()
    assert prune_cache() == [] and len(cache_entries()) == 8
