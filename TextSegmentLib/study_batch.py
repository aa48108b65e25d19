"""Whole-study DICOM batch: every CT series in a folder segmented, one output folder per series.

Headless and MRML-free, so the shell (``textsegment batch``), scripts and the Slicer logic share it::

    report = segment_study("study/", ["liver", "spleen"], output_dir="out/", model="freqmedclip-tiny")
    report.failed        # the series that could not be done, each with its error message

Per CT series, ``OUT/NN_<description>/`` holds what ``export.write_segmentation`` writes
(``segmentation.nii.gz``, its legend and the probability maps), ``seg.dcm`` (DICOM SEG referencing
the source images) and, when asked, ``saliency/``; ``OUT/batch_report.json`` lists every series with
its status and where its files lie (``source``), every DICOM file skipped because its header is
unreadable or cut short (``corrupt_files``), and the series folders of an earlier run that this run did
not write (``earlier_folders``). ``overwrite`` replaces only an earlier batch's series folders: never a
folder holding the study's own images (``--out`` = the study folder) or one without a legend.
*Why per-series folders appear whole or not at all:* each is written under a hidden name and
renamed when complete, so a series that fails half-way never leaves outputs that look finished.
Only a finished series names a ``folder`` in the report: with ``overwrite`` an earlier run's folder
for a series that fails now is kept (never delete what the user had), and a warning says it is stale.
A scout filed under a CT series' UID is left out of the stack (``io.dicom_series``) and named in the warnings.
An Enhanced (multi-frame) CT file is a series like a folder of slices (``io.dicom_volume`` reads its frames);
its ``seg.dcm`` references that one file and its frame numbers.
A bad series is reported and skipped; the others still run. Non-image objects (SEG, RTSTRUCT) and
non-CT series are listed as skipped, never guessed at.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .errors import Cancelled, NotCTError, OutputExistsError, TextSegmentError
from .io.dicom_series import cut_short
from .progress import CancelToken, MonotonicProgress, ProgressCallback, check_cancel

log = logging.getLogger(__name__)

REPORT = "batch_report.json"
SEG_FILE = "seg.dcm"
SALIENCY_DIR = "saliency"
OK, FAILED, SKIPPED, CANCELLED = "ok", "failed", "skipped", "cancelled"
CUT_SHORT = "corrupt DICOM file (an image header without Rows/Columns: cut short?)"


@dataclass
class SeriesOutcome:
    """One series of the study and what became of it."""

    key: str
    description: str
    modality: str
    files: int
    patient_id: str
    study_instance_uid: str
    source: str = ""  # where its files lie (their common folder, or the one file): a "nouid-…" key says nothing
    status: str = SKIPPED
    folder: Optional[str] = None  # this run's output, relative to the output folder; None when the series has none
    error: Optional[str] = None
    outputs: list[str] = field(default_factory=list)  # relative to the series folder
    prompts: list[dict[str, Any]] = field(default_factory=list)  # prompt, voxels, volume_ml
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class BatchReportMixin:
    """What a batch's report offers, whatever its cases are (DICOM series, volume files): ``OUTCOMES``
    names the list of them."""

    OUTCOMES = "series"
    output_dir: str

    @property
    def ok(self) -> list[Any]:
        return [o for o in getattr(self, self.OUTCOMES) if o.status == OK]

    @property
    def failed(self) -> list[Any]:
        return [o for o in getattr(self, self.OUTCOMES) if o.status == FAILED]

    @property
    def report_path(self) -> Path:
        return Path(self.output_dir) / REPORT

    def to_dict(self) -> dict[str, Any]:
        """What ``batch_report.json`` holds."""
        from . import __version__

        outcomes = getattr(self, self.OUTCOMES)
        return {
            **asdict(self),
            "summary": {status: sum(o.status == status for o in outcomes) for status in (OK, FAILED, SKIPPED, CANCELLED)},
            "textsegment_version": __version__,
            "notice": "Research use only; not for diagnosis.",
        }


@dataclass
class StudyReport(BatchReportMixin):
    """What ``segment_study`` did; ``to_dict()`` is what ``batch_report.json`` holds."""

    dicom_dir: str
    output_dir: str
    prompts: list[str]
    model: str
    weights: Optional[str]  # what ran (``weights.weights_record``), not the option given
    series: list[SeriesOutcome]
    corrupt_files: list[dict[str, str]] = field(default_factory=list)  # DICOM files skipped: unreadable headers
    earlier_folders: list[str] = field(default_factory=list)  # series folders in the output folder this run did not write
    cancelled: bool = False
    seconds: float = 0.0
    weights_file: Optional[str] = None
    weights_sha256: Optional[str] = None
    weights_data_sha256: Optional[str] = None


def segment_study(
    dicom_dir: Union[str, Path],
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
    dicom_seg: bool = True,
    saliency: bool = False,
    saliency_stage: int = 1,
    saliency_layers: Union[str, Sequence[str], None] = None,
    probability_grid: str = "source",
    overwrite: bool = False,
    progress: Optional[ProgressCallback] = None,
    cancel: Union[CancelToken, Callable[[], bool], None] = None,
    reader: Optional[Callable[[Any], Any]] = None,
) -> StudyReport:
    """Segment every CT series under ``dicom_dir`` and write one folder per series plus the report.

    ``model`` is a preset name (loaded once with ``weights`` on ``device``) or a model object;
    ``model_name`` names it in the outputs (default: its preset, e.g. "freqmedclip-tiny").
    A prompt given twice (case and spacing aside) is refused, as by ``textsegment batch``.
    ``threshold`` makes the masks and, with ``saliency``, the target the maps explain.
    ``probability_grid="compact"`` keeps the probability maps on the compact grid (``engine.segment``).
    ``reader(series_info) -> Volume`` replaces the engine's DICOM reader (tests, other front ends).
    Raises before any work when the folder holds no CT series or outputs exist (unless
    ``overwrite``); raises ``Cancelled`` after writing the report when cancelled.
    """
    from .io.dicom_series import list_series

    started = time.perf_counter()
    dicom_dir, output_dir = Path(dicom_dir), Path(output_dir)
    prompt_list = checked_prompts(prompts, aux_prompts=aux_prompts, threshold=threshold, batch_size=batch_size,
                                  probability_grid=probability_grid)
    corrupt_files: list[dict[str, str]] = []
    found = list_series(dicom_dir, corrupt_files=corrupt_files)
    cut: dict[str, list[str]] = {}  # series key -> its files cut inside the header
    found = [_drop_cut_files(s, cut) for s in found]
    corrupt_files += [{"file": f, "error": CUT_SHORT} for files in cut.values() for f in files]
    outcomes = [_outcome(s, cut=cut.get(s.key, [])) for s in found]  # skipped, with the reason, unless a CT candidate
    todo = [(s, o) for s, o in zip(found, outcomes) if o.error is None]
    if not todo:
        listing = ", ".join(f"{o.modality or 'no modality'} ({o.error})" for o in outcomes)
        raise NotCTError(f"{dicom_dir}: no CT series to segment; found {listing}")
    _name_folders([o for _, o in todo])
    # the study's images (not its SEG/RTSTRUCT objects: an earlier batch's seg.dcm when --out lies inside the study)
    sources = [Path(f) for s in found if s.is_image or cut_short(s) for f in (*s.files, *s.localizer_files)]
    sources += [Path(c["file"]) for c in corrupt_files]
    _check_free(output_dir, [o.folder for _, o in todo], overwrite=overwrite, sources=sources)
    earlier = earlier_folders(output_dir, [o.folder for _, o in todo])

    model, model_name, ran = loaded_model(model, weights=weights, device=device, model_name=model_name,
                                          aux_prompts=aux_prompts, saliency=saliency, saliency_stage=saliency_stage,
                                          saliency_layers=saliency_layers, threshold=threshold)
    reader = reader or (lambda series: _read(series, source=dicom_dir))
    report = StudyReport(str(dicom_dir), str(output_dir), prompt_list, model_name, series=outcomes,
                         corrupt_files=corrupt_files, earlier_folders=earlier, **ran)

    def one(series: Any, outcome: SeriesOutcome) -> Callable[[ProgressCallback], None]:
        return lambda step: _run_series(
            series, outcome, reader=reader, out_dir=output_dir, prompts=prompt_list, model=model,
            model_name=model_name, weights=ran, aux_prompts=aux_prompts, device=device,
            batch_size=batch_size, threshold=threshold, dicom_seg=dicom_seg, saliency=saliency,
            saliency_stage=saliency_stage, saliency_layers=saliency_layers, probability_grid=probability_grid,
            overwrite=overwrite, progress=step, cancel=cancel,
        )

    cases = [(f"series {i + 1}/{len(todo)} ({o.description or o.modality or o.key})", o, one(s, o))
             for i, (s, o) in enumerate(todo)]
    run_cases(report, cases, unit="series", units="series", started=started, progress=progress, cancel=cancel)
    return report


def run_cases(report: "BatchReportMixin", cases: Sequence[tuple[str, Any, Callable[[ProgressCallback], None]]], *,
              unit: str, units: str, started: float, progress: Optional[ProgressCallback], cancel: Any,
              protected: Sequence[Path] = ()) -> None:
    """Run a batch's cases in turn, ``(label, outcome, run(step))`` each, under one progress bar over all of them.

    The report is written whatever happens. A cancel or Ctrl-C marks the cases not finished as such and is
    raised again; a cancel from Python says that the finished cases were kept (the engine's own message says
    that nothing was written, true of one case only). ``protected``: inputs the report must never replace.
    """
    from .io.writers import write_json

    output_dir = Path(report.output_dir)
    overall = MonotonicProgress(progress)
    try:
        for i, (label, _, run) in enumerate(cases):
            check_cancel(cancel)

            def step(fraction: float, message: str = "", i: int = i, label: str = label) -> None:
                overall((i + fraction) / len(cases), f"{label}: {message}")

            run(step)
    except (Cancelled, KeyboardInterrupt) as exc:  # Ctrl-C in a shell is a cancel too: the report must say so
        report.cancelled = True
        mark_cancelled([outcome for _, outcome, _ in cases], exc, out_dir=output_dir, unit=unit)
        if isinstance(exc, Cancelled):
            raise cancelled_error(report, units=units) from None
        raise
    finally:
        report.seconds = time.perf_counter() - started
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(report.to_dict(), output_dir / REPORT, overwrite=True, protected=protected)
    overall(1.0, f"{len(report.ok)} {units} done, {len(report.failed)} failed")


def checked_prompts(prompts: Any, *, aux_prompts: Any, threshold: float, batch_size: Any,
                    probability_grid: str) -> list[str]:
    """A batch's prompts and options, checked once before any case: a bad one would fail every case alike,
    and a prompt given twice would give two identical labels in every case's outputs."""
    from .engine import check_distinct_prompts, check_settings, validate_prompts

    prompt_list = validate_prompts(prompts)
    check_distinct_prompts(prompt_list)
    check_settings(prompts=len(prompt_list), aux_prompts=aux_prompts, threshold=threshold, batch_size=batch_size,
                   probability_grid=probability_grid)
    return prompt_list


