"""``textsegment batch DICOM_DIR --prompt ... --out DIR``: every CT series of a study, one folder each.

Per series: the segmentation files, ``seg.dcm`` (DICOM SEG) and, with ``--saliency``, the maps;
``batch_report.json`` lists every series. A failed series does not stop the others; the exit code
is 1 when any failed (2 for a usage error, as every command).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="segment every CT series of a DICOM study (NIfTI + DICOM SEG per series)")
    p.add_argument("dicom_dir", metavar="DICOM_DIR", help="folder (searched recursively) or DICOMDIR of the study")
    p.add_argument("--prompt", "-p", action="append", required=True, help="what to segment (repeat for several)")
    p.add_argument("--aux-prompt", action="append", default=None,
                   help="auxiliary description per prompt (TGC-Net); repeat in the order of --prompt")
    p.add_argument("--out", "-o", required=True, help="output folder: one sub-folder per series and batch_report.json")
    from .segment import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--saliency", action="store_true", help="also write the layer-wise saliency maps of each series")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=None,
                   help="saliency stage (with --saliency; default 1; see `textsegment explain`)")
    p.add_argument("--probability-grid", choices=("source", "compact"), default="source",
                   help="probability maps on each CT's voxel grid (default) or on the compact grid (see `segment`)")
    p.add_argument("--no-dicom-seg", action="store_true", help="write no DICOM SEG (only NIfTI and the legend)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier batch in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study_batch import exit_code, segment_study
    from .progressbar import progress_bar
    from .segment import check_distinct_prompts, check_saliency_options

    check_distinct_prompts(args.prompt)
    check_saliency_options(args)

    with progress_bar(disable=args.quiet) as bar:
        report = segment_study(
            args.dicom_dir, args.prompt, output_dir=args.out, model=args.model, weights=args.weights,
            aux_prompts=args.aux_prompt, device=args.device, batch_size=args.batch_size, threshold=args.threshold,
            dicom_seg=not args.no_dicom_seg, saliency=args.saliency, saliency_stage=args.stage or 1,
            probability_grid=args.probability_grid, overwrite=args.overwrite, progress=bar,
        )
    for series in report.series:
        name = f"{series.folder or series.description or series.key} ({series.source})"  # which files, for a nouid key
        if series.status == "ok":
            volumes = ", ".join(f"{p['prompt']!r} {p['volume_ml']:.1f} ml" for p in series.prompts)
            print(f"ok      {name}: {volumes}")
        else:
            print(f"{series.status:<7} {name}: {series.error}")
        for warning in series.warnings:
            print(f"        warning: {warning}")
    if report.earlier_folders:
        print(f"warning: {', '.join(report.earlier_folders)}: series folder(s) of an earlier run, not results of this run")
    for item in report.corrupt_files:
        print(f"corrupt {item['file']}: {item['error']}")
    skipped = f", {len(report.corrupt_files)} unreadable file(s) skipped" if report.corrupt_files else ""
    print(f"{len(report.ok)} series done, {len(report.failed)} failed{skipped}; report: {report.report_path}")
    return exit_code(report)
