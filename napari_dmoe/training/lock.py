"""One ``dmoe train`` per output folder: a lock file ``train.lock`` holding pid, host, start time and command.

Two runs on one ``output_dir`` would interleave their checkpoints and resume states. The lock is made with
``os.link`` of a complete temporary file (atomic, fails when the lock exists), so a reader never sees half a
lock. A lock left by a killed run (its pid is dead on this host) is taken over with a note; a lock from another
host or a live process is a refusal that says how to clear it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

LOCK_NAME = "train.lock"


class LockError(ValueError):
    """The output folder is used by another run; the message says which and how to clear it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stale(info: dict[str, Any]) -> bool:
    """Left by a dead process on this host (a lock from another host cannot be judged from here)."""
    pid = info.get("pid")
    return info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "an unreadable lock"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid')} on {info.get('host')}, started {when}"


def acquire(folder: str | os.PathLike, command: str | None = None) -> Path:
    """Take the lock of ``folder`` for this process; return the lock path. Raises LockError when held."""
    folder = Path(folder)
    lock = folder / LOCK_NAME
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command,
            "token": uuid.uuid4().hex}
    tmp = folder / f".{LOCK_NAME}.{mine['token']}"
    tmp.write_text(json.dumps(mine), encoding="utf-8")
    try:
        for _ in range(3):  # a stale lock taken over by another process at the same moment: look again
            try:
                os.link(tmp, lock)
                return lock
            except FileExistsError:
                pass
            info = _read(lock)
            if info is None:
                continue  # released meanwhile
            if not _stale(info):
                raise LockError(
                    f"{folder} is in use by another dmoe train run ({_describe(info)}); wait for it to finish or "
                    f"choose another output_dir. If no such run is alive, delete {lock}")
            aside = folder / f".{LOCK_NAME}.stale.{mine['token']}"
            try:
                os.rename(lock, aside)  # only one process can move a given lock aside
            except FileNotFoundError:
                continue
            if _read(aside) != info:  # moved a fresh lock of a racing run: put it back
                os.replace(aside, lock)
                continue
            aside.unlink(missing_ok=True)
            print(f"note: {folder}: took over the lock of a run that is gone ({_describe(info)})", file=sys.stderr)
        raise LockError(f"{folder}: could not take {lock} (several runs starting at once?); try again")
    finally:
        tmp.unlink(missing_ok=True)


def release(lock: str | os.PathLike) -> None:
    """Remove ``lock`` if this process holds it."""
    lock = Path(lock)
    info = _read(lock)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)