def loaded_model(model: Any, *, weights: Optional[str], device: str, model_name: Optional[str], aux_prompts: Any,
                 saliency: bool, saliency_stage: int, saliency_layers: Any, threshold: float) -> tuple[Any, str, dict]:
    """The batch's model (a preset name is loaded once), the name its outputs give it (the preset, not the
    class: "freqmedclip-tiny", not "FreqMedCLIP") and its ``weights_record``; options that depend on the
    model (auxiliary prompts, saliency layers) are checked here, once, for the same reason as above."""
    from .engine import check_aux_prompts, model_label
    from .weights import load_model, weights_record

    if isinstance(model, str):
        model = load_model(model, weights=weights, device=device)
    check_aux_prompts(model, aux_prompts)
    if saliency:
        _saliency_sink(model, layers=saliency_layers, stage=saliency_stage, threshold=threshold)
    return model, model_name or model_label(model), weights_record(model, weights)


# series ----------------------------------------------------------------------------------------
def _outcome(series: Any, *, cut: Sequence[str] = ()) -> SeriesOutcome:
    outcome = SeriesOutcome(
        key=series.key, description=series.description, modality=series.modality, files=series.n_files,
        patient_id=series.patient_id, study_instance_uid=series.study_instance_uid, error=_skip_reason(series),
        source=os.path.commonpath(series.files) if series.files else "",
    )
    if cut and not cut_short(series):  # a first or last slice lost leaves no gap for the reader to warn about
        outcome.warnings.append(f"left out {len(cut)} file(s) of this series cut short (see corrupt_files): {', '.join(cut)}")
    return outcome


