"""Write saliency maps to disk: one image per prompt and layer, plus one JSON legend saying how to read them.

Layout inside ``out_dir``::

    saliency_legend.json
    01_liver/vit_3.nii.gz  01_liver/vit_11.nii.gz ... 01_liver/combined.nii.gz
    02_spleen/...

uint8 maps are stored as uint8 (value = stored / 255); float16 maps are widened to float32
because no image format here has half floats. Writes are atomic and never overwrite silently.
"""

from __future__ import annotations

import dataclasses
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..errors import InputError, OutputExistsError
from .sink import SaliencyResult

LEGEND = "saliency_legend.json"
NOTICE = (
    "Saliency maps show which regions resemble the target in each layer's features; they are not "
    "evidence that a segmentation is correct. Research use only; not for diagnosis."
)


def layer_file_name(layer: str, suffix: str = ".nii.gz") -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", layer).strip("_") + suffix


def check_out_folder(out_dir: Path | str, *, option: str = "--out") -> None:
    """Refuse a folder that cannot be made or written, before any work: a file on its path, or no permission.

    Found when writing, after the whole run, it used to end in a traceback (NotADirectoryError).
    """
    out_dir = Path(out_dir)
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{out_dir}: cannot be a folder: {existing} is a file; choose another {option} folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"{out_dir}: cannot be written: no write permission in {existing}; choose another {option} folder"
        )


def write_saliency(
    result: SaliencyResult,
    *,
    out_dir: Path | str,
    overwrite: bool = False,
    suffix: str = ".nii.gz",
    extra_legend: Optional[dict[str, Any]] = None,
) -> list[Path]:
    """Write every map of ``result`` and the legend into ``out_dir``; returns the written paths."""
    from ..export import slug
    from ..io.writers import write_float_map, write_json, write_volume

    out_dir = Path(out_dir)
    check_out_folder(out_dir, option="out_dir (CLI: --out)")
    plan: list[tuple[Any, Path]] = []  # (map volume, destination), all decided before anything is written
    prompts = []
    for i, item in enumerate(result.prompts):
        folder = f"{i + 1:02d}_{slug(item.prompt)}"
        layers = []
        taken: set[str] = set()
        for name, volume in item.maps.items():
            relative = _unique_file(folder, name, suffix, taken)
            entry = {**item.legend[name], "file": relative}
            if volume.array.dtype.kind == "f":  # no image format stores half floats: say what the file holds
                entry["encoding"] = f"float32 (computed as {volume.array.dtype.name}): value in [0, 1]"
            plan.append((volume, out_dir / relative))
            layers.append(entry)
        prompts.append(
            {"prompt": item.prompt, "folder": folder, "slices_with_target": item.target_slices, "layers": layers}
        )
    legend = {
        "method": "gradient-free layer-wise saliency (cosine similarity to reference representations)",
        "stage": result.stage,
        "layers": list(result.layers),
        "seconds": round(result.seconds, 3),
        "axis": result.axis,  # slices and slices_with_target count slices along it
        "slices": result.slices,
        "on_slices_without_target": "every map is 0 there: nothing to explain on that slice, not low saliency",
        "config": dataclasses.asdict(result.config),
        "prompts": prompts,
        "textsegment_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notice": NOTICE,
    }
    legend.update(extra_legend or {})
    if not overwrite:  # refuse before writing anything, so a refusal leaves no half-written folder
        existing = [path for path in [p for _, p in plan] + [out_dir / LEGEND] if path.exists()]
        if existing:
            raise OutputExistsError(
                f"{existing[0]}: exists already; choose another folder (CLI: --out) or pass overwrite=True (CLI: --overwrite); nothing was written"
            )
    # The legend goes last and any old one first: a folder with a legend is always a finished one.
    (out_dir / LEGEND).unlink(missing_ok=True)
    written: list[Path] = []
    try:
        for volume, path in plan:
            writer = write_volume if volume.array.dtype.kind == "u" else write_float_map
            written.append(writer(volume, path, overwrite=overwrite))
        written.append(write_json(legend, out_dir / LEGEND, overwrite=overwrite))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _unique_file(folder: str, layer: str, suffix: str, taken: set[str]) -> str:
    """``folder/<layer slug><suffix>``, numbered when another layer of the prompt slugs the same (vit.3, vit_3)."""
    stem = layer_file_name(layer, "") or "layer"
    name, n = stem, 1
    while name.lower() in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name.lower())
    return f"{folder}/{name}{suffix}"
