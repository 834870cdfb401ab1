"""Atomic file writes: a model, a resume state or a table is either the old file or the whole new one.

One helper for every writer, so none of them leaves half a file behind when the process is killed, the disk
fills or a second viewer writes at the same time.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary name in the same folder, flush it to disk, then rename it over
    ``path``. If anything fails the temporary file is removed and the old ``path`` is untouched.

    The file gets the user's usual permissions (what a plain open gives under the umask). Writers that make
    private files (``tempfile.mkstemp``, safetensors' ``save_file``: 0600) would otherwise hide a model from
    colleagues on a shared server."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # unique: concurrent writers never clash
    try:
        with open(tmp, "xb"):  # a plain new file shows the umask's mode without touching the process umask
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt
        tmp.unlink(missing_ok=True)
        raise
    return path
