"""Writers for a segmentation run: one label map, its JSON legend and one probability map per prompt.

The label map is also written as Slicer's segmentation file (``segmentation.seg.nrrd``: the same
voxels, one segment per prompt named after it, in its colour), which opens in Slicer by drag and
drop with the prompts as segment names.

Overlapping prompts ("liver" and "liver tumour") cannot share one label map, so each voxel takes
the label of the prompt with the highest probability among those whose mask covers it; the
probability maps keep the full, overlapping answer.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import __version__
from .errors import InputError, OutputExistsError

LABEL_MAP = "segmentation.nii.gz"
LEGEND = "segmentation.json"
SLICER_SEGMENTATION = "segmentation.seg.nrrd"
PROBABILITY_DIR = "probabilities"
SALIENCY_DIR = "saliency"
RESULT_NAMES = (LABEL_MAP, SLICER_SEGMENTATION, LEGEND, PROBABILITY_DIR, SALIENCY_DIR)  # what a run puts in its folder


def refuse_file_as_folder(out_dir: Path) -> None:
    """An output folder that is a file (even the input CT) is refused before any work, by every command."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: is a file, not a folder; choose a folder for --out (it is created if missing)")


def check_outputs_free(out_dir: Path, *, overwrite: bool = False) -> None:
    """Fail before any work is done if the run would have to replace existing outputs."""
    out_dir = Path(out_dir)
    refuse_file_as_folder(out_dir)
    if overwrite or not out_dir.exists():
        return
    taken = [out_dir / name for name in RESULT_NAMES if (out_dir / name).exists()]
    if taken:
        raise OutputExistsError(
            f"{out_dir}: holds results already ({', '.join(p.name for p in taken)}); "
            "choose another folder (CLI: --out) or pass overwrite=True (CLI: --overwrite)"
        )


def earlier_legend(folder: Path) -> Optional[dict]:
    """The legend TextSegment wrote in ``folder`` (``segmentation.json`` with our version stamp), else None.

    Why: ``--overwrite`` may replace an earlier run's files, never another tool's that share their names
    (TotalSegmentator also writes segmentation.nii.gz) or a folder of the user's.
    """
    import json

    try:
        legend = json.loads((Path(folder) / LEGEND).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return legend if isinstance(legend, dict) and "textsegment_version" in legend else None


def holds_earlier_run(folder: Path) -> bool:
    """Does ``folder`` hold a legend that TextSegment wrote (``earlier_legend``)?"""
    return earlier_legend(folder) is not None


def slug(text: str, *, max_length: int = 48, fallback: str = "prompt") -> str:
    """A file-name-safe (ASCII) form of a prompt; accents are dropped, not the letters they sit on
    ("lésion hépatique" → lesion_hepatique, where it was l_sion_h_patique); ``fallback`` when nothing is left."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    s = re.sub(r"[^a-z0-9]+", "_", plain.lower()).strip("_")
    return s[:max_length].rstrip("_") or fallback


def label_map(run: Any) -> np.ndarray:
    """uint8/uint16 map: 0 background, i+1 where prompt i wins (highest probability among covering masks).

    One prompt at a time (a running best), so the peak holds one probability map on the source grid,
    not all of them; ties go to the earlier prompt.
    """
    shape = run.results[0].mask.shape
    labels = np.zeros(shape, dtype=np.uint8 if len(run.results) < 255 else np.uint16)
    best = np.full(shape, -1.0, dtype=np.float32)
    for i, result in enumerate(run.results, start=1):
        probability = result.probability_values()
        wins = (result.mask.array > 0) & (probability > best)
        labels[wins] = i
        best[wins] = probability[wins]
    return labels


def write_segmentation(
    run: Any,
    *,
    out_dir: Path,
    model_name: Optional[str] = None,
    weights: Optional[str] = None,
    overwrite: bool = False,
    extra_legend: Optional[dict] = None,
) -> list[Path]:
    """Write the label map, legend and probability maps of ``run`` into ``out_dir``; returns the paths.

    ``model_name`` and ``weights`` default to what ran (``run.model_name``, ``run.weights_record``), and the
    legend records the weights' file and checksums and the run's ``settings``, as ``textsegment segment``
    does; ``extra_legend`` adds to or replaces legend entries. All files are written or none: an error
    or Ctrl-C half-way leaves ``out_dir`` as it was (with ``overwrite``, the earlier run's files intact).
    """
    from .io.writers import staged_folder

    out_dir = Path(out_dir)
    check_outputs_free(out_dir, overwrite=overwrite)
    source = run.results[0].mask.source
    with staged_folder(out_dir, overwrite=overwrite, protected=[source] if source else []) as staging:
        written = _write_run(run, out_dir=staging, model_name=model_name, weights=weights, extra_legend=extra_legend)
    return [out_dir / path.relative_to(staging) for path in written]


def _write_run(run: Any, *, out_dir: Path, model_name: Optional[str], weights: Optional[str],
               extra_legend: Optional[dict]) -> list[Path]:
    """``write_segmentation``'s files, into an empty (staging) folder."""
    from .colors import lookup
    from .io.writers import write_float_map, write_json, write_label_map, write_slicer_segmentation

    reference = run.results[0].mask
    ran = getattr(run, "weights_record", None) or {}  # a run built by hand has none
    labels = label_map(run)
    in_label_map = np.bincount(labels.ravel(), minlength=len(run.results) + 1)
    written = [write_label_map(reference.with_array(labels), out_dir / LABEL_MAP)]
    segments = [(i, r.prompt, lookup(r.prompt).rgb_float) for i, r in enumerate(run.results, start=1)]
    written.append(write_slicer_segmentation(reference.with_array(labels), segments, out_dir / SLICER_SEGMENTATION))
    entries = []
    used: set[str] = set()
    for i, result in enumerate(run.results):
        name = slug(result.prompt)
        while name in used:
            name += "_"
        used.add(name)
        prob_path = out_dir / PROBABILITY_DIR / f"{i + 1:02d}_{name}.nii.gz"
        written.append(write_float_map(result.probability, prob_path))
        entries.append(
            {
                "label": i + 1,
                "prompt": result.prompt,
                "aux_prompt": result.aux_prompt,
                "voxels": result.voxels,
                "volume_ml": round(result.volume_ml, 3),
                # the prompt's own mask above counts overlaps; the label map gives each voxel to one prompt
                "label_map_voxels": int(in_label_map[i + 1]),
                "probability_map": str(prob_path.relative_to(out_dir)),
            }
        )
    legend = {
        "labels": entries,
        "label_map": LABEL_MAP,
        "slicer_segmentation": SLICER_SEGMENTATION,  # the same voxels, segments named after the prompts
        "overlaps": "each voxel takes the label of the most probable prompt among those covering it; "
                    "voxels/volume_ml count each prompt's own mask, label_map_voxels what the label map holds",
        "probability_grid": "source" if all(r.probability.shape == r.mask.shape for r in run.results) else "compact",
        **ran,  # weights, weights_file, weights_sha256, weights_data_sha256
        "model": model_name or getattr(run, "model_name", None),
        "weights": weights or ran.get("weights"),
        "device": run.device,
        "seconds": round(run.seconds, 3),
        "source": reference.source,
        "textsegment_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notice": "Research use only; not for diagnosis.",
    }
    if getattr(run, "settings", None):
        legend["settings"] = run.settings
    legend.update(extra_legend or {})
    written.append(write_json(legend, out_dir / LEGEND))
    return written