def _drop_cut_files(series: Any, cut: dict[str, list[str]]) -> Any:
    """The series without its files cut inside the header (recorded in ``cut``), as a file pydicom cannot read is skipped.

    ``list_series`` judges a series by its first file, so one such file sorted first would skip the whole series.
    """
    import pydicom

    from .io.dicom_series import series_from_files

    if not cut_short(series):
        return series
    good = []
    for file in series.files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - read once already; whatever fails now is damaged too
            ds = {}
        if "Rows" in ds and "Columns" in ds:
            good.append(file)
        else:
            cut.setdefault(series.key, []).append(file)
    return series_from_files(good, source=series.key) if good else series


def _skip_reason(series: Any) -> Optional[str]:
    """Why a series is not segmented (None: it is a CT candidate)."""
    if cut_short(series):
        return f"{CUT_SHORT}: {', '.join(series.files)}; copy the file(s) again from the source"
    if not series.is_image:
        return f"a {series.modality or 'non-image'} object, not an image series"
    if series.modality not in ("CT", ""):
        return f"not CT (modality {series.modality})"
    if series.is_localizer or series.orientations > 1:
        return "a localizer (scout), not a volume"
    return None


def _name_folders(outcomes: list[SeriesOutcome]) -> None:
    from .export import slug

    for n, outcome in enumerate(outcomes, start=1):
        # a description without Latin letters ("胸部") names the folder by its modality
        kind = slug(outcome.modality or "", max_length=32, fallback="series")
        outcome.folder = f"{n:02d}_{slug(outcome.description or '', max_length=32, fallback=kind)}"


