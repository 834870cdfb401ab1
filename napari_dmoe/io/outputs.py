"""Output-path policy for every command that writes results (nnU-Net's practice).

- Nothing we write may replace an input: an output that is, resolves to (symlink) or is a hard link of an input
  file is refused, and so is an output inside an input DICOM series folder (it would join the series).
- An existing output is replaced only with ``overwrite=True`` (``--overwrite``); without it a single run refuses
  and a batch skips the case with a note, so a killed batch continues where it stopped.
- Two cases of one batch whose outputs would share a name (``a.png`` and ``sub/a.png``, a duplicated row) are
  refused before any work, naming both rows; we do not invent names the user would have to guess.
- A case is complete when its final output exists and is a whole file of its format (an empty or cut file is
  not): writers go through ``files.atomic_write`` and the file that marks completion (the label map) is written
  last, so a half-written case never looks done. Temporary files a killed run left beside an output are removed.
- Planning is linear: the inputs are indexed once, each case costs a constant number of file-system calls.

Used by every verb that writes: ``dmoe segment`` (single and batch), ``compare``, ``evaluate``,
``finetune-compare`` and ``import-official``.
"""
from __future__ import annotations

import os
import stat
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


class _Inputs:
    """The inputs of a run, indexed once (resolved paths, inodes, folders) so each output is checked in a
    constant number of file-system calls: a batch of N cases costs O(N), not O(N^2) (issue 28: 1,000 rows took
    minutes before the first image)."""

    def __init__(self, inputs: Iterable[str | os.PathLike]) -> None:
        self.files: dict[str, str] = {}
        self.inodes: dict[tuple[int, int], str] = {}
        self.folders: dict[str, str] = {}
        self._real_dirs: dict[str, str] = {}  # a folder resolved once for all the files in it
        for item in inputs:
            src = os.fspath(item)
            try:
                st = os.stat(src)
            except OSError:  # not there (yet): only its name can clash
                st = None
            if st is not None and stat.S_ISDIR(st.st_mode):
                self.folders.setdefault(self.real(src), src)
                continue
            self.files.setdefault(self.real(src), src)
            if st is not None:
                self.inodes.setdefault((st.st_dev, st.st_ino), src)

    def real(self, path: str) -> str:
        """``os.path.realpath(path)`` with its folder's resolution cached: one lstat a file, not one a component."""
        folder, name = os.path.split(os.path.abspath(path))
        real_dir = self._real_dirs.get(folder)
        if real_dir is None:
            real_dir = self._real_dirs[folder] = os.path.realpath(folder)
        candidate = os.path.join(real_dir, name)
        return os.path.realpath(candidate) if os.path.islink(candidate) else candidate

    def check(self, output: str | os.PathLike, what: str = "output", st: os.stat_result | None = None) -> None:
        """Refuse ``output`` if it is an input or lies in an input folder; ``st``: its ``os.stat`` when known."""
        out = os.fspath(output)
        real = self.real(out)
        if self.folders:
            parent = os.path.dirname(real)
            while True:
                folder = self.folders.get(parent)
                if folder is not None:
                    raise OutputError(f"{what} {out} lies inside the input folder {folder} (it would be read with "
                                      "it next time); write it elsewhere")
                up = os.path.dirname(parent)
                if up == parent:
                    break
                parent = up
        src = self.files.get(real) or self.folders.get(real)
        if src is None and self.inodes:
            if st is None:
                try:
                    st = os.stat(out)
                except OSError:
                    st = None
            src = None if st is None else self.inodes.get((st.st_dev, st.st_ino))
        if src is not None:
            raise OutputError(f"{what} {out} is the input {src}; napari-dmoe never writes over an input, choose "
                              "another output name")


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: its absolute name is all we can compare
        return Path(os.path.abspath(path))


def protect_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "output") -> None:
    """Refuse ``output`` when it is an input (a file, its symlink or hard link) or lies inside an input folder."""
    _Inputs(inputs).check(output, what)


