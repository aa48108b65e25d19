"""Batch over CT volume files (NIfTI, NRRD, MetaImage): one output folder per file, the model loaded once.

For a dataset laid out as files (TotalSegmentator's ``s0011/ct.nii.gz``, ``s0012/ct.nii.gz``, ...), where a
shell loop over ``textsegment segment`` loads the model for every case and stops at the first bad file::

    report = segment_files(sorted(Path("data").glob("*/ct.nii.gz")), ["liver"], output_dir="out/", model="freqmedclip-tiny")
    report.failed        # the files that could not be done, each with its error message

Per file, ``OUT/<case>/`` holds what ``export.write_segmentation`` writes and, when asked, ``saliency/``;
``<case>`` is the file's path below the files' common folder without its volume suffix, as a slug
(``data/s0011/ct.nii.gz`` → ``s0011_ct``: ``ct`` alone would name every case alike). ``OUT/batch_report.json``
lists every file with its status. The rules are ``study_batch``'s, case for series: each folder appears
whole or not at all, a bad file is reported and the others still run, a file that is not CT (a label map)
is skipped, and ``overwrite`` replaces only an earlier TextSegment run's case folder, never one holding an
input or one without TextSegment's legend.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .errors import InputError, OutputExistsError
from .progress import CancelToken, ProgressCallback
from .study_batch import (REPORT, SALIENCY_DIR, SKIPPED, BatchReportMixin, checked_prompts, earlier_folders, exit_code,
                          loaded_model, run_case, run_cases)

__all__ = ["CaseOutcome", "FileBatchReport", "case_names", "exit_code", "segment_files"]


@dataclass
class CaseOutcome:
    """One volume file and what became of it."""

    name: str  # the case's name: its folder's, when it has one
    source: str  # the file as given
    status: str = SKIPPED
    folder: Optional[str] = None  # this run's output, relative to the output folder; None when the case has none
    error: Optional[str] = None
    outputs: list[str] = field(default_factory=list)  # relative to the case folder
    prompts: list[dict[str, Any]] = field(default_factory=list)  # prompt, voxels, volume_ml
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class FileBatchReport(BatchReportMixin):
    """What ``segment_files`` did; ``to_dict()`` is what ``batch_report.json`` holds."""

    OUTCOMES = "cases"

    common_folder: str  # the case names are the files' paths below it
    output_dir: str
    prompts: list[str]
    model: str
    weights: Optional[str]  # what ran (``weights.weights_record``), not the option given
    cases: list[CaseOutcome]
    earlier_folders: list[str] = field(default_factory=list)  # case folders in the output folder this run did not write
    cancelled: bool = False
    seconds: float = 0.0
    weights_file: Optional[str] = None
    weights_sha256: Optional[str] = None
    weights_data_sha256: Optional[str] = None


def segment_files(
    paths: Sequence[Union[str, Path]],
    prompts: Union[str, Sequence[str]],
    *,
    output_dir: Union[str, Path],
    model: Any,
    weights: Optional[str] = None,
    model_name: Optional[str] = None,
    aux_prompts: Optional[Sequence[Optional[str]]] = None,
    device: str = "auto",
    batch_size: Union[int, str] = "auto",
    threshold: float = 0.5,
    saliency: bool = False,
    saliency_stage: int = 1,
    saliency_layers: Union[str, Sequence[str], None] = None,
    probability_grid: str = "source",
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Union[CancelToken, Callable[[], bool], None] = None,
    reader: Optional[Callable[[Path], Any]] = None,
) -> FileBatchReport:
    """Segment each CT volume file in ``paths`` into its own folder under ``output_dir``, plus the report.

    Options as ``study_batch.segment_study``'s: ``model`` is a preset name (loaded once, with ``weights`` on
    ``device``) or a model object. ``reader(path) -> Volume`` replaces the file reader (tests, other front ends).
    Raises before any work for a missing path, a folder, a file given twice, a bad option or outputs in the way
    (unless ``overwrite``); raises ``Cancelled`` after writing the report when cancelled.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    files = _check_paths(paths)
    prompt_list = checked_prompts(prompts, aux_prompts=aux_prompts, threshold=threshold, batch_size=batch_size,
                                  probability_grid=probability_grid)
    cases = [CaseOutcome(name=name, source=str(path), folder=name) for name, path in zip(case_names(files), files)]
    names = [c.name for c in cases]
    _check_free(output_dir, names, overwrite=overwrite, inputs=files)
    earlier = earlier_folders(output_dir, names)

    model, model_name, ran = loaded_model(model, weights=weights, device=device, model_name=model_name,
                                          aux_prompts=aux_prompts, saliency=saliency, saliency_stage=saliency_stage,
                                          saliency_layers=saliency_layers, threshold=threshold)
    reader = reader or _read
    report = FileBatchReport(str(_common_folder(files)), str(output_dir), prompt_list, model_name, cases=cases,
                             earlier_folders=earlier, **ran)

    def one(path: Path, case: CaseOutcome) -> Callable[[ProgressCallback], None]:
        return lambda step: run_case(
            case, what=f"case {case.name} ({path})", read=lambda: reader(path),
            write=lambda run, volume, folder: _write_case(run, path=path, folder=folder, model_name=model_name,
                                                          weights=ran),
            out_dir=output_dir, prompts=prompt_list, model=model, aux_prompts=aux_prompts, device=device,
            batch_size=batch_size, threshold=threshold, saliency=saliency, saliency_stage=saliency_stage,
            saliency_layers=saliency_layers, probability_grid=probability_grid, overwrite=overwrite,
            progress=step, cancel=cancel,
        )

    steps = [(f"case {i + 1}/{len(cases)} ({c.name})", c, one(p, c)) for i, (p, c) in enumerate(zip(files, cases))]
    run_cases(report, steps, unit="case", units="case(s)", started=started, progress=progress, cancel=cancel,
              protected=files)
    return report


