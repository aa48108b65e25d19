"""``textsegment segment CT --prompt ... --out DIR``: one label map, its legend and one probability map per prompt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SERIES_HELP = "DICOM: the series to use when the folder holds several (UID or key; `textsegment info` lists them)"
GRID_HELP = ("compact (default): saliency maps at most 128 voxels a side in-plane over the CT's extent (16x smaller "
             "at 512x512, no detail lost; viewers interpolate them); source: the CT's voxel grid")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment a CT with one or more text prompts")
    p.add_argument("input", help="CT file (NIfTI, NRRD, MHA) or DICOM folder")
    p.add_argument("--prompt", "-p", action="append", required=True, help="what to segment (repeat for several)")
    p.add_argument("--series", metavar="UID", default=None, help=SERIES_HELP)
    p.add_argument("--aux-prompt", action="append", default=None,
                   help="auxiliary description per prompt (TGC-Net); repeat in the order of --prompt")
    p.add_argument("--out", "-o", required=True, help="output folder (created; existing files are never replaced "
                   "unless --overwrite)")
    add_model_arguments(p)
    p.add_argument("--axis", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="slice direction; the shipped models were trained on axial slices only")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability at or above which a voxel is in a prompt's mask (default 0.5)")
    p.add_argument("--cleanup", action="store_true", help="keep the largest 3D component and fill holes (not for paired targets: 'lungs' would keep one lung)")
    p.add_argument("--min-component-ml", type=float, default=0.0,
                   help="drop islands smaller than this volume in mL (e.g. 0.5); an empty result is reported")
    p.add_argument("--keep-empty-slices", action="store_true", help="also run on slices with no body in them")
    p.add_argument("--allow-non-ct", action="store_true", help="run on a series that is not CT (results unreliable)")
    p.add_argument("--saliency", action="store_true",
                   help="also write per-layer saliency maps from the same forward pass (into OUT/saliency)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=None,
                   help="saliency stage (with --saliency; default 1)")
    p.add_argument("--layers", default=None, help="saliency layers (with --saliency), e.g. vit.3,vit.11 "
                   "(default: the model's saliency layers)")
    p.add_argument("--saliency-grid", choices=("compact", "source"), default=None, help=GRID_HELP)
    p.add_argument("--probability-grid", choices=("source", "compact"), default="source",
                   help="source (default): probability maps on the CT's voxel grid; compact: at most the network's "
                        "input size a side in-plane over the CT's extent (up to 16x smaller at 512x512: freqmedclip-tiny 16x, tgcnet-tiny 4x; "
                        "the label map and masks stay on the CT's grid)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model, weights and device options shared by every command that runs a model."""
    p.add_argument("--model", "-m", default="freqmedclip-tiny", help="model preset (see `textsegment weights list`)")
    p.add_argument("--weights", "-w", default=None,
                   help="weights id, checkpoint path, or 'random' (meaningless output; tests and benchmarks only)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda, cuda:N or cpu")
    p.add_argument("--batch-size", default="auto", help="slices per batch, or auto")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        # the results are moved into --out only once all are written, so an interrupted run left nothing there
        print(f"textsegment segment: interrupted; nothing of this run was written to {args.out}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from ..engine import check_settings, segment, validate_prompts
    from ..io import read_volume
    from ..io.writers import staged_folder
    from ..weights import load_model
    from ..export import SALIENCY_DIR, check_outputs_free, write_segmentation
    from ..saliency.export import check_out_folder
    from .progressbar import progress_bar

    out_dir = Path(args.out)
    prompts = validate_prompts(args.prompt)
    check_distinct_prompts(prompts)
    check_saliency_options(args)
    # before the CT is read and the model loaded: a bad option is refused now, not after that work
    check_settings(prompts=len(prompts), aux_prompts=args.aux_prompt, threshold=args.threshold,
                   batch_size=args.batch_size, min_component_ml=args.min_component_ml,
                   probability_grid=args.probability_grid)
    # so is an --out that cannot take the results (a file in the way, no permission, earlier results)
    check_outputs_free(out_dir, overwrite=args.overwrite)
    check_out_folder(out_dir)
    if args.overwrite:
        check_earlier_run(out_dir)
    volume = read_volume(args.input, allow_non_ct=args.allow_non_ct, series_uid=args.series)
    model = load_model(args.model, weights=args.weights, device=args.device)
    sink = None
    if args.saliency:
        from ..saliency import build_saliency_sink

        sink = build_saliency_sink(model=model, layers=args.layers, stage=args.stage or 1, threshold=args.threshold,
                                   grid=args.saliency_grid or "compact")
    with progress_bar(disable=args.quiet) as bar:
        run_ = segment(
            volume, prompts, model=model, aux_prompts=args.aux_prompt, device=args.device,
            batch_size=args.batch_size, axis=args.axis, threshold=args.threshold,
            skip_empty_slices=not args.keep_empty_slices, largest_component=args.cleanup,
            fill_holes=args.cleanup, min_component_ml=args.min_component_ml, progress=bar, features_sink=sink,
            probability_grid=args.probability_grid,
        )
    settings = {"axis": args.axis, "threshold": args.threshold, "cleanup": args.cleanup,
                "min_component_ml": args.min_component_ml, "keep_empty_slices": args.keep_empty_slices}
    inputs = [volume.source, *(volume.dicom.files if volume.dicom is not None else ())]
    # every file goes to a hidden folder first and into --out only once all are written: Ctrl-C or a full
    # disk half-way leaves no label map without its legend (and, with --overwrite, the earlier run intact)
    with staged_folder(out_dir, overwrite=args.overwrite, protected=[p for p in inputs if p]) as staging:
        # the legend names the weights that ran (run_.weights_record), not the option (None for the default)
        # the CT as an absolute path: "ct.nii.gz" names nothing once the folder is opened from elsewhere
        source = {"source": str(Path(volume.source).resolve())} if volume.source else {}
        written = write_segmentation(run_, out_dir=staging, model_name=args.model,
                                     extra_legend={"settings": settings, **source})
        if sink is not None:
            from ..saliency import write_saliency

            written += write_saliency(run_.features, out_dir=staging / SALIENCY_DIR,
                                      extra_legend={"model": args.model, **run_.weights_record})
    written = [out_dir / path.relative_to(staging) for path in written]
    for warning in run_.warnings + earlier_files(out_dir, written=written):
        print(f"warning: {warning}")
    print_summary(run_, out_dir=out_dir, files=len(written), saliency=sink is not None)
    return 0


def earlier_files(out_dir: Path, *, written: list[Path]) -> list[str]:
    """After --overwrite, maps of an earlier run that this one did not replace (a prompt since dropped) would
    sit beside the new ones as if they were this run's: name them, as `explain` and `demo` do."""
    from ..export import PROBABILITY_DIR, SALIENCY_DIR

    ours = set(written)
    left = sorted(p for folder in (PROBABILITY_DIR, SALIENCY_DIR) for p in (out_dir / folder).rglob("*")
                  if p.is_file() and p not in ours)
    if not left:
        return []
    shown = ", ".join(str(p.relative_to(out_dir)) for p in left[:3]) + (", ..." if len(left) > 3 else "")
    return [f"{len(left)} file(s) of an earlier run in {out_dir} were not replaced by this one and are not in its "
            f"legend: {shown}"]


def print_summary(run_: object, *, out_dir: Path, files: int, saliency: bool) -> None:
    """Say which label value is which prompt and what each file is: the label map holds numbers only.

    Where prompts overlap, the label map gives a voxel to one of them: say so where a label holds less there
    than its own mask, or a viewer shows a smaller "liver tumor" than the volume printed here. A few voxels
    print their volume, not "0.0 ml" beside a count that is not 0."""
    import json

    from ..export import LABEL_MAP, LEGEND, PROBABILITY_DIR, SALIENCY_DIR, SLICER_SEGMENTATION

    entries = json.loads((out_dir / LEGEND).read_text(encoding="utf-8"))["labels"]
    for entry, result in zip(entries, run_.results):
        shown = entry["label_map_voxels"]
        overlap = (f" ({shown} in the label map, the rest given to an overlapping prompt)"
                   if shown < result.voxels else "")
        ml = f"{result.volume_ml:.1f}" if result.volume_ml >= 0.1 or not result.voxels else f"{result.volume_ml:.2g}"
        print(f"label {entry['label']} {result.prompt!r}: {result.voxels} voxels, {ml} ml{overlap}")
    print(f"wrote {files} files to {out_dir} in {run_.seconds:.1f} s on {run_.device}:")
    print(f"  {out_dir / LABEL_MAP}  label map (0 background, label values as above)")
    print(f"  {out_dir / SLICER_SEGMENTATION}  the same for 3D Slicer: one segment per prompt, named after it")
    print(f"  {out_dir / LEGEND}  legend: label values, prompts, volumes, model and weights")
    print(f"  {out_dir / PROBABILITY_DIR}/  one probability map per prompt (0 to 1)")
    if saliency:
        print(f"  {out_dir / SALIENCY_DIR}/  saliency maps, one folder per prompt")


def check_earlier_run(out_dir: Path) -> None:
    """--overwrite replaces an earlier TextSegment run, never a user's own files that happen to share its names
    (TotalSegmentator, for one, also writes segmentation.nii.gz): without our legend beside them, refuse."""
    from ..errors import OutputExistsError
    from ..export import LEGEND, RESULT_NAMES, holds_earlier_run

    taken = [name for name in RESULT_NAMES if (out_dir / name).exists()]
    if taken and not holds_earlier_run(out_dir):
        raise OutputExistsError(
            f"{out_dir}: holds {', '.join(taken)} that no TextSegment run wrote (there is no TextSegment {LEGEND} "
            "there); --overwrite replaces only an earlier run's results: choose another folder for --out"
        )


def check_distinct_prompts(prompts: list[str]) -> None:
    """A prompt typed twice would give two identical labels and a second map named apart: refuse it.

    Case and spacing do not make a prompt new ("Liver", "liver "), as in the Slicer module.
    """
    from ..engine import check_distinct_prompts as check

    check(prompts, option="--prompt")


def check_saliency_options(args: argparse.Namespace) -> None:
    """--stage, --layers and --saliency-grid without --saliency would be ignored in silence: refuse them."""
    from ..errors import InputError

    options = (("--stage", "stage"), ("--layers", "layers"), ("--saliency-grid", "saliency_grid"))
    given = [flag for flag, name in options if getattr(args, name, None) is not None]
    if given and not args.saliency:
        several = len(given) > 1
        raise InputError(f"{', '.join(given)}: saliency option{'s' * several}, ignored without --saliency; "
                         f"add --saliency or leave {'them' if several else 'it'} out")
