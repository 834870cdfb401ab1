"""napari's way to script and extend a plugin: the main operations as plain functions and as magicgui function
widgets (contributed through npe2: the Plugins menu, Layers > Segment), on the same engine facade as the
dock widgets (``inference.request``: the fit check, force, provenance).

From a script::

    from napari_dmoe.plugin.functions import add_results, segment_folder, segment_layer

    layers = segment_layer(viewer.layers["scan"], "fundus-dmoe.safetensors", "race=Black", device="cpu")
    add_results(viewer, layers)  # as the Segment widget places them (an edited mask is never replaced)
    summary = segment_folder("scans/", "fundus-dmoe.safetensors", "masks/", csv="scans.csv")

or the widgets themselves: ``gui = segment_layer_widget(); gui(image=layer, model=path, attribute="race=Black")``
(returns the worker; the layers are added when it finishes). Work runs in napari thread workers with a progress bar.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator

from napari_dmoe.plugin.widgets.jobs import Step

UNKNOWN = "unknown"


def attribute_choices(model_path: str) -> list[str]:
    """"unknown", then every combination of the model's attribute values as "name=value[, name=value]"."""
    import itertools

    from napari_dmoe.io.checkpoint import read_spec
    from napari_dmoe.model.spec import attribute_text

    try:
        spec = read_spec(model_path)
    except ValueError:
        return [UNKNOWN]
    names = [a.name for a in spec.attributes]
    combos = itertools.product(*(a.values for a in spec.attributes))
    return [UNKNOWN, *(attribute_text(dict(zip(names, c))) for c in combos)]


def parse_choice(text: str | None) -> dict[str, str] | None:
    """"race=Black, age=80+" -> {"race": "Black", "age": "80+"}; "unknown" or empty -> None (all routers averaged)."""
    if not text or text.strip() == UNKNOWN:
        return None
    return dict(part.strip().split("=", 1) for part in text.split(",") if "=" in part)


def iter_segment_layer(layer: Any, model: str | Any, attribute: Any = None, device: str = "auto",
                       force: bool = False, cache: Any = None) -> Generator[Step, None, list]:
    """Segment an image layer with the engine facade; yields ``Step``s, returns the layer data tuples (mask,
    heatmaps, dominant expert) named and provenanced as the Segment widget's. ``model``: a path or a loaded model.
    Raises ``FitError`` (an image that does not fit the model, unless ``force``) and other ``ValueError``s."""
    from napari_dmoe.generators import relay
    from napari_dmoe.inference.request import EngineSettings, SegmentRequest, iter_run
    from napari_dmoe.plugin.results import SourceInfo, layer_image, result_layers

    yield Step("loading model", 0, 1)
    if isinstance(model, (str, Path)):
        from napari_dmoe.io.checkpoint import load_model

        model = cache.get(model) if cache is not None else load_model(model)
    data, spacing, rgb, modality = layer_image(layer)
    attribute = parse_choice(attribute) if isinstance(attribute, str) else attribute
    request = SegmentRequest(data, attribute, spacing, rgb=rgb, modality=modality, force=force,
                             settings=EngineSettings(device=device), source=layer.name)
    result = yield from relay(iter_run(model, request), lambda p: Step(p.stage, p.done, p.total))
    source = SourceInfo(layer.name, tuple(layer.scale), tuple(layer.translate), dict(layer.metadata), rgb)
    asked = {a.name: (attribute or {}).get(a.name, UNKNOWN) for a in model.spec.attributes}
    return result_layers(result.segmentation, model.spec, str(model.path), source, asked, record=result.provenance)


def segment_layer(layer: Any, model: str | Any, attribute: Any = None, device: str = "auto",
                  force: bool = False) -> list:
    """``iter_segment_layer`` run to the end (a script's call): the layer data tuples."""
    from napari_dmoe.generators import drain

    return drain(iter_segment_layer(layer, model, attribute, device, force))


def add_results(viewer: Any, layers: list) -> list:
    """Place result layers as the Segment widget does (same name replaced, an edited mask kept); returns them."""
    from napari_dmoe.plugin.widgets.placement import replace_layers

    replace_layers(getattr(viewer, "__wrapped__", viewer), layers)
    return [viewer.layers[kwargs["name"]] for _, kwargs, _ in layers]


