"""``textsegment explain CT --prompt ... --out DIR``: per-layer saliency maps, a legend and a PNG montage per prompt."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from .segment import GRID_HELP, SERIES_HELP, add_model_arguments

    p = sub.add_parser("explain", help="show, layer by layer, what the model looked at for each prompt")
    p.add_argument("input", help="CT file (NIfTI, NRRD, MHA) or DICOM folder")
    p.add_argument("--series", metavar="UID", default=None, help=SERIES_HELP)
    p.add_argument(
        "--prompt", "-p", action="append", required=True, help="what to segment and explain (repeat for several)"
    )
    p.add_argument(
        "--out", "-o", required=True, help="output folder (existing files are never replaced unless --overwrite)"
    )
    p.add_argument(
        "--layers", default=None, help="comma-separated feature taps, e.g. vit.3,vit.11 (default: the model's saliency layers: ViT taps, gated frequency stages or the fusion pyramid, fused)"
    )
    p.add_argument(
        "--stage",
        type=int,
        choices=(1, 2, 3),
        default=1,
        help="1: organ prototype; 2: prototype + prompt; 3: four components with a spatial prior",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--roi",
        default=None,
        metavar="I0,I1,J0,J1,K0,K1",
        help="explain this voxel box instead of the predicted mask: 0-based inclusive index ranges along the "
             "file's x (I), y (J) and z (K) axes; a negative value needs --roi=-5,...",
    )
    target.add_argument(
        "--target-mask",
        default=None,
        metavar="FILE",
        help="explain this mask (voxels above 0; on the CT's voxel grid, or the same voxels stored flipped "
             "or transposed) instead of the predicted mask",
    )
    p.add_argument(
        "--encoding", choices=("uint8", "float16"), default="uint8", help="how maps are stored (default uint8)"
    )
    p.add_argument("--grid", choices=("compact", "source"), default="compact", help=GRID_HELP)
    p.add_argument(
        "--slice", type=int, default=None,
        help="montage slice, counted along --axis inferior→superior (axial), anterior→posterior (coronal) or "
             "right→left (sagittal), whatever the file's order; the CT panel also gives the file's voxel index "
             "(default: the slice with the largest target)"
    )
    p.add_argument("--no-contrast", action="store_true",
                   help="montage CT without CLAHE: only a 0.5-99.5 percentile stretch of the slice (default: both)")
    p.add_argument("--zoom", choices=("auto", "on", "off"), default="auto",
                   help="montage: crop the overlay panels around the target (the CT panel frames the crop); auto "
                        "(default) when that magnifies 2-4 times, i.e. for a small target such as a lesion")
    add_model_arguments(p)
    p.add_argument("--axis", choices=("axial", "coronal", "sagittal"), default="axial",
                   help="slice direction; the shipped models were trained on axial slices only")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability from which a voxel is in the predicted mask, the target explained (default 0.5)")
    p.add_argument("--allow-non-ct", action="store_true", help="run on a series that is not CT (results unreliable)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_roi(text: str):
    """'i0,i1,j0,j1,k0,k1' → ((i0, i1), (j0, j1), (k0, k1))."""
    from ..errors import InputError

    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 6:
        raise InputError(f"--roi needs six whole numbers I0,I1,J0,J1,K0,K1 (voxel indices), got {text!r}")
    return tuple(zip(values[0::2], values[1::2]))


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError, OutputExistsError
    from ..export import refuse_file_as_folder, slug
    from ..io import read_label_map, read_volume
    from ..saliency import SaliencyConfig, explain, save_montage, write_saliency
    from ..saliency.export import LEGEND, check_out_folder
    from ..saliency.sink import fit_roi, mask_labels_warning, roi_mask
    from ..weights import load_model, weights_record
    from .progressbar import progress_bar
    from .segment import check_distinct_prompts

    check_distinct_prompts(args.prompt)
    out_dir = Path(args.out)
    refuse_file_as_folder(out_dir)
    check_out_folder(out_dir)  # a file on the way, or no permission: refused now, not after the run
    if (out_dir / LEGEND).exists() and not args.overwrite:
        raise OutputExistsError(
            f"{out_dir}: holds saliency results already; choose another --out folder or pass --overwrite"
        )
    # every montage is checked now, with the legend: one found after the maps were written used to stop the
    # run halfway, with this run's maps and legend beside a montage from another run
    montages = [out_dir / f"{i + 1:02d}_{slug(prompt)}_montage.png" for i, prompt in enumerate(args.prompt)]
    if not args.overwrite:
        for png in montages:
            if png.exists():
                raise OutputExistsError(
                    f"{png}: exists already; choose another --out folder or pass --overwrite; nothing was written"
                )
    before = _explain_outputs(out_dir)
    volume = read_volume(args.input, allow_non_ct=args.allow_non_ct, series_uid=args.series)
    if args.slice is not None:  # checked before the run: the montage is written after the saliency maps
        from ..preprocess import slice_plan

        slices = slice_plan(volume, axis=args.axis).num_slices
        if not 0 <= args.slice < slices:
            raise InputError(f"--slice {args.slice} is outside the {slices} {args.axis} slices of this volume (0..{slices - 1})")
    roi = read_label_map(args.target_mask) if args.target_mask else None
    if roi is not None:
        # before the model loads: a mask on another grid, or an empty one, is refused now; from here on it
        # is 0/1 on the CT's grid (a mask stored the other way round, y-flipped say, is reordered)
        inside = roi_mask(roi, volume, what="--target-mask")
        warning = mask_labels_warning(roi, what="--target-mask")
        if warning:
            print(f"warning: {warning}")
        roi = volume.with_array(inside, source=roi.source)
    if args.roi:
        roi, warning = fit_roi(parse_roi(args.roi), volume.shape, what="--roi")
        if warning:
            print(f"warning: {warning}")
    model = load_model(args.model, weights=args.weights, device=args.device)
    config = SaliencyConfig(stage=args.stage, threshold=args.threshold, encoding=args.encoding, grid=args.grid)
    with progress_bar(disable=args.quiet) as bar:
        run_ = explain(
            volume,
            args.prompt,
            model=model,
            layers=args.layers,
            roi=roi,
            config=config,
            device=args.device,
            batch_size=args.batch_size,
            axis=args.axis,
            threshold=args.threshold,
            progress=bar,
        )
    result = run_.features
    written = write_saliency(
        result,
        out_dir=out_dir,
        overwrite=args.overwrite,
        # what ran (the model, not the option) on what, and the montages that come with the maps
        extra_legend={
            "input": str(Path(args.input).absolute()),
            "model": args.model,
            **weights_record(model, args.weights),
            "montages": [png.name for png in montages],
        },
    )
    label = "mask outline" if roi is None else ("ROI box outline" if isinstance(roi, tuple) else "target mask outline")
    if isinstance(roi, tuple):  # the montage shows (and picks its slice from) the box explained, not the mask
        roi = volume.with_array(roi_mask(roi, volume))
    for item, segmentation, png in zip(result.prompts, run_.results, montages):
        outline = roi if roi is not None else segmentation.mask
        written.append(
            save_montage(
                item,
                volume=volume,
                path=png,
                mask=outline,
                slice_index=args.slice,
                axis=args.axis,
                contrast=not args.no_contrast,
                overwrite=args.overwrite,
                outline_label=label,
                zoom=args.zoom,
            )
        )
        print(f"{item.prompt!r}: {len(item.maps)} maps, {item.target_slices} slice(s) with a target -> {png.name}")
    for warning in run_.warnings:
        print(f"warning: {warning}")
    stale = sorted(before - {path.resolve() for path in written})
    if stale:  # --overwrite replaces files by name: an earlier run's other layers or prompts would pass for this run's
        shown = ", ".join(str(path.relative_to(out_dir.resolve())) for path in stale[:4])
        print(f"warning: {len(stale)} file(s) in {out_dir} are from an earlier run, not this one "
              f"({shown}{', ...' if len(stale) > 4 else ''}); {LEGEND} lists this run's; "
              "delete them or use an empty --out folder")
    print(
        f"wrote {len(written)} files to {out_dir}; "
        f"saliency took {result.seconds:.2f} s of {run_.seconds:.1f} s on {run_.device}"
    )
    return 0


def _explain_outputs(out_dir: Path) -> set[Path]:
    """The maps and montages of an explain run in ``out_dir``: NN_<prompt>/*.nii.gz and NN_<prompt>_montage.png."""
    if not out_dir.is_dir():
        return set()
    found = list(out_dir.glob("[0-9][0-9]*_montage.png")) + list(out_dir.glob("[0-9][0-9]_*/*.nii.gz"))
    return {path.resolve() for path in found}
