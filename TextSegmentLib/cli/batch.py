"""``textsegment batch DICOM_DIR --prompt ... --out DIR``: every CT series of a study, one folder each;
``textsegment batch FILE [FILE ...] --prompt ... --out DIR``: every CT volume file given, one folder each.

Per series: the segmentation files, ``seg.dcm`` (DICOM SEG) and, with ``--saliency``, the maps; per
file the same without ``seg.dcm`` (there are no DICOM images to reference). ``batch_report.json`` lists
every series or file. A failed one does not stop the others; the exit code is 1 when any failed (2 for
a usage error, as every command).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any, Optional


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="segment every CT series of a DICOM study, or every CT file given "
                                     "(one output folder each; the model loaded once)")
    p.add_argument("inputs", metavar="INPUT", nargs="+",
                   help="one DICOM study (folder, searched recursively, or DICOMDIR), or one or more CT volume files "
                        "(NIfTI, NRRD, MHA), e.g. data/*/ct.nii.gz: each file is a case, named after its path")
    p.add_argument("--prompt", "-p", action="append", required=True, help="what to segment (repeat for several)")
    p.add_argument("--aux-prompt", action="append", default=None,
                   help="auxiliary description per prompt (TGC-Net); repeat in the order of --prompt")
    p.add_argument("--out", "-o", required=True,
                   help="output folder: one sub-folder per series or file, and batch_report.json")
    from .segment import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--saliency", action="store_true", help="also write the layer-wise saliency maps of each series")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=None,
                   help="saliency stage (with --saliency; default 1; see `textsegment explain`)")
    p.add_argument("--probability-grid", choices=("source", "compact"), default="source",
                   help="probability maps on each CT's voxel grid (default) or on the compact grid (see `segment`)")
    p.add_argument("--no-dicom-seg", action="store_true",
                   help="write no DICOM SEG (only NIfTI and the legend; volume files never get one)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier batch in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..study_batch import exit_code
    from .progressbar import progress_bar
    from .segment import check_distinct_prompts, check_saliency_options

    check_distinct_prompts(args.prompt)
    check_saliency_options(args)
    study = _study(args.inputs)

    options = dict(output_dir=args.out, model=args.model, weights=args.weights, aux_prompts=args.aux_prompt,
                   device=args.device, batch_size=args.batch_size, threshold=args.threshold, saliency=args.saliency,
                   saliency_stage=args.stage or 1, probability_grid=args.probability_grid, overwrite=args.overwrite)
    with progress_bar(disable=args.quiet) as bar:
        if study is not None:
            from ..study_batch import segment_study

            report = segment_study(study, args.prompt, dicom_seg=not args.no_dicom_seg, progress=bar, **options)
        else:
            from ..file_batch import segment_files

            report = segment_files(args.inputs, args.prompt, progress=bar, **options)
    (_print_study if study is not None else _print_files)(report)
    return exit_code(report)


def _print_study(report: Any) -> None:
    for series in report.series:  # which files, for a nouid key
        _print_outcome(f"{series.folder or series.description or series.key} ({series.source})", series)
    _warn_earlier(report, unit="series")
    for item in report.corrupt_files:
        print(f"corrupt {item['file']}: {item['error']}")
    skipped = f", {len(report.corrupt_files)} unreadable file(s) skipped" if report.corrupt_files else ""
    print(f"{len(report.ok)} series done, {len(report.failed)} failed{skipped}; report: {report.report_path}")


def _print_files(report: Any) -> None:
    for case in report.cases:
        _print_outcome(f"{case.folder or case.name} ({case.source})", case, source=case.source)
    _warn_earlier(report, unit="case")
    skipped = sum(case.status == "skipped" for case in report.cases)
    skipped_text = f", {skipped} skipped" if skipped else ""
    print(f"{len(report.ok)} file(s) done, {len(report.failed)} failed{skipped_text}; report: {report.report_path}")


def _warn_earlier(report: Any, *, unit: str) -> None:
    if report.earlier_folders:
        print(f"warning: {', '.join(report.earlier_folders)}: {unit} folder(s) of an earlier run, not results of this run")


def _print_outcome(name: str, outcome: Any, *, source: str = "") -> None:
    """One line per series or file: its volumes when done, else why not (without the ``source`` it starts
    with: the name shows it already); then its warnings."""
    if outcome.status == "ok":
        volumes = ", ".join(f"{p['prompt']!r} {p['volume_ml']:.1f} ml" for p in outcome.prompts)
        print(f"ok      {name}: {volumes}")
    else:
        error = outcome.error.removeprefix(f"{source}: ") if source else outcome.error
        print(f"{outcome.status:<7} {name}: {error}")
    for warning in outcome.warnings:
        print(f"        warning: {warning}")


def _study(inputs: list[str]) -> Optional[Path]:
    """The DICOM study to batch, or None when ``inputs`` are volume files.

    A folder among files, two studies, or a folder holding volume files but no DICOM is refused: each
    would otherwise fail with a message about DICOM that does not say what to type instead.
    """
    from ..errors import InputError
    from ..io.dicom_series import is_dicom_input, is_dicomdir

    paths = [Path(p) for p in inputs]
    unmatched = next((p for p in paths if not p.exists() and any(c in str(p) for c in "*?[")), None)
    if unmatched is not None:  # the shell hands on a pattern that matched nothing as it is
        raise InputError(f"{unmatched}: no file matches this pattern; check the folder and the file names")
    studies = [p for p in paths if p.is_dir() or is_dicomdir(p)]
    if len(paths) == 1 and (is_dicom_input(paths[0]) or not paths[0].exists()):
        if paths[0].is_dir():
            _refuse_folder_of_volume_files(paths[0])
        return paths[0]  # as before: a study, a lone DICOM file, or a path whose absence list_series reports
    if studies and len(studies) == len(paths):
        raise InputError(f"{len(studies)} DICOM studies ({', '.join(map(str, studies))}); batch takes one study at "
                         "a time: run it once per study, each with its own --out")
    if studies:
        raise InputError(f"{studies[0]}: a folder among {len(paths) - len(studies)} file(s); batch takes either one "
                         "DICOM study (folder or DICOMDIR) or volume files, not both: run it once for each")
    return None


def _refuse_folder_of_volume_files(folder: Path) -> None:
    """A folder of NIfTI files without any DICOM file: say to pass the files, with a pattern that matches them."""
    from ..errors import InputError
    from ..io.dicom_series import is_dicom_file
    from ..io.readers import FILE_FORMATS

    volumes = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_dicom_file(file):
            return  # a DICOM study (its earlier results may lie beside it): the DICOM batch's
        if file.name.lower().endswith(tuple(FILE_FORMATS)):
            volumes.append(file)
    if volumes:
        raise InputError(f"{folder}: holds no DICOM files but {len(volumes)} volume file(s) (e.g. {volumes[0]}); "
                         f"batch takes volume files one by one: pass them, e.g. "
                         f"textsegment batch {_pattern(folder, volumes)} -p ... --out ...")


def _pattern(folder: Path, files: list[Path]) -> str:
    """A shell pattern for ``files`` below ``folder`` (``data/*/ct.nii.gz``, ``data/*.nii.gz``)."""
    from ..io.readers import FILE_FORMATS

    # at several depths, the shallowest: TotalSegmentator's s0011/ct.nii.gz lie above s0011/segmentations/*.nii.gz,
    # and folder/*.nii.gz matched neither
    depth = min(len(f.relative_to(folder).parts) for f in files)
    files = [f for f in files if len(f.relative_to(folder).parts) == depth]
    suffixes = {next((s for s in sorted(FILE_FORMATS, key=len, reverse=True) if f.name.lower().endswith(s)), "")
                for f in files}
    suffix = suffixes.pop() if len(suffixes) == 1 else ""
    below = [f.relative_to(folder).parts for f in files]
    levels = [set(level) for level in zip(*below)]
    parts = [level.pop() if len(level) == 1 else "*" for level in levels]
    if parts[-1] == "*":
        parts[-1] = f"*{suffix}"
    # quoted but for the wildcards: `my data/*/ct.nii.gz` as typed is two arguments, neither of them the files
    return "/".join([shlex.quote(str(folder)), *(p if "*" in p else shlex.quote(p) for p in parts)])
