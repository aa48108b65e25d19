"""The offline demo: a phantom (or your CT), an L1, an L2 and an L3 prompt, masks, saliency and a report.

It is the README's main job, so it must work on a fresh machine with no network: the phantom is
generated, the model's default weights ship inside the package, and everything the run produces
lands in one folder with an ``index.html`` that shows it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import OutputExistsError
from .volume import Volume

log = logging.getLogger(__name__)

DEMO_SEED = 7
DEMO_SHAPE = (32, 128, 128)
# (level, preferred text): the prompt pyramid's own sentences, so their ground truth is exact
DEMO_PROMPTS = (
    ("L1", "liver"),
    ("L2", "the solid organ in the left upper quadrant, behind the stomach and under the left hemidiaphragm"),
    ("L3", "liver excluding the tumor"),
)
DEFAULT_REAL_PROMPTS = ("liver", "spleen", "left kidney")


@dataclass
class DemoCase:
    """What one demo prompt produced, and how well it matches the ground truth when there is one."""

    prompt: str
    level: str
    voxels: int
    dice: Optional[float]
    montage: Optional[Path] = None


@dataclass
class DemoReport:
    out_dir: Path
    model: str
    weights: str
    device: str
    seconds: float
    cases: list[DemoCase] = field(default_factory=list)
    report: Optional[Path] = None


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly (1.0)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(prediction, truth).sum() / total)


def demo_phantom(*, seed: int = DEMO_SEED) -> tuple[Volume, list[tuple[str, str, np.ndarray]]]:
    """The demo's phantom and its (level, prompt, ground truth) triples."""
    from .phantom import make_phantom
    from .prompts import build_prompt_pyramid, ground_truth

    phantom = make_phantom(seed=seed, shape=DEMO_SHAPE, lesions="all")
    pyramid = build_prompt_pyramid(phantom.labels.array, phantom.label_names, seed=seed)
    cases = []
    for level, text in DEMO_PROMPTS:
        same_level = [p for p in pyramid if p.level == level]
        chosen = next((p for p in same_level if p.text == text), same_level[0])
        truth = ground_truth(chosen, phantom.labels.array, phantom.label_names)
        cases.append((level, chosen.text, truth))
    return phantom.ct, cases


def run_demo(
    *,
    out_dir: Path | str = "demo_out",
    model_name: str = "freqmedclip-tiny",
    weights: Optional[str] = None,
    input_path: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
    device: str = "auto",
    stage: int = 2,
    overwrite: bool = False,
    progress: Any = None,
) -> DemoReport:
    """Segment and explain the demo case into ``out_dir``; returns what was measured and written."""
    from .export import LEGEND, holds_earlier_run, refuse_file_as_folder, write_segmentation
    from .io import read_volume
    from .io.writers import STAGING_PREFIX, staged_folder
    from .report import write_html_report
    from .saliency import explain, save_montage, write_saliency
    from .weights import load_model, weights_label

    out_dir = Path(out_dir)
    refuse_file_as_folder(out_dir)
    if out_dir.exists() and any(not p.name.startswith(STAGING_PREFIX) for p in out_dir.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out_dir}: is not empty; choose another folder (CLI: --out) or pass overwrite=True (CLI: --overwrite)")
        if not holds_earlier_run(out_dir / "segmentation"):
            # --overwrite replaces an earlier demo, not the files of a folder that was never one (a case folder)
            raise OutputExistsError(f"{out_dir}: is not empty and holds no earlier demo (no segmentation/{LEGEND}); "
                                    "overwrite=True (CLI: --overwrite) replaces an earlier demo only: choose another "
                                    "folder (CLI: --out)")

    if isinstance(prompts, str):  # one prompt, not one per character
        prompts = [prompts]
    if input_path is None:
        volume, cases = demo_phantom()
        if prompts:
            cases = [("user", p, None) for p in prompts]
    else:
        volume = read_volume(input_path)
        cases = [("user", p, None) for p in (prompts or DEFAULT_REAL_PROMPTS)]

    model = load_model(model_name, weights=weights, device=device)
    run = explain(volume, [text for _, text, _ in cases], model=model, stage=stage, device=device, progress=progress)
    label = weights_label(model, weights)
    inputs = [volume.source, *(volume.dicom.files if volume.dicom is not None else ())]
    # written to a hidden folder, moved into out_dir once complete: Ctrl-C half-way leaves no half demo
    with staged_folder(out_dir, overwrite=overwrite, protected=[p for p in inputs if p]) as staging:
        write_segmentation(run, out_dir=staging / "segmentation", model_name=model_name, weights=label)
        write_saliency(run.features, out_dir=staging / "saliency")
        report = DemoReport(out_dir=out_dir, model=model_name, weights=label, device=run.device,
                            seconds=run.seconds)
        for i, ((level, text, truth), result) in enumerate(zip(cases, run.results)):
            montage = save_montage(run.features[i], volume=volume, mask=result.mask,
                                   path=staging / f"montage_{i + 1:02d}.png")
            score = None if truth is None else dice(result.mask.array, truth)
            report.cases.append(DemoCase(prompt=text, level=level, voxels=result.voxels, dice=score, montage=montage))
        write_html_report(report, path=staging / "index.html")
        ours = {out_dir / p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
    for case in report.cases:  # where they lie now
        case.montage = out_dir / case.montage.relative_to(staging)
    report.report = out_dir / "index.html"
    stale = sorted(p for p in out_dir.rglob("*") if p.is_file() and p not in ours)
    if stale:
        log.warning("%s: %d file(s) of an earlier demo were not replaced by this one and stay, e.g. %s",
                    out_dir, len(stale), stale[0])
    return report
