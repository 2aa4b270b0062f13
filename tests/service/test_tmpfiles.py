"""service.tmpfiles: per-process temp dirs and the sweep that removes what dead processes left."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service.tmpfiles import host_tag, sweep, temp_dir


def entry(root: Path, pid: int, host: str | None = None, age_s: float = 0.0) -> Path:
    path = root / f"upload-{pid}-{host or host_tag()}0123abcd"
    path.mkdir(parents=True)
    (path / "upload").write_bytes(b"half a file")
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def test_temp_dir_is_named_by_pid_and_removed_on_exit(tmp_path):
    with temp_dir(tmp_path / "tmp", "upload") as d:
        assert d.parent == tmp_path / "tmp" and d.is_dir()
        assert d.name.startswith(f"upload-{os.getpid()}-{host_tag()}")
        (d / "f").write_bytes(b"x")
        assert sweep(tmp_path / "tmp", 0) == []  # ours, alive
    assert not d.exists()
    with pytest.raises(RuntimeError), temp_dir(tmp_path / "tmp", "job-x") as d2:
        raise RuntimeError("boom")
    assert not d2.exists()


def test_sweep_removes_dead_owners_and_keeps_live_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while (Path(f"/proc/{zombie.pid}/stat").exists() and
               Path(f"/proc/{zombie.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        root = tmp_path / "tmp"
        gone = [entry(root, dead.pid), entry(root, zombie.pid)]
        kept = [entry(root, live.pid), entry(root, os.getpid(), age_s=7200)]
        assert sorted(sweep(root, 3600)) == sorted(gone)
        assert all(not p.exists() for p in gone) and all(p.is_dir() for p in kept)
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_a_reused_pid_does_not_keep_an_old_entry(tmp_path):
    """The pid is alive, but its process started after the entry was last written."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = entry(tmp_path, live.pid, age_s=600)
        assert sweep(tmp_path, 3600) == [old]
    finally:
        live.kill()
        live.wait()


def test_foreign_and_unnamed_entries_go_only_when_old(tmp_path):
    other_host = "ffffff" if host_tag() != "ffffff" else "eeeeee"
    young = [entry(tmp_path, 1, host=other_host), tmp_path / "tmpabc123"]
    young[1].mkdir()
    old_foreign = entry(tmp_path, 2, host=other_host, age_s=7200)
    old_file = tmp_path / "stray.bin"
    old_file.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(young[1])
    for path in (old_file, link):
        os.utime(path, (time.time() - 7200,) * 2, follow_symlinks=False)
    removed = sweep(tmp_path, 3600)
    assert sorted(removed) == sorted([old_foreign, old_file, link])
    assert all(p.exists() for p in young)  # the link's target is untouched


def test_sweep_of_a_missing_root_is_empty(tmp_path):
    assert sweep(tmp_path / "nope", 0) == []
