"""Output-path policy for every command that writes results (nnU-Net's practice).

- Nothing we write may replace an input: an output that is, resolves to (symlink) or is a hard link of an input
  file is refused, and so is an output inside an input DICOM series folder (it would join the series).
- An existing output is replaced only with ``overwrite=True`` (``--overwrite``); without it a single run refuses
  and a batch skips the case with a note, so a killed batch continues where it stopped.
- Two cases of one batch whose outputs would share a name (``a.png`` and ``sub/a.png``, a duplicated row) are
  refused before any work, naming both rows; we do not invent names the user would have to guess.
- A case is complete when its final output exists: writers go through ``files.atomic_write`` and the file that
  marks completion (the label map) is written last, so a half-written case never looks done.

Used by ``dmoe segment`` (single and batch), ``dmoe compare`` and, for sharded runs, ``dmoe evaluate``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence


class OutputError(ValueError):
    """An output path breaks the policy; the message names the path and what to do."""


@dataclass
class PlannedCase:
    """One case of a batch: where it is named (``where``: "row 3" or similar), its input, its outputs (the last
    one is written last and marks the case complete) and ``key``, the name its outputs derive from."""

    where: str
    source: Path
    outputs: list[Path]
    key: str = ""
    skip: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def marker(self) -> Path:
        return self.outputs[-1]


def _same(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file: the same path once resolved, or the same inode (hard link)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def protect_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "output") -> None:
    """Refuse ``output`` when it is an input (a file, its symlink or hard link) or lies inside an input folder."""
    out = Path(output)
    for item in inputs:
        src = Path(item)
        if _same(out, src):
            raise OutputError(f"{what} {out} is the input {src}; napari-dmoe never writes over an input, choose "
                              "another output name")
        if src.is_dir():
            try:
                inside = out.resolve().is_relative_to(src.resolve())
            except OSError:
                inside = False
            if inside:
                raise OutputError(f"{what} {out} lies inside the input folder {src} (it would be read with it next "
                                  "time); write it elsewhere")


def check_new(output: str | os.PathLike, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing ``output`` unless ``overwrite``; refuse a folder where a file is asked for."""
    out = Path(output)
    if out.is_dir():
        raise OutputError(f"{what} {out} is a folder; give a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{what} {out} exists; pass --overwrite to replace it (napari-dmoe never replaces a "
                          "file without being told)")


def check_single(outputs: Sequence[str | os.PathLike], inputs: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """A one-case run: no output may be an input, no existing output is replaced without ``overwrite``."""
    inputs = list(inputs)
    for out in outputs:
        protect_inputs(out, inputs)
        check_new(out, overwrite)


def plan_batch(cases: list[PlannedCase], inputs: Iterable[str | os.PathLike], overwrite: bool) -> list[PlannedCase]:
    """Check a batch before any work: collisions between cases (refused, naming both), outputs that are inputs
    (refused), finished cases (``skip`` with a note unless ``overwrite``). Returns ``cases``."""
    inputs = [*inputs, *(c.source for c in cases)]
    seen_keys: dict[str, PlannedCase] = {}
    seen_paths: dict[Path, PlannedCase] = {}
    for case in cases:
        if case.key:
            other = seen_keys.get(case.key)
            if other is not None:
                raise OutputError(_collision(other, case, f"outputs named after {case.key!r}"))
            seen_keys[case.key] = case
        for out in case.outputs:
            key = Path(os.path.abspath(out))
            other = seen_paths.get(key)
            if other is not None and other is not case:
                raise OutputError(_collision(other, case, str(out)))
            seen_paths[key] = case
            protect_inputs(out, inputs)
            if Path(out).is_dir():
                raise OutputError(f"output {out} ({case.where}) is a folder; remove or rename it")
        if is_complete(case) and not overwrite:
            case.skip = True
            case.notes.append(f"{case.marker} exists: skipped (pass --overwrite to redo it)")
    return cases


def is_complete(case: PlannedCase) -> bool:
    """Its marker (last output, written last and atomically) exists."""
    return case.marker.is_file()


def _collision(a: PlannedCase, b: PlannedCase, target: str) -> str:
    return (f"{a.where} ({a.source}) and {b.where} ({b.source}) would both write {target}; rename one of the "
            "images or remove the duplicate row")