@dataclass
class FolderSummary:
    """What a folder run did: files written, cases skipped (their labels exist) and failures (name, message)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def text(self) -> str:
        more = f", {len(self.skipped)} skipped (their labels exist)" if self.skipped else ""
        fails = "; failed: " + "; ".join(f"{n}: {m}" for n, m in self.failed) if self.failed else ""
        return f"{len(self.written)} mask(s) written{more}{fails}"


def _folder_rows(folder: Path, csv: Path | None, spec: Any, attribute: Any) -> list[tuple[str, Any]]:
    """(name in ``folder``, attribute) per case: the CSV's rows (``dmoe segment --csv``'s table), else every image
    file and DICOM series folder in ``folder`` under ``attribute``."""
    from napari_dmoe.io.cases import read_batch_csv
    from napari_dmoe.io.dicom import folder_has_dicom
    from napari_dmoe.io.images import NIFTI_SUFFIXES, PLAIN_SUFFIXES, suffix_of

    if csv is not None:
        return read_batch_csv(csv, spec)
    names = [p.name for p in sorted(folder.iterdir()) if (p.is_dir() and folder_has_dicom(p)) or (
        p.is_file() and suffix_of(p) in (*NIFTI_SUFFIXES, *PLAIN_SUFFIXES, ".dcm"))]
    return [(name, attribute) for name in names]


def _plan(rows: list[tuple[str, Any]], folder: Path, output: Path, inputs: list[Path], overwrite: bool) -> list:
    """The labels files of ``dmoe segment --csv`` (``io.outputs.plan_label_outputs``: one naming rule)."""
    from napari_dmoe.io.outputs import plan_label_outputs

    return plan_label_outputs(rows, folder, output, False, inputs, overwrite, where="{name} (row {row})")


def iter_segment_folder(folder: str | Path, model: str | Path, output: str | Path, csv: str | Path | None = None,
                        attribute: Any = None, device: str = "auto", overwrite: bool = False, force: bool = False
                        ) -> Generator[Step, None, FolderSummary]:
    """Segment every image of ``folder`` (or the rows of ``csv``) into ``output`` with the engine facade, each
    mask saved with its provenance (``io/provenance.py``); one bad case is reported and the others go on."""
    from napari_dmoe.generators import relay
    from napari_dmoe.inference.fit import image_modality
    from napari_dmoe.inference.request import EngineSettings, SegmentRequest, iter_run
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.images import read_image, write_labels
    from napari_dmoe.io.provenance import mask_record

    folder, output = Path(folder), Path(output)
    csv = Path(csv) if csv not in (None, "", ".") else None
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; choose the folder of images to segment")
    yield Step("loading model", 0, 1)
    loaded = load_model(model)
    attribute = parse_choice(attribute) if isinstance(attribute, str) else attribute
    rows = _folder_rows(folder, csv, loaded.spec, attribute)
    output.mkdir(parents=True, exist_ok=True)
    cases = _plan(rows, folder, output, [Path(model), folder, *([csv] if csv else [])], overwrite)
    summary = FolderSummary()
    for i, ((name, value), case) in enumerate(zip(rows, cases)):
        if case.skip:
            summary.skipped.append(name)
            continue
        try:
            volume = read_image(case.source)
            request = SegmentRequest(volume.array, value, volume.known_spacing, rgb=volume.rgb, force=force,
                                     modality=image_modality(volume.meta), settings=EngineSettings(device=device),
                                     source=str(case.source))
            prefix = f"{i + 1}/{len(rows)} {name}"
            result = yield from relay(iter_run(loaded, request), lambda p: Step(f"{prefix}: {p.stage}", p.done,
                                                                                p.total))
            summary.written.append(write_labels(
                case.marker, result.labels, like=volume, class_names=loaded.spec.class_names,
                provenance=mask_record(**result.provenance.to_dict(), source=str(case.source))))
        except (ValueError, OSError) as err:  # FitError, unreadable image, ...: reported, the batch goes on
            summary.failed.append((name, " ".join(str(err).split())))
    return summary


def segment_folder(folder: str | Path, model: str | Path, output: str | Path, csv: str | Path | None = None,
                   attribute: Any = None, device: str = "auto", overwrite: bool = False,
                   force: bool = False) -> FolderSummary:
    """``iter_segment_folder`` run to the end (a script's call)."""
    from napari_dmoe.generators import drain

    return drain(iter_segment_folder(folder, model, output, csv, attribute, device, overwrite, force))