def check_new(output: str | os.PathLike, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing ``output`` unless ``overwrite``; refuse a folder where a file is asked for."""
    out = Path(output)
    if out.is_dir():
        raise OutputError(f"{what} {out} is a folder; give a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"{what} {out} exists; pass --overwrite to replace it (napari-dmoe never replaces a "
                          "file without being told)")


def check_single(outputs: Sequence[str | os.PathLike], inputs: Iterable[str | os.PathLike], overwrite: bool,
                 what: str = "output") -> list[Path]:
    """A one-case run (any verb that writes files): no output may be an input, no existing output is replaced
    without ``overwrite``, two outputs may not be one file. Removes what a killed earlier run left beside the
    outputs (``files.clean_leftovers``) and returns it."""
    from napari_dmoe.io.files import clean_leftovers

    guard = _Inputs(inputs)
    seen: dict[Path, Path] = {}
    for out in outputs:
        real = _resolved(Path(out))
        if real in seen:
            raise OutputError(f"{what} {out} and {seen[real]} are one file; give two different names")
        seen[real] = Path(out)
        guard.check(out, what)
        check_new(out, overwrite, what)
    return clean_leftovers(outputs)


def plan_batch(cases: list[PlannedCase], inputs: Iterable[str | os.PathLike], overwrite: bool) -> list[PlannedCase]:
    """Check a batch before any work: collisions between cases (refused, naming both), outputs that are inputs
    (refused), finished cases (``skip`` with a note unless ``overwrite``), outputs that exist but are not complete
    (an empty file is redone; another file is refused unless ``overwrite``), leftovers of a killed run (removed).
    A constant number of file-system calls per case. Returns ``cases``."""
    from napari_dmoe.io.files import clean_leftovers

    guard = _Inputs([*inputs, *(c.source for c in cases)])
    seen_keys: dict[str, PlannedCase] = {}
    seen_paths: dict[str, PlannedCase] = {}
    for case in cases:
        if case.key:
            other = seen_keys.get(case.key)
            if other is not None:
                raise OutputError(_collision(other, case, f"outputs named after {case.key!r}"))
            seen_keys[case.key] = case
        for out in case.outputs:
            key = os.path.abspath(out)
            other = seen_paths.get(key)
            if other is not None and other is not case:
                raise OutputError(_collision(other, case, str(out)))
            seen_paths[key] = case
            try:
                st: os.stat_result | None = os.stat(out)
            except OSError:
                st = None
            guard.check(out, st=st)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise OutputError(f"output {out} ({case.where}) is a folder; remove or rename it")
            if out is case.marker and st is None:
                continue  # nothing there: not done, nothing to judge
            if out is case.marker:
                _judge_marker(case, overwrite)
    for path in clean_leftovers(out for case in cases for out in case.outputs):
        note = f"removed {path.name}, a temporary file a stopped run left behind"
        owner = seen_paths.get(os.path.join(os.path.abspath(path.parent), _final_name(path)))
        if owner is not None:
            owner.notes.insert(0, note)  # a skipped case's last note says why it is skipped
    return cases


def _final_name(tmp: Path) -> str:
    return tmp.name.split("-", 2)[-1]


def _judge_marker(case: PlannedCase, overwrite: bool) -> None:
    """Skip a finished case; redo one whose marker is empty; refuse one whose marker is not a whole file."""
    if overwrite:
        return
    state = completeness(case.marker)
    if state == "complete":
        case.skip = True
        case.notes.append(f"{case.marker} exists: skipped (pass --overwrite to redo it)")
    elif state == "empty":  # holds nothing: a stopped run's or a failed tool's file; replacing it loses nothing
        case.notes.append(f"{case.marker} exists but is empty (0 bytes): segmented again")
    elif state != "missing":
        raise OutputError(f"{case.marker} ({case.where}) exists but is not a complete {state} file; remove it, or "
                          "pass --overwrite to replace it")


def is_complete(case: PlannedCase) -> bool:
    """Its marker (last output, written last and atomically) exists and is a whole file of its format."""
    return completeness(case.marker) == "complete"


# leading bytes of each format we write, and (PNG) the chunk a whole file ends with
_MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".gz": (b"\x1f\x8b",),
          ".tif": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), ".nrrd": (b"NRRD",)}
_MAGIC[".tiff"] = _MAGIC[".tif"]
_PNG_END = b"IEND\xaeB`\x82"


def completeness(path: str | os.PathLike) -> str:
    """"missing", "empty", "complete", or the format name when the file is not a whole file of its format
    (checked by its first bytes, and a PNG by its last chunk): a 0-byte or cut label map never counts as done."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    if size == 0:
        return "empty"
    name = path.name.lower()
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(352)
            tail = b""
            if suffix == ".png":
                f.seek(max(0, size - 8))
                tail = f.read(8)
    except OSError:
        return suffix.lstrip(".") or "file"
    if suffix in (".nii", ".nii.gz"):
        ok = _nifti_whole(path, size, gz=suffix == ".nii.gz")
    elif suffix == ".dcm":
        ok = head[128:132] == b"DICM"
    elif suffix in _MAGIC:
        ok = head.startswith(_MAGIC[suffix]) and (suffix != ".png" or tail == _PNG_END)
    else:
        ok = True
    return "complete" if ok else suffix.lstrip(".")


def _collision(a: PlannedCase, b: PlannedCase, target: str) -> str:
    return (f"{a.where} ({a.source}) and {b.where} ({b.source}) would both write {target}; rename one of the "
            "images or remove the duplicate row")


def _nifti_whole(path: Path, size: int, gz: bool) -> bool:
    """A NIfTI-1 file holds the bytes its header promises: for .nii.gz the gzip trailer's length (mod 2**32) must
    match the header's, which a cut file fails (reading the header and the last 8 bytes, never the voxels)."""
    import struct
    import zlib

    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
            if gz:
                f.seek(max(0, size - 4))
                isize = int.from_bytes(f.read(4), "little")
        head = zlib.decompressobj(31).decompress(raw, 352) if gz else raw
    except (OSError, zlib.error):
        return False
    if len(head) < 348:
        return False
    order = "<" if struct.unpack("<i", head[:4])[0] == 348 else ">"
    if struct.unpack(order + "i", head[:4])[0] != 348 or head[344:347] not in (b"n+1", b"ni1"):
        return False
    dims = struct.unpack(order + "8h", head[40:56])
    bitpix = struct.unpack(order + "h", head[72:74])[0]
    offset = int(struct.unpack(order + "f", head[108:112])[0]) if head[344:347] == b"n+1" else 352
    if not 1 <= dims[0] <= 7 or bitpix <= 0:
        return False
    voxels = 1
    for n in dims[1:dims[0] + 1]:
        voxels *= max(int(n), 0)
    expected = max(offset, 348) + voxels * bitpix // 8
    return (isize == expected % 2**32) if gz else size >= expected


def plan_label_outputs(rows: Sequence[tuple[str, object]], src: Path, out: Path, dicom_seg: bool,
                       inputs: list[Path], overwrite: bool, where: str = "CSV row {row}") -> list[PlannedCase]:
    """Each batch row's labels file in ``out`` (``<stem>_labels.<ext>``), checked by ``plan_batch``: the one naming
    rule of ``dmoe segment --csv`` and napari's folder run. Two rows whose images share a stem are refused before
    any work, finished cases are skipped.

    A DICOM series folder keeps its whole name (folders are often named by their UIDs, ``1.2.840.113619.2.5``:
    no suffix to strip) and, like a DICOM file (``.dcm``, or any file with the DICOM preamble), gets NIfTI labels
    (DICOM SEG with ``dicom_seg``). A constant number of file-system calls per row: planning is linear."""
    from napari_dmoe.io.dicom import is_dicom_file
    from napari_dmoe.io.formats import NIFTI_SUFFIXES, PLAIN_SUFFIXES, suffix_of

    known = {*NIFTI_SUFFIXES, *PLAIN_SUFFIXES}
    cases = []
    for row, (name, _) in enumerate(rows, start=1):
        path = src / name
        if path.is_dir():  # a DICOM series folder: its name is not a file name with a suffix
            dicom, stem, suffix = True, path.name, ""
        else:
            suffix = suffix_of(path)
            stem = path.name[: len(path.name) - len(suffix)]
            dicom = suffix in (".dcm", "") or (suffix not in known and is_dicom_file(path))
            if dicom and suffix not in (".dcm", ""):  # a UID-named DICOM file: the whole name is its stem
                stem = path.name
        ext = ".dcm" if dicom and dicom_seg else ".nii.gz" if dicom or suffix in NIFTI_SUFFIXES else ".png"
        cases.append(PlannedCase(where=where.format(row=row, name=name), source=path,
                                 outputs=[out / f"{stem}_labels{ext}"], key=stem))
    return plan_batch(cases, inputs, overwrite)