def _check_free(output_dir: Path, folders: list[str], *, overwrite: bool, sources: Sequence[Path] = ()) -> None:
    """Refuse, before any work, outputs in the way; ``overwrite`` replaces only an earlier batch's series folders.

    A folder holding the study's own DICOM files (``--out`` = the study folder) or no legend is the user's,
    not an earlier result: replacing it whole would delete it, so it is refused even with ``overwrite``.
    """
    from .export import LEGEND, refuse_file_as_folder

    refuse_file_as_folder(output_dir)  # else every series runs first and the report's write fails with a traceback
    real_sources = [p.resolve() for p in sources]
    for folder in (output_dir / f for f in folders):
        if not folder.exists():
            continue
        real = folder.resolve()
        inside = next((p for p in real_sources if p.is_relative_to(real)), None)
        if inside is not None:
            raise OutputExistsError(f"{folder}: holds DICOM files of the study being read (e.g. {inside}), where this "
                                    "series' results would go; choose an --out folder outside the study's series folders")
        if not (folder / LEGEND).is_file():  # --overwrite could not help: say so now, not after the user adds it
            raise OutputExistsError(f"{folder}: is in the way of this series' results and is not an earlier batch's "
                                    f"series folder (no {LEGEND}); move it or choose another --out folder")
    if overwrite:
        return
    taken = [p for p in [output_dir / REPORT, *(output_dir / f for f in folders)] if p.exists()]
    if taken:
        raise OutputExistsError(
            f"{output_dir}: holds batch results already ({', '.join(p.name for p in taken)}); "
            "choose another output folder or pass overwrite=True (CLI: --overwrite)"
        )


def earlier_folders(output_dir: Path, folders: list[str]) -> list[str]:
    """Series (or case) folders an earlier run left that this run will not replace (another study, a series since
    removed): named in the report so that they are not taken for this run's results (they are the user's: never deleted)."""
    from .export import LEGEND

    if not output_dir.is_dir():
        return []
    return sorted(d.name for d in output_dir.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name not in folders and (d / LEGEND).is_file())


