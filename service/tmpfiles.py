"""Temp directories that a later sweep can attribute to the process that made them.

`temp_dir(root, prefix)` makes `<root>/<prefix>-<pid>-<host tag><random>` and removes it on exit.
A process that is killed (SIGKILL, OOM, power loss) never reaches the exit, so `sweep(root,
max_age_s)` removes what dead processes left behind: an entry named by this host whose pid is not
alive (or was reused by a process started after the entry) goes at once; an entry of another host
(a shared volume) or with a name this module did not make goes once it is older than max_age_s.
The entries of running processes are never touched."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(?P<prefix>.+)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})[0-9a-f]{8}$")
# /proc start times have a resolution of a clock tick and boot time a second
_START_SLACK_S = 2.0


@lru_cache(maxsize=1)
def host_tag() -> str:
    """Six hex digits naming this host (its hostname), so that a sweep never judges the pids of
    another host or container sharing the directory."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


@contextlib.contextmanager
def temp_dir(root: Path, prefix: str) -> Iterator[Path]:
    """A new private directory `<prefix>-<pid>-<random>` under `root`, removed with everything in
    it when the block exits (normally or by an exception)."""
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"bad temp dir prefix {prefix!r}")
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = root / f"{prefix}-{os.getpid()}-{host_tag()}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _proc_state(pid: int) -> tuple[str, float | None] | None:
    """(state letter, start time as a Unix time) from /proc, or None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except FileNotFoundError:
        return ("X", None)  # gone
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 20:
        return None
    boot = _boot_time()
    start = None if boot is None else boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return fields[0], start


def owner_alive(pid: int, entry_mtime: float) -> bool:
    """Whether process `pid` is running and could have made an entry last modified at
    `entry_mtime` (a process started after that is a reused pid, not the owner)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    state = _proc_state(pid)
    if state is None:
        return True
    letter, start = state
    if letter in ("Z", "X", "x"):  # exited, not yet reaped by its parent
        return False
    return not (start is not None and start > entry_mtime + _START_SLACK_S)


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        log.warning("could not remove stale temp entry %s", path, exc_info=True)
        return False
    return True


def sweep(root: Path, max_age_s: float) -> list[Path]:
    """Remove the entries of `root` that no running process owns (see the module doc); returns
    what was removed."""
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    now, removed = time.time(), []
    for entry in entries:
        try:
            mtime = entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        match = _NAME.match(entry.name)
        if match and match["host"] == host_tag():
            if owner_alive(int(match["pid"]), mtime):
                continue
        elif now - mtime < max_age_s:
            continue
        if _remove(entry):
            removed.append(entry)
    if removed:
        log.warning("removed %d temp entries left by dead processes under %s: %s", len(removed),
                    root, [p.name for p in removed[:10]])
    return removed
