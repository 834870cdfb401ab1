"""Atomic file writes: a model, a resume state or a table is either the old file or the whole new one.

One helper for every writer, so none of them leaves half a file behind when the process is killed, the disk
fills or a second viewer writes at the same time.
"""
from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Callable

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
    # unique (concurrent writers never clash), hidden, and ending in the real name so writers that choose the
    # format by the suffix (imageio, nibabel's .nii.gz, matplotlib) write the right one
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        with open(tmp, "xb"):  # a plain new file shows the umask's mode without touching the process umask
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # also KeyboardInterrupt
        tmp.unlink(missing_ok=True)
        if _disk_full(err):
            raise OSError(errno.ENOSPC, f"{path}: no space left on device while writing it; free some space or "
                          "choose another folder (the previous file, if any, is unchanged)") from err
        raise
    return path


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
