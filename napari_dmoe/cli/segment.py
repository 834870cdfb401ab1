"""``dmoe segment``: segment one image, or a folder of images with a CSV of attributes, writing labels in the
source geometry (NIfTI keeps the file's affine; 2D images give PNG/TIFF) and optionally the routing maps."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment", help="segment an image (or a folder of images with a CSV of attributes)",
        description="Segment INPUT with MODEL under a patient attribute and write the label map in the source "
        "geometry. INPUT is a NIfTI/DICOM/PNG/JPG/TIFF file or a DICOM series folder; with --csv it is a folder "
        "of images and OUT a folder.",
    )
    p.add_argument("model", help="a napari-dmoe model file (.safetensors)")
    p.add_argument("input", help="image file, DICOM folder, or (with --csv) a folder of images")
    p.add_argument("--attribute", "-a", action="append", default=[], metavar="VALUE|NAME=VALUE",
                   help="patient attribute, e.g. -a Black or -a race=Black (repeat for several attributes); "
                   "'unknown' or leaving it out averages over all routers")
    p.add_argument("--out", "-o", required=True,
                   help="output labels file (.nii.gz, .nii, .png, .tif, .seg.nrrd for 3D Slicer, or .dcm for DICOM SEG on a "
                   "DICOM input), "
                   "or folder")
    p.add_argument("--csv", help="batch: CSV with a column 'image' (file name in INPUT) and one column per attribute")
    p.add_argument("--dicom-seg", action="store_true",
                   help="batch: write the masks of DICOM inputs (series folders, .dcm files) as DICOM SEG "
                        "(<name>_labels.dcm) instead of NIfTI")
    p.add_argument("--routing-out", help="folder for routing maps (mean gate weight per expert, dominant expert)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs (without it a single image refuses and a batch skips the cases "
                        "whose labels exist, so a stopped batch continues)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default: %(default)s)")
    p.add_argument("--window-batch", type=int, default=4, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory layout (for GPUs; see BENCHMARKS.md for when it pays)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network once for the whole batch (the first image takes longer; "
                        "falls back to the plain network with a warning where it fails)")
    p.add_argument("--zoom", type=float, default=1.0, metavar="Z",
                   help="2D models: zoom the image by Z about its centre before the model, e.g. the ratio of the "
                   "training camera's field of view to yours; the mask is mapped back (default 1: as it is)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true",
                   help="segment images that do not fit what the model was trained on (2D/3D, channels, modality, "
                        "voxel size, intensities); without it such an image is refused with what differs")
    p.set_defaults(func=run)


def engine_settings(args: argparse.Namespace, routing: bool) -> Any:
    """The engine options of the command line, as the one settings object every front end uses."""
    from napari_dmoe.inference.request import EngineSettings

    return EngineSettings(device=args.device, overlap=args.overlap, window_batch=args.window_batch,
                          amp=not args.no_amp, channels_last=args.channels_last, compile=args.compile,
                          routing="mean" if routing else "none", zoom=args.zoom)


def segment_file(model: Any, src: Path, dest: Path, attribute: Any, args: argparse.Namespace,
                 routing_dir: Path | None = None) -> Any:
    """Segment one file and write its labels (and routing maps); return the ``SegmentResult``."""
    from napari_dmoe.generators import drain
    from napari_dmoe.inference.fit import image_modality
    from napari_dmoe.inference.request import SegmentRequest, iter_run
    from napari_dmoe.io.images import read_image, write_labels

    volume = read_image(src)
    if str(dest).lower().endswith(".dcm"):  # refuse before the inference, not after it
        from napari_dmoe.io.dicom_seg import require_dicom_source

        require_dicom_source(volume, dest)
    request = SegmentRequest(volume.array, attribute, volume.known_spacing, rgb=volume.rgb,
                             modality=image_modality(volume.meta), force=getattr(args, "force", False),
                             settings=engine_settings(args, routing_dir is not None), source=str(src))

    def show(step: Any) -> None:
        if not args.quiet and step.total:
            print(f"\r  {src.name}: {step.stage} {step.done}/{step.total}", end="", file=sys.stderr, flush=True)

    result = drain(iter_run(model, request), show)  # the fit check runs first: a refusal costs no inference
    if not args.quiet:
        print(file=sys.stderr)
    if routing_dir is not None and result.routing:  # before the labels: their presence marks a finished case
        write_routing(routing_dir, src, result.segmentation, volume)
    from napari_dmoe.io.provenance import mask_record  # saved with the labels: model, attribute, forced, findings

    prov = result.provenance
    write_labels(dest, result.labels, like=volume, class_names=model.spec.class_names,
                 algorithm=_algorithm(result) if str(dest).lower().endswith(".dcm") else None,
                 provenance=mask_record(**prov.to_dict(), source=str(src)))
    notes = [*volume.meta.get("warnings", []), *prov.conversions, *prov.warnings]
    notes += [f"segmented with --force although: {finding}" for finding in prov.fit_findings]
    for note in notes:
        print(f"  note: {src.name}: {note}", file=sys.stderr)
    return result


def _algorithm(result: Any) -> Any:
    """What DICOM SEG records about the model: its file name and the attribute used."""
    from napari_dmoe.io.dicom_seg import SegAlgorithm

    prov = result.provenance
    return SegAlgorithm(model=prov.model, attribute=prov.attribute_text, forced=prov.forced,
                        findings=tuple(prov.fit_findings))


def write_routing(folder: Path, src: Path, result: Any, volume: Any) -> None:
    """Dominant expert and each expert's mean gate weight (uint8, 255 = 1) in the source geometry."""
    import numpy as np

    from napari_dmoe.io.formats import default_mask_suffix
    from napari_dmoe.io.images import write_labels

    folder.mkdir(parents=True, exist_ok=True)
    stem = _stem(src)
    # routing maps are weights, not a segmentation: never DICOM SEG
    suffix = default_mask_suffix(volume.meta.get("format"), len(volume.spacing))
    write_labels(folder / f"{stem}_dominant_expert{suffix}", result.dominant_expert, like=volume)
    mean = result.routing["mean"]
    # gate weights in [0, 1] -> uint8 (255 = weight 1) per expert, written like labels so NIfTI keeps the
    # source geometry; 1/255 resolution is plenty for a heatmap
    for e in range(mean.shape[0]):
        weights = np.round(mean[e].astype(np.float32) * 255).astype(np.uint8)
        write_labels(folder / f"{stem}_expert{e}{suffix}", weights, like=volume)


