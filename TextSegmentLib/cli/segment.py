"""``textsegment segment CT --prompt ... --out DIR``: one label map, its legend and one probability map per prompt."""

from __future__ import annotations

import argparse
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
    p.add_argument("--threshold", type=float, default=0.5)
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
    from ..engine import check_settings, segment, validate_prompts
    from ..io import read_volume
    from ..weights import load_model
    from ..export import SALIENCY_DIR, check_outputs_free, write_segmentation
    from .progressbar import progress_bar

    out_dir = Path(args.out)
    prompts = validate_prompts(args.prompt)
    check_distinct_prompts(prompts)
    check_saliency_options(args)
    # before the CT is read and the model loaded: a bad option is refused now, not after that work
    check_settings(prompts=len(prompts), aux_prompts=args.aux_prompt, threshold=args.threshold,
                   batch_size=args.batch_size, min_component_ml=args.min_component_ml,
                   probability_grid=args.probability_grid)
    volume = read_volume(args.input, allow_non_ct=args.allow_non_ct, series_uid=args.series)
    check_outputs_free(out_dir, overwrite=args.overwrite)
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
    # the legend names the weights that ran (run_.weights_record), not the option (None for the default)
    written = write_segmentation(run_, out_dir=out_dir, model_name=args.model, overwrite=args.overwrite,
                                 extra_legend={"settings": settings})
    if sink is not None:
        from ..saliency import write_saliency

        written += write_saliency(run_.features, out_dir=out_dir / SALIENCY_DIR, overwrite=args.overwrite,
                                  extra_legend={"model": args.model, **run_.weights_record})
    for warning in run_.warnings:
        print(f"warning: {warning}")
    for result in run_.results:
        print(f"{result.prompt!r}: {result.voxels} voxels, {result.volume_ml:.1f} ml")
    print(f"wrote {len(written)} files to {out_dir} in {run_.seconds:.1f} s on {run_.device}")
    return 0


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