def _read(series: Any, *, source: Path) -> Any:
    """The engine's reader, with the CT rule of ``io.readers``: no Modality tag is fine when values look like HU."""
    from .io.dicom_volume import read_series
    from .io.readers import looks_like_hu

    volume = read_series(series, source=source)
    if not volume.modality:
        if not looks_like_hu(volume.array):
            raise NotCTError(f"series {series.key} has no Modality tag and its values do not look like Hounsfield units")
        log.warning("series %s has no Modality tag; treated as CT because its values look like HU", series.key)
        volume = volume.with_array(volume.array, modality="CT")
    return volume


def _run_series(series: Any, outcome: SeriesOutcome, *, reader: Callable[[Any], Any], out_dir: Path,
                prompts: list[str], model: Any, model_name: str, weights: dict[str, Any], aux_prompts: Any,
                device: str, batch_size: Any, threshold: float, dicom_seg: bool, saliency: bool,
                saliency_stage: int, saliency_layers: Any, probability_grid: str, overwrite: bool,
                progress: ProgressCallback,
                cancel: Any) -> None:
    """Segment one series into its folder; any failure but a cancel is recorded, never raised."""
    run_case(
        outcome, what=f"series {series.key}", read=lambda: reader(series),
        write=lambda run, volume, folder: _write_series(run, volume=volume, series=series, folder=folder,
                                                        model_name=model_name, weights=weights, dicom_seg=dicom_seg),
        warnings=lambda volume: _reading_warnings(series, volume), out_dir=out_dir, prompts=prompts, model=model,
        aux_prompts=aux_prompts, device=device, batch_size=batch_size, threshold=threshold, saliency=saliency,
        saliency_stage=saliency_stage, saliency_layers=saliency_layers, probability_grid=probability_grid,
        overwrite=overwrite, progress=progress, cancel=cancel,
    )


def run_case(outcome: Any, *, what: str, read: Callable[[], Any], write: Callable[[Any, Any, Path], list[Path]],
             warnings: Callable[[Any], list[str]] = lambda volume: [], out_dir: Path, prompts: list[str], model: Any,
             aux_prompts: Any, device: str, batch_size: Any, threshold: float, saliency: bool, saliency_stage: int,
             saliency_layers: Any, probability_grid: str, overwrite: bool, progress: ProgressCallback,
             cancel: Any) -> None:
    """One case of a batch (a DICOM series, a volume file) into ``out_dir / outcome.folder``, whole or not at all.

    ``read()`` gives the volume, ``write(run, volume, folder)`` its files (into a hidden folder renamed when
    complete), ``warnings(volume)`` what the report adds for it. Any failure but a cancel is recorded in
    ``outcome``, never raised (one bad case must not stop the batch); ``NotCTError`` leaves it skipped.
    """
    from .engine import segment

    started = time.perf_counter()
    final = out_dir / outcome.folder
    staging = out_dir / f".{outcome.folder}.partial-{os.getpid()}"
    try:
        progress(0.0, "reading")
        volume = read()
        sink = None
        if saliency:
            sink = _saliency_sink(model, layers=saliency_layers, stage=saliency_stage, threshold=threshold)
        run = segment(volume, prompts, model=model, aux_prompts=aux_prompts, device=device, batch_size=batch_size,
                      threshold=threshold, probability_grid=probability_grid, progress=progress, cancel=cancel,
                      features_sink=sink)
        shutil.rmtree(staging, ignore_errors=True)
        written = write(run, volume, staging)
        _publish(staging, final, overwrite=overwrite)
        outcome.status = OK
        outcome.outputs = sorted(str(p.relative_to(staging)) for p in written)
        outcome.prompts = [{"prompt": r.prompt, "voxels": r.voxels, "volume_ml": round(r.volume_ml, 3)} for r in run.results]
        outcome.warnings += [*warnings(volume), *run.warnings]
    except Cancelled:
        raise
    except NotCTError as exc:  # e.g. no Modality tag and values that are not HU: not ours to segment
        outcome.error = str(exc)
        log.info("%s skipped: %s", what, exc)
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the batch
        outcome.status = FAILED
        outcome.error = str(exc) if isinstance(exc, TextSegmentError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TextSegmentError):
            log.warning("%s failed: %s", what, exc)
        else:
            log.exception("%s failed unexpectedly", what)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        outcome.seconds = round(time.perf_counter() - started, 3)
        if outcome.status != OK:
            _no_output(outcome, out_dir)


