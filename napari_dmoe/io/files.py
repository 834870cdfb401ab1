"""Atomic file writes: a model, a resume state or a table is either the old file or the whole new one.

One helper for every writer, so none of them leaves half a file behind when the process is killed, the disk
fills or a second viewer writes at the same time.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

try:  # a writer holds a lock on its temporary file, so a cleaner can tell a live write from a killed one
    import fcntl
except ImportError:  # Windows: leftovers are judged by age alone
    fcntl = None  # type: ignore[assignment]

# What a full disk (or quota) looks like from writers that wrap the OS error in their own type (safetensors'
# SafetensorError carries the Rust io::Error text, matplotlib and tifffile pass OSError through).
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("no space left", "storagefull", "quota exceeded", "code: 28")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary name in the same folder, flush it to disk, then rename it over
    ``path``. If anything fails the temporary file is removed and the old ``path`` is untouched.

    The file gets the user's usual permissions (what a plain open gives under the umask). Writers that make
    private files (``tempfile.mkstemp``, safetensors' ``save_file``: 0600) would otherwise hide a model from
    colleagues on a shared server."""
    path = Path(path)
    # unique (concurrent writers never clash), hidden, and ending in the real name (shortened to fit the file
    # system's name limit) so writers that choose the format by the suffix (imageio, matplotlib) write the right one
    tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{tmp_tail(path)}")
    lock = None
    try:
        lock = open(tmp, "xb")  # a plain new file shows the umask's mode without touching the process umask
        _hold(lock)  # until the rename: clean_leftovers never removes a live write
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        lock.close()
    except BaseException as err:  # also KeyboardInterrupt
        if lock is not None:
            lock.close()
        tmp.unlink(missing_ok=True)
        if _disk_full(err):
            raise OSError(errno.ENOSPC, f"{path}: no space left on device while writing it; free some space or "
                          "choose another folder (the previous file, if any, is unchanged)") from err
        raise
    return path


def _hold(lock: Any) -> None:
    """Lock the temporary file for the writer's lifetime (released by the OS if the process dies)."""
    if fcntl is None:  # Windows cannot rename a file that is open: no lock, leftovers are judged by age
        lock.close()
        return
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: the age rule still protects a write younger than the margin
        pass


TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"\.tmp-[0-9a-f]{12}-(.+)\Z", re.S)
_NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems
LEFTOVER_MIN_AGE_S = 2.0  # a temporary file this fresh may be a writer that has not taken its lock yet
LEFTOVER_NO_LOCK_AGE_S = 3600.0  # without file locks (Windows): only files this old are called leftovers


@functools.lru_cache(maxsize=256)  # one question per folder, not one per file of a 100,000-case batch
def _name_max(folder: str) -> int:
    try:
        return min(_NAME_MAX, int(os.pathconf(folder, "PC_NAME_MAX")))
    except (OSError, ValueError, AttributeError):
        return _NAME_MAX


def tmp_tail(path: str | os.PathLike) -> str:
    """The part of ``path``'s name after the temporary prefix: the whole name, or (a long name that would not fit
    the 255-byte limit with the 18-character prefix) its start cut so that the suffix (``.nii.gz``) stays."""
    folder, name = os.path.split(os.fspath(path))
    room = _name_max(folder or ".") - len(TMP_PREFIX) - 13
    if len(name) <= room // 4 or len(os.fsencode(name)) <= room:  # UTF-8: at most 4 bytes a character
        return name
    dots = name.split(".")
    suffix = "." + ".".join(dots[-2:]) if len(dots) > 2 and len(dots[-1]) <= 4 and len(dots[-2]) <= 4 else \
        ("." + dots[-1] if len(dots) > 1 and len(dots[-1]) <= 8 else "")
    stem = name[: len(name) - len(suffix)]
    while stem and len(os.fsencode(stem + "~" + suffix)) > room:
        stem = stem[:-1]
    return stem + "~" + suffix


def clean_leftovers(outputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the temporary files a killed writer of one of ``outputs`` left beside it (``.tmp-<id>-<name>``),
    never a live write (its lock is held; without locks, files younger than an hour are kept) nor a file that is
    not the temporary of one of ``outputs``. One listing per folder; returns what was removed."""
    wanted: dict[str, set[str]] = {}
    for out in outputs:
        wanted.setdefault(os.path.dirname(os.fspath(out)) or ".", set()).add(tmp_tail(out))
    removed = []
    now = time.time()
    for folder, tails in wanted.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # no folder yet: nothing left behind
            continue
        for entry in entries:
            match = _TMP_NAME.match(entry.name)
            if match is None or match.group(1) not in tails or not entry.is_file(follow_symlinks=False):
                continue
            if _remove_if_dead(Path(entry.path), now):
                removed.append(Path(entry.path))
    return removed


def _remove_if_dead(path: Path, now: float) -> bool:
    try:
        age = now - path.stat().st_mtime
        if age < LEFTOVER_MIN_AGE_S or (fcntl is None and age < LEFTOVER_NO_LOCK_AGE_S):
            return False
        with open(path, "rb") as f:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # a live writer holds it
                    return False
            path.unlink()
        return True
    except OSError:  # gone meanwhile, or not ours to remove
        return False


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    return not isinstance(err, OSError) and any(w in str(err).lower() for w in _FULL_WORDS)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
