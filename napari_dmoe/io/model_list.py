"""Which models the user can pick: the bundled demo models plus a per-user list of recently used files.

No Qt, no torch. The recent list is a small JSON file in the user config folder (platformdirs), or in
``$NAPARI_DMOE_CONFIG_DIR`` when set (tests, shared machines). State lives in that file, not in the process.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from napari_dmoe.io.files import atomic_write

MODEL_SUFFIX = ".safetensors"
RECENT_FILE = "recent_models.json"
RECENT_LIMIT = 10
CONFIG_ENV = "NAPARI_DMOE_CONFIG_DIR"


class RegistryError(ValueError):
    """A path given to the registry is not a model file."""


@dataclass(frozen=True)
class ModelEntry:
    """One pickable model: a display name, its file and where it comes from ("bundled" or "recent")."""

    name: str
    path: Path
    source: str

    @property
    def label(self) -> str:
        return f"{'demo' if self.source == 'bundled' else 'recent'}: {self.name}"


def bundled_dir() -> Path:
    """Folder of the demo models shipped inside the package."""
    return Path(__file__).parent.parent / "assets" / "models"


def config_dir() -> Path:
    """Per-user config folder (created on first write, never on read)."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override)
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-dmoe", appauthor=False))


def bundled_models() -> list[ModelEntry]:
    """Every ``*.safetensors`` under the bundled models folder, sorted by name (empty if none ship yet)."""
    folder = bundled_dir()
    if not folder.is_dir():
        return []
    return [ModelEntry(p.stem, p, "bundled") for p in sorted(folder.glob(f"*{MODEL_SUFFIX}"))]


def _recent_path() -> Path:
    return config_dir() / RECENT_FILE


def recent_models() -> list[ModelEntry]:
    """Recently used model files that still exist, most recent first.

    A missing or unreadable list is treated as empty: it is our own cache, and losing it only costs a re-browse.
    """
    try:
        data = json.loads(_recent_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = data.get("recent", []) if isinstance(data, dict) else []
    out = []
    for item in paths:
        if isinstance(item, str) and Path(item).is_file():
            out.append(ModelEntry(Path(item).stem, Path(item), "recent"))
    return out


def add_recent(path: str | os.PathLike, limit: int = RECENT_LIMIT) -> list[ModelEntry]:
    """Put ``path`` at the top of the recent list (deduplicated, at most ``limit``); return the new list.

    Bundled models are not recorded: they are always listed anyway.
    """
    path = Path(path).expanduser().resolve()
    if path.suffix != MODEL_SUFFIX:
        raise RegistryError(f"{path}: not a model file; napari-dmoe models end in {MODEL_SUFFIX}")
    if not path.is_file():
        raise RegistryError(f"{path}: file not found")
    if path.parent == bundled_dir().resolve():
        return recent_models()
    paths = [str(path)] + [str(e.path) for e in recent_models() if e.path.resolve() != path]
    target = _recent_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"recent": paths[:limit]}, indent=1)
    atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # two viewers at once: no half file
    return recent_models()


def list_models() -> list[ModelEntry]:
    """Bundled models first, then recent ones (a file in both lists appears once)."""
    bundled = bundled_models()
    seen = {e.path.resolve() for e in bundled}
    return bundled + [e for e in recent_models() if e.path.resolve() not in seen]