def mark_cancelled(outcomes: Sequence[Any], exc: BaseException, *, out_dir: Path, unit: str) -> None:
    """Every case not finished when ``exc`` (a cancel, Ctrl-C) came is "cancelled", naming no folder."""
    how = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else "cancelled by the user"
    for outcome in outcomes:
        if outcome.status == SKIPPED and outcome.error is None:
            outcome.status, outcome.error = CANCELLED, f"{how} before this {unit} was finished"
            _no_output(outcome, out_dir)


def cancelled_error(report: BatchReportMixin, *, units: str) -> Cancelled:
    """A batch's cancel: the engine's "no output was written" is one case's; the cases finished before are kept."""
    return Cancelled(f"cancelled by the user; the {len(report.ok)} {units} finished before were kept; "
                     f"report: {report.report_path}")


def _saliency_sink(model: Any, *, layers: Any, stage: int, threshold: float) -> Any:
    """The saliency sink of one series; its target is the mask at the batch's own ``threshold``, as ``segment --saliency``'s."""
    from .saliency import build_saliency_sink

    return build_saliency_sink(model=model, layers=layers, stage=stage, threshold=threshold)


def _reading_warnings(series: Any, volume: Any) -> list[str]:
    """What the DICOM reader warned about for this series (logged with the study's name), for its report entry."""
    warnings = []
    if series.localizer_files:
        names = ", ".join(series.localizer_files)
        warnings.append(f"left out {len(series.localizer_files)} localizer (scout) image(s) filed with this series: {names}")
    metadata = volume.metadata
    if metadata.get("non_uniform_spacing"):
        warnings.append(f"slice gaps are uneven (up to {metadata['max_spacing_deviation_mm']:.3g} mm from the mean "
                        f"{metadata['slice_spacing_mm']:.3g} mm): slices stacked at the mean spacing, not resampled")
    if metadata.get("slice_shear_mm"):
        warnings.append(f"slices drift {metadata['slice_shear_mm']:.3g} mm sideways (gantry tilt?): stacked without correction")
    return warnings


def _no_output(outcome: SeriesOutcome, out_dir: Path) -> None:
    """A series without output names no folder: an earlier run's folder of that name is not this run's result."""
    if outcome.folder and (out_dir / outcome.folder).exists():
        outcome.warnings.append(f"{outcome.folder}: an earlier run's output, left untouched; not the result of this run")
    outcome.folder = None


def _write_series(run: Any, *, volume: Any, series: Any, folder: Path, model_name: str,
                  weights: dict[str, Any], dicom_seg: bool) -> list[Path]:
    """``weights``: the ``weights_record`` of the model that ran, written into every legend."""
    from .export import write_segmentation

    written = write_segmentation(run, out_dir=folder, model_name=model_name,  # with run.weights_record
                                 extra_legend={"dicom_series": series.to_dict()})
    if dicom_seg:
        from .dicom_seg import run_parameters, write_dicom_seg

        written.append(write_dicom_seg(run.results, source=volume, path=folder / SEG_FILE, model_name=model_name,
                                       series_description=f"TextSegment {model_name}", parameters=run_parameters(run)))
    if run.features is not None:
        from .saliency import write_saliency

        written += write_saliency(run.features, out_dir=folder / SALIENCY_DIR, extra_legend={"model": model_name, **weights})
    return written


def _publish(staging: Path, final: Path, *, overwrite: bool) -> None:
    """Rename the finished staging folder into place (replacing an old one only with ``overwrite``)."""
    from .io.writers import exists_error

    if final.exists():
        if not overwrite:
            raise exists_error(final)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)


def exit_code(report: StudyReport) -> int:
    """0 when every CT series was segmented, 1 when some failed (the others still ran) or none was segmented
    (each candidate proved not CT when read): a script must not go on as if there were results."""
    return 1 if report.failed or not report.ok else 0