def case_names(paths: Sequence[Union[str, Path]]) -> list[str]:
    """Folder names for the files: each one's path below their common folder, without its volume suffix, as a slug.

    ``data/s0011/ct.nii.gz`` → ``s0011_ct``. Names that still clash (``a-b.nii`` and ``a_b.nrrd``, or
    two long paths cut alike) get ``_2``, ``_3``, ... in the order given: every case has a folder of its own.
    """
    from .export import slug
    from .io.readers import without_image_suffix

    if not paths:
        return []
    common = _common_folder(paths)
    names: list[str] = []
    for path in paths:
        below = Path(os.path.abspath(path)).relative_to(common).as_posix()
        base = slug(without_image_suffix(below), max_length=64, fallback="case")
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def _common_folder(paths: Sequence[Union[str, Path]]) -> Path:
    """The deepest folder holding every file (absolute, ``..`` resolved, links kept): the case names start below it."""
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]))


def _check_paths(paths: Sequence[Union[str, Path]]) -> list[Path]:
    """The files to segment; a missing path, a folder or a file given twice is refused before any work."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if not files:
        raise InputError("no volume files to segment; give one or more CT files (NIfTI, NRRD, MHA)")
    seen: dict[Path, Path] = {}
    for path in files:
        if not path.exists():
            raise InputError(f"{path}: no such file (a pattern the shell matched to nothing?)")
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give the volume files in it (e.g. {path / '*.nii.gz'}), or "
                             "segment a DICOM study with study_batch.segment_study (CLI: textsegment batch FOLDER)")
        twice = seen.setdefault(path.resolve(), path)
        if twice is not path:
            raise InputError(f"{path}: given twice (also as {twice}); give each file once")
    return files


def _check_free(output_dir: Path, folders: list[str], *, overwrite: bool, inputs: Sequence[Path]) -> None:
    """Refuse, before any work, outputs in the way; ``overwrite`` replaces only an earlier TextSegment run's case folder.

    A case folder holding an input file, or without TextSegment's legend (the user's own folder, another tool's
    results), is refused even with ``overwrite``: replacing it whole would delete it.
    """
    from .export import LEGEND, holds_earlier_run, refuse_file_as_folder

    refuse_file_as_folder(output_dir)
    real_inputs = [p.resolve() for p in inputs]
    for folder in (output_dir / f for f in folders):
        if not folder.exists():
            continue
        real = folder.resolve()
        inside = next((p for p in real_inputs if p.is_relative_to(real)), None)
        if inside is not None:
            raise OutputExistsError(f"{folder}: holds {inside}, an input of this batch, where a case's results would "
                                    "go; choose an --out folder apart from the input files")
        if not holds_earlier_run(folder):
            raise OutputExistsError(f"{folder}: is in the way of a case's results and holds no earlier TextSegment "
                                    f"run (no TextSegment {LEGEND}); move it or choose another --out folder")
    if overwrite:
        return
    taken = [p for p in [output_dir / REPORT, *(output_dir / f for f in folders)] if p.exists()]
    if taken:
        raise OutputExistsError(
            f"{output_dir}: holds batch results already ({', '.join(p.name for p in taken)}); "
            "choose another output folder or pass overwrite=True (CLI: --overwrite)"
        )


def _read(path: Path) -> Any:
    """The CT in ``path``; a DICOM file is refused: alone it is one slice of its series."""
    from .errors import NotCTError
    from .io import is_dicom_input, read_volume
    from .io.readers import NOT_CT_HINT

    if is_dicom_input(path):
        raise InputError(f"{path}: a DICOM file, not a volume file; batch the DICOM folder it lies in for the whole "
                         "series (CLI: textsegment batch FOLDER)")
    try:
        return read_volume(path)
    except NotCTError as exc:  # its hint names --allow-non-ct, which batch has not: a label map is skipped
        raise NotCTError(str(exc).replace(f" {NOT_CT_HINT}", "")) from None


def _write_case(run: Any, *, path: Path, folder: Path, model_name: str, weights: dict[str, Any]) -> list[Path]:
    """``weights``: the ``weights_record`` of the model that ran; the legend names the CT by its absolute path."""
    from .export import write_segmentation

    written = write_segmentation(run, out_dir=folder, model_name=model_name,
                                 extra_legend={"source": str(path.resolve())})
    if run.features is not None:
        from .saliency import write_saliency

        written += write_saliency(run.features, out_dir=folder / SALIENCY_DIR, extra_legend={"model": model_name, **weights})
    return written