def _stem(path: Path) -> str:
    from napari_dmoe.io.images import suffix_of

    if path.is_dir():  # a DICOM series folder, often named by its UID ("1.2.840.5"): no suffix to strip
        return path.name
    suffix = suffix_of(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _routing_files(routing_dir: Path | None, src: Path) -> list[Path]:
    """Routing maps of ``src`` already in ``routing_dir`` (their suffix depends on the image, so by pattern)."""
    if routing_dir is None or not routing_dir.is_dir():
        return []
    stem = _stem(src)
    return sorted({*routing_dir.glob(f"{stem}_dominant_expert.*"), *routing_dir.glob(f"{stem}_expert[0-9]*.*")})


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.io.cases import read_batch_csv
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.outputs import check_single

    src, out = Path(args.input), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    routing_dir = Path(args.routing_out) if args.routing_out else None
    inputs = [Path(args.model), src] + ([Path(args.csv)] if args.csv else [])
    overwrite = getattr(args, "overwrite", False)
    if args.csv is None:  # checked before the model loads: a refusal costs nothing
        check_single([out, *_routing_files(routing_dir, src)], inputs, overwrite)
    model = load_model(args.model)
    from napari_dmoe.inference.scale import check_zoom

    check_zoom(args.zoom, model.spec.spatial_dims)  # once, not once per case of a batch
    if args.csv is None:
        from napari_dmoe.model.routers import PatientAttribute

        attribute = PatientAttribute.parse(args.attribute, model.spec)
        result = segment_file(model, src, out, attribute, args, routing_dir)
        print(f"{src} -> {out} ({_describe(result)})")
        return 0
    if not src.is_dir():
        raise ValueError(f"with --csv, INPUT must be a folder of images; {src} is not a folder")
    rows = read_batch_csv(Path(args.csv), model.spec)
    cases = plan_batch_outputs(rows, src, out, args.dicom_seg, inputs, overwrite)
    return segment_batch(model, rows, cases, out, args, routing_dir)


def segment_batch(model: Any, rows: list[tuple[str, Any]], cases: list[Any], out: Path, args: argparse.Namespace,
                  routing_dir: Path | None) -> int:
    """The planned cases, spread over the processes when torchrun started several (``napari_dmoe.sharding``):
    each case runs in one process, rank 0 counts (n/N, ETA) and lists the failures; returns the exit code."""
    from napari_dmoe.sharding import processes, run_batch

    with processes(args.device) as info:
        out.mkdir(parents=True, exist_ok=True)
        if info.is_main:
            for case, (name, _) in zip(cases, rows):
                for note in case.notes:  # why it is skipped, or what planning cleaned (an empty label, leftovers)
                    print(f"  note: {name}: {note}", file=sys.stderr)
        # this process's device (cuda:LOCAL_RANK under torchrun); no per-window lines when processes interleave
        opts = argparse.Namespace(**{**vars(args), "device": str(info.device), "quiet": args.quiet or info.enabled})

        def work(i: int) -> None:
            (name, attribute), case = rows[i], cases[i]
            try:
                result = segment_file(model, case.source, case.marker, attribute, opts, routing_dir)
            except (ValueError, OSError) as err:  # one bad case must not stop the batch: reported, counted
                print(f"dmoe segment: error: {name}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
                raise
            # one write per line: processes share stdout, and under PYTHONUNBUFFERED print's text and newline
            # would be two writes that another process's line can fall between
            sys.stdout.write(f"{case.source} -> {case.marker} ({_describe(result)})\n")
            sys.stdout.flush()

        outcome = run_batch(len(cases), work, info, done=lambda i: cases[i].skip, what="images",
                            stream=None if args.quiet else sys.stderr)
    if info.is_main:
        more = f" ({outcome.skipped} skipped: their labels exist; --overwrite redoes them)" if outcome.skipped else ""
        print(f"{outcome.done} of {len(rows)} images segmented into {out}{more}")
        if outcome.failures:
            print(f"dmoe segment: {outcome.failed} of {len(rows)} images failed:", file=sys.stderr)
            for i, message in outcome.failures:
                print(f"  {rows[i][0]}: {message}", file=sys.stderr)
    return 0 if outcome.failed == 0 else 1


def plan_batch_outputs(rows: list[tuple[str, Any]], src: Path, out: Path, dicom_seg: bool, inputs: list[Path],
                       overwrite: bool) -> list[Any]:
    """Each CSV row's labels file in ``out``: ``io.outputs.plan_label_outputs``, the rule napari's folder run uses."""
    from napari_dmoe.io.outputs import plan_label_outputs

    return plan_label_outputs(rows, src, out, dicom_seg, inputs, overwrite)


def _describe(result: Any) -> str:
    forced = "; forced" if result.provenance.forced else ""
    return (f"{result.provenance.attribute_text}; {result.provenance.device}; "
            f"{sum(result.segmentation.timings.values()):.2f} s{forced}")
