"""``textsegment info PATH [--json]``: what a CT file or DICOM folder holds, before anything is run on it,
and what a results folder of ``segment``, ``demo`` or ``batch`` holds after: which label is which prompt, which
series was segmented."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a CT volume or DICOM folder (series, geometry, modality, values), "
                                    "or a results folder (which label is which prompt)")
    p.add_argument("path", help="image file (NIfTI, NRRD, MHA), DICOM folder, DICOMDIR or DICOM file, or the --out "
                                "folder of segment or demo")
    p.add_argument("--series", metavar="UID", default=None, help="DICOM: describe this series (UID or key from the list)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = gather(Path(args.path), series_uid=args.series)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0


def gather(path: Path, *, series_uid: str | None = None) -> dict[str, Any]:
    """The DICOM series list (for DICOM input) and the volume chosen by default, non-CT included."""
    from ..io import is_dicom_input, list_series, read_volume

    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    report: dict[str, Any] = {"path": str(path)}
    results = _results_folder(path)
    if results is not None:  # "no readable DICOM files in this folder" said nothing of what the folder is
        report["results"] = results
        return report
    batch = _batch_folder(path)
    if batch is not None:
        report["batch"] = batch
        return report
    if is_dicom_input(path):
        report["series"] = [s.to_dict() for s in list_series(path)]
    try:
        volume = read_volume(path, allow_non_ct=True, series_uid=series_uid)
    except InputError as exc:
        if "series" not in report or series_uid:
            raise
        report["volume_error"] = str(exc)  # the list is still worth showing, e.g. several studies in one folder
    else:
        report["volume"] = volume.describe()
    return report


def _results_folder(path: Path) -> dict[str, Any] | None:
    """The legend of a TextSegment results folder (``segment``'s --out, or ``demo``'s ``segmentation/``), if it is one."""
    from ..export import earlier_legend

    for folder in (path, path / "segmentation"):
        legend = earlier_legend(folder) if folder.is_dir() else None
        if legend is not None:  # read once: the check is the read
            return {"folder": str(folder), **legend}
    return None


def _batch_folder(path: Path) -> dict[str, Any] | None:
    """The report of a ``textsegment batch`` output folder, if ``path`` is one."""
    from ..study_batch import REPORT

    try:
        report = json.loads((path / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "textsegment_version" in report else None


def _format_batch(batch: dict[str, Any]) -> list[str]:
    summary = ", ".join(f"{n} {state}" for state, n in (batch.get("summary") or {}).items() if n)
    files = "cases" in batch  # a batch of volume files (file_batch), not of a DICOM study
    source = batch.get("common_folder" if files else "dicom_dir", "?")
    lines = [f"TextSegment batch of {'the files in ' if files else ''}{source} ({batch.get('model') or 'model ?'}, "
             f"weights {batch.get('weights') or '?'}): {summary or ('no files' if files else 'no series')}",
             f"  prompts      {', '.join(repr(p) for p in batch.get('prompts', []))}"]
    for item in batch.get("cases" if files else "series", []):
        what = item.get("source") if files else item.get("description") or "(no description)"
        error = item.get("error") or ""
        why = f": {error.removeprefix(f'{what}: ')}" if error else ""  # a file's error starts with its path
        lines.append(f"  {item.get('status', '?'):<10}{item.get('folder') or '-':<32} {what}{why}")
    if batch.get("earlier_folders"):
        lines.append(f"  earlier   {', '.join(batch['earlier_folders'])}: folders of an earlier run, not of this one")
    return lines


def _format_results(results: dict[str, Any]) -> list[str]:
    folder = Path(results["folder"])
    lines = [f"TextSegment results ({results.get('model') or 'model ?'}, weights {results.get('weights') or '?'}; "
             f"textsegment {results.get('textsegment_version')}, {results.get('created', '?')})",
             f"  CT           {results.get('source') or '?'}"]
    for entry in results.get("labels", []):
        shown = entry.get("label_map_voxels", entry.get("voxels"))
        overlap = f" ({shown} in the label map)" if shown is not None and shown != entry.get("voxels") else ""
        lines.append(f"  label {entry['label']:<6} {entry['prompt']!r}: {entry['voxels']} voxels, "
                     f"{entry['volume_ml']:g} ml{overlap}")
    files = [results.get("label_map"), results.get("slicer_segmentation")]
    lines.append("  files        " + ", ".join(str(folder / f) for f in files if f and (folder / f).exists()))
    return lines


def format_text(report: dict[str, Any]) -> str:
    from ..io.dicom_series import counted

    lines = [report["path"]]
    if "results" in report:
        return "\n".join(lines + _format_results(report["results"]))
    if "batch" in report:
        return "\n".join(lines + _format_batch(report["batch"]))
    series = report.get("series")
    if series is not None:
        lines.append(f"DICOM: {len(series)} series")
        for s in series:
            size = f"{s['columns']}x{s['rows']}" if s["rows"] else ("-" if s["is_image"] else "no image")
            lines.append(
                f"  {s['key']}  {s['modality'] or '??':<8} {_count(s):>14}  {size:>9}  "
                f"{s['description'] or '(no description)'}  [patient {s['patient_id'] or '?'}]"
            )
    if "volume_error" in report:
        lines.append(f"no default volume: {report['volume_error']}")
    volume = report.get("volume")
    if volume:
        x, y, z = volume["spacing_xyz_mm"]
        nz, ny, nx = volume["shape_zyx"]
        lo, hi = volume["value_range"]
        dicom = volume.get("dicom") or {}
        meta = volume.get("metadata") or {}
        lines += [
            "volume" + (f" (series {meta.get('series_key')})" if "series_key" in meta else ""),
            f"  modality     {volume['modality'] or 'unknown (values do not look like HU)'}"
            + (f"  [assumed: {meta['modality_assumed']}]" if "modality_assumed" in meta else ""),
            f"  size x,y,z   {nx} x {ny} x {nz} voxels",
            f"  spacing      {x:g} x {y:g} x {z:g} mm",
            f"  origin LPS   {', '.join(f'{o:g}' for o in volume['origin_lps_mm'])} mm",
            f"  orientation  {volume['orientation']}  (LPS letters the i, j, k axes point toward)",
            f"  values       {lo:g} .. {hi:g} ({volume['dtype']})",
        ]
        if dicom:
            lines.append(f"  DICOM        {counted(dicom['files'], 'file')}, series "
                         f"{dicom['series_instance_uid'] or '(no UID)'}")
        if meta.get("non_uniform_spacing"):
            off = meta["max_spacing_deviation_mm"]
            lines.append(f"  warning      uneven slice gaps (up to {off:.3g} mm off); stacked, not resampled")
        if "slice_shear_mm" in meta:
            lines.append(f"  warning      slices drift {meta['slice_shear_mm']:.3g} mm sideways (gantry tilt?)")
    return "\n".join(lines)


def _count(series: dict[str, Any]) -> str:
    """Files, and the images they hold when that differs (an Enhanced CT is one file of many frames)."""
    from ..io.dicom_series import counted

    files, images = series["n_files"], series.get("n_images", series["n_files"])
    return counted(files, "file") if images == files else f"{counted(files, 'file')}, {counted(images, 'image')}"
