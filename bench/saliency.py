"""Saliency benchmark: gradient-free layer-wise maps against Grad-CAM on the same model, layers and targets.

    .venv/bin/python bench/saliency.py --model freqmedclip-tiny --weights random --real
    .venv/bin/python bench/saliency.py --model freqmedclip-tiny --weights TRAINED_ID --real --doc docs/explainability.md

Cases: held-out phantoms (seeds from ``HELD_OUT_SEED`` on; training never uses them; 96×96 in-plane,
and with ``--large-phantoms`` 512×512 as in clinical CT) and, with ``--real``, the real CT in
../shared/data with its TotalSegmentator labels (silver, not manual).

Two measurements per case:

* **overhead**: ``segment`` with and without the saliency sink on the whole volume (best of
  ``--repeats``): what ``--saliency`` adds to a segmentation run, with the maps stored on the
  compact grid (the default) and on the source grid (``--grids``);
* **slices**: on the slices where a prompt's ground truth is largest, the model input is built as
  the engine builds it; the gradient-free maps (each stage) come from one inference pass and
  Grad-CAM from its own pass with a backward. Both explain the same target (``--target gt``: the
  ground-truth mask, the paper's setting; ``predicted``: the model's own mask) and are scored on
  the model grid inside the image (padding excluded), each map rescaled on its own (1st–99th
  percentile). Prompt swap pairs each prompt with another prompt of the case on the same slice,
  each explaining its own predicted mask (the tool's default), and correlates the two maps.

Prints a Markdown table, writes JSON (``--json``) and, with ``--doc``, replaces the table between
the ``<!-- bench:saliency -->`` markers of that file. Numbers from random weights are plumbing
checks, never evidence about the method.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    check_outputs,
    non_negative_int,
    positive_int,
    replace_doc_block,
    run_info,
    user_errors,
    write_json,
)
from TextSegmentLib.volume import Volume  # noqa: E402

log = logging.getLogger("bench.saliency")

HELD_OUT_SEED = 90_000
PHANTOM_SHAPE = (24, 96, 96)
LARGE_PHANTOM_SHAPE = (24, 512, 512)  # a clinical CT's in-plane size: the maps' resampling grows with it
PHANTOM_PROMPTS = ("liver", "spleen", "left kidney", "right kidney")
REAL_CT = Path("ct/totalseg_example_ct_sm/example_ct_sm.nii.gz")
REAL_LABELS = Path("ct/totalseg_example_ct_sm/example_seg.nii.gz")
REAL_CLASS_MAP = Path("ct/totalsegmentator_class_maps.json")
REAL_PROMPTS = ("liver", "spleen", "left kidney", "aorta")
DOC_BLOCK = "saliency"  # <!-- bench:saliency:start/end --> in docs/explainability.md
GRAD_CAM = "grad-cam"
OURS = "gradient-free"


@dataclass
class Case:
    name: str
    volume: Volume
    targets: dict[str, np.ndarray]  # prompt -> boolean mask on the volume grid


# ------------------------------------------------------------------------------------------ cases
def phantom_cases(
    count: int, *, shape: Sequence[int] = PHANTOM_SHAPE, prompts: Sequence[str] = PHANTOM_PROMPTS
) -> list[Case]:
    from TextSegmentLib.phantom import make_phantom

    cases = []
    suffix = "" if tuple(shape) == PHANTOM_SHAPE else f" ({shape[1]}×{shape[2]})"
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + count):
        phantom = make_phantom(seed=seed, shape=tuple(shape))
        targets = _targets(prompts, phantom.labels.array, phantom.label_names)
        cases.append(Case(f"phantom-{seed}{suffix}", phantom.ct, targets))
    return cases


def real_cases(data_root: Path, *, prompts: Sequence[str] = REAL_PROMPTS) -> list[Case]:
    from TextSegmentLib.io import read_label_map, read_volume

    ct = read_volume(data_root / REAL_CT)
    labels = read_label_map(data_root / REAL_LABELS)
    names = {int(k): v for k, v in json.loads((data_root / REAL_CLASS_MAP).read_text())["total"].items()}
    return [Case("totalseg-example-ct", ct, _targets(prompts, labels.array, names))]


def _targets(prompts: Sequence[str], labels: np.ndarray, names: dict[int, str]) -> dict[str, np.ndarray]:
    from TextSegmentLib.prompts import ground_truth, resolve_target

    targets = {}
    for prompt in prompts:
        target = resolve_target(prompt, label_names=names)
        mask = ground_truth(target, labels, names) if target is not None else None
        if mask is not None and mask.any():
            targets[prompt] = mask.astype(bool)
    return targets


# ---------------------------------------------------------------------------------- measurements
def measure_overhead(
    model: Any,
    case: Case,
    *,
    stages: Sequence[int],
    layers: Optional[Sequence[str]],
    device: str,
    repeats: int,
    grids: Sequence[str] = ("compact", "source"),
) -> list[dict]:
    """What the sink adds to a whole-volume ``segment`` run, best of ``repeats``.

    Measured for the model's default layer set (what ``--saliency`` gives a user) and, when
    different, for ``layers``. ``overhead`` is the sink's own time over the rest of the *same*
    run, so a busy machine slows both sides alike; the plain run's wall time is reported beside
    it as a cross-check. Each of ``grids`` (where the maps are stored) is measured in turn.
    """
    from TextSegmentLib.engine import segment
    from TextSegmentLib.saliency import SaliencyConfig, build_saliency_sink

    prompts = list(case.targets)
    segment(case.volume, prompts, model=model, device=device)  # warm-up (text cache, allocator)
    plain = min(_timed(lambda: segment(case.volume, prompts, model=model, device=device))[0] for _ in range(repeats))
    default = list(build_saliency_sink(model=model).taps)  # what --saliency gives a user
    layer_sets = [("default", default)]
    if layers is not None and list(layers) != default:
        layer_sets.append(("all" if set(layers) == set(model.tap_names) else "chosen", list(layers)))
    rows = []
    for (label, chosen), grid, stage in itertools.product(layer_sets, grids, stages):
        best = None
        for _ in range(repeats):
            sink = build_saliency_sink(model=model, layers=chosen, config=SaliencyConfig(stage=stage, grid=grid))
            seconds, run = _timed(lambda: segment(case.volume, prompts, model=model, device=device, features_sink=sink))
            share = run.features.seconds / max(seconds - run.features.seconds, 1e-9)
            if best is None or share < best[0]:
                best = (share, seconds, run.features.seconds)
        rows.append(
            {
                "case": case.name,
                "layers": f"{label} ({len(chosen)}), {grid} grid",
                "grid": grid,
                "stage": stage,
                "prompts": len(prompts),
                "slices": case.volume.shape[0],
                "segment_s": plain,
                "segment_with_saliency_s": best[1],
                "sink_s": best[2],
                "overhead": best[0],
            }
        )
    return rows


def compare_on_slices(
    model: Any,
    case: Case,
    *,
    stages: Sequence[int],
    layers: Sequence[str],
    target_mode: str,
    slices_per_prompt: int,
    repeats: int = 1,
) -> list[dict]:
    """Per (prompt, method, stage, layer): energy, pointing, Dice/IoU, prompt swap, best seconds per slice."""
    import torch

    from TextSegmentLib.preprocess import fit_to_square, slice_plan, window_composite

    plan = slice_plan(case.volume, axis="axial")
    hu = plan.extract(case.volume.array)
    size = int(model.image_size)
    prompts = list(case.targets)
    rows: list[dict] = []
    for p, prompt in enumerate(prompts):
        truth_slices = plan.extract(case.targets[prompt].astype(np.uint8))
        area = truth_slices.reshape(len(truth_slices), -1).sum(axis=1, dtype=np.int64)
        largest = np.argsort(-area, kind="stable")[:slices_per_prompt]
        chosen = np.sort(largest[area[largest] > 0])
        if not len(chosen):
            continue
        images, fit = fit_to_square(
            torch.from_numpy(window_composite(hu[chosen])), size=size, pixel_spacing=plan.pixel_spacing
        )
        truth, _ = fit_to_square(
            torch.from_numpy(truth_slices[chosen].astype(np.float32)), size=size, pixel_spacing=plan.pixel_spacing
        )
        truth = truth >= 0.5
        swap = prompts[(p + 1) % len(prompts)] if len(prompts) > 1 else None
        crop = (slice(None),) + fit.crop
        images = images.to(model.device)
        maps = _methods(
            model, images, prompt, truth, layers=layers, stages=stages, target_mode=target_mode, repeats=repeats,
            crop=fit.crop,
        )
        swapped = own = None
        if swap is not None:  # each prompt explains its own predicted mask, as the tool does by default
            swapped = _methods(
                model, images, swap, None, layers=layers, stages=stages, target_mode="predicted", crop=fit.crop
            )
            own = (
                maps
                if target_mode == "predicted"
                else _methods(
                    model, images, prompt, None, layers=layers, stages=stages, target_mode="predicted", crop=fit.crop
                )
            )
        for key, (layer_maps, seconds) in maps.items():
            method, stage = key
            for layer, raw in layer_maps.items():
                row = {
                    "case": case.name,
                    "prompt": prompt,
                    "method": method,
                    "stage": stage,
                    "layer": layer,
                    "slices": len(chosen),
                    "seconds_per_slice": seconds / len(chosen),
                }
                if raw is None:
                    rows.append({**row, "available": False})
                    continue
                row.update(_scores(raw[crop], truth[crop].cpu().numpy()))
                if swapped is not None and swapped[key][0].get(layer) is not None:
                    row["swap_partner"] = swap
                    row["prompt_swap_r"] = _swap(own[key][0][layer][crop], swapped[key][0][layer][crop])
                rows.append({**row, "available": True})
    return rows


def _methods(model, images, prompt, truth, *, layers, stages, target_mode, repeats=1, crop=None) -> dict:
    """{(method, stage): ({layer: (B, S, S) raw map or None}, best seconds of ``repeats``)} for one prompt.

    ``crop`` (rows, columns of the image inside the padded square) limits the predicted mask to the
    image, as the tool's sink does: what the model predicts in the padding is no target.
    """
    import torch
    import torch.nn.functional as F

    from TextSegmentLib.saliency import SaliencyConfig, explain_batch
    from TextSegmentLib.saliency.gradcam import grad_cam

    size = images.shape[-1]
    text = model.encode_text([prompt]).to(model.device).index([0] * images.shape[0])
    results = {}
    with torch.inference_mode():
        output = model(images, text, taps=list(layers))
        predicted = (torch.sigmoid(output.logits[:, 0].float()) >= 0.5).float()
        inside = None  # the image within the padded square, as the tool's sink marks it (stage 3's regions)
        if crop is not None:
            inside = torch.zeros_like(predicted[0])
            inside[crop[0], crop[1]] = 1.0
            predicted = predicted * inside
            inside = None if bool(inside.all()) else inside
    target = truth.float().to(images.device) if (target_mode == "gt" and truth is not None) else predicted

    def upsample(raw):
        return (
            F.interpolate(raw[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            .cpu()
            .numpy()
        )

    def ours(stage):
        with torch.inference_mode():
            maps, _, _ = explain_batch(
                output, layers=layers, target=target, config=SaliencyConfig(stage=stage), model=model, inside=inside
            )
            _sync(images)
        return maps

    def baseline():
        cams = grad_cam(model, images, text, layers=layers, target=target)
        _sync(images)
        return cams

    for stage in stages:
        seconds, maps = _best_time(lambda: ours(stage), repeats)
        results[(OURS, stage)] = ({name: upsample(m) for name, m in maps.items()}, seconds)
    seconds, cams = _best_time(baseline, repeats)
    results[(GRAD_CAM, 0)] = ({name: None if m is None else upsample(m) for name, m in cams.items()}, seconds)
    return results


def _scores(raw: np.ndarray, truth: np.ndarray) -> dict:
    """Mean scores over the slices that have a target; maps rescaled per slice for energy and overlap."""
    import torch

    from TextSegmentLib.saliency.maths import robust_rescale
    from TextSegmentLib.saliency.metrics import energy_inside, pointing_game, thresholded_overlap

    unit = robust_rescale(torch.from_numpy(raw)).numpy()
    scores = {"energy": [], "pointing": [], "dice": [], "iou": []}
    for k in range(len(raw)):
        if not truth[k].any():
            continue
        scores["energy"].append(energy_inside(unit[k], truth[k]))
        scores["pointing"].append(pointing_game(raw[k], truth[k]))
        dice, iou = thresholded_overlap(unit[k], truth[k])
        scores["dice"].append(dice)
        scores["iou"].append(iou)
    return {name: _nanmean(values) for name, values in scores.items()}


def _swap(first: np.ndarray, second: np.ndarray) -> float:
    from TextSegmentLib.saliency.metrics import prompt_swap_correlation

    return _nanmean([prompt_swap_correlation(a, b) for a, b in zip(first, second)])


# ------------------------------------------------------------------------------------- summaries
def summarise(rows: list[dict]) -> list[dict]:
    """One line per (method, stage, layer): means over cases, prompts and slices."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["stage"], row["layer"]), []).append(row)
    summary = []
    for (method, stage, layer), items in groups.items():
        usable = [r for r in items if r.get("available")]
        line = {"method": method, "stage": stage if method == OURS else None, "layer": layer, "n": len(usable)}
        for key in ("energy", "pointing", "dice", "iou", "prompt_swap_r"):
            line[key] = _nanmean([r.get(key, float("nan")) for r in usable])
        line["ms_per_slice"] = 1000 * _nanmean([r["seconds_per_slice"] for r in items])
        summary.append(line)
    return summary


def targets(summary: list[dict], overhead: list[dict], layer_order: Sequence[str]) -> dict:
    """The issue's targets, checked on these numbers (meaningful only with trained weights)."""

    def ms(method, stage=None):
        return _nanmean(
            [s["ms_per_slice"] for s in summary if s["method"] == method and (stage is None or s["stage"] == stage)]
        )

    result = {
        "overhead_at_most_10_percent": {  # the worst case per layer set and stage
            f"{o['layers']}, stage {o['stage']}": round(
                max(x["overhead"] for x in overhead if (x["layers"], x["stage"]) == (o["layers"], o["stage"])), 3
            )
            for o in overhead
        },
        "speedup_vs_grad_cam": {
            str(stage): round(ms(GRAD_CAM) / ms(OURS, stage), 1)
            for stage in sorted({s["stage"] for s in summary if s["method"] == OURS})
        },
        "prompt_swap_below_0.5": {},
        "energy_rises_with_depth": {},
    }
    for stage in sorted({s["stage"] for s in summary if s["method"] == OURS}):
        lines = {s["layer"]: s for s in summary if s["method"] == OURS and s["stage"] == stage}
        result["prompt_swap_below_0.5"][str(stage)] = round(_nanmean([s["prompt_swap_r"] for s in lines.values()]), 3)
        trends = {}
        for family in dict.fromkeys(name.split(".")[0] for name in layer_order if "." in name):
            energies = [
                lines[name]["energy"] for name in layer_order if name.startswith(family + ".") and name in lines
            ]
            if len(energies) > 1:
                trends[family] = {
                    "energies": [round(e, 3) for e in energies],
                    "rises": bool(np.all(np.diff(energies) >= 0)),
                }
        result["energy_rises_with_depth"][str(stage)] = trends
    return result


def format_tables(summary: list[dict], overhead: list[dict], *, title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| method | stage | layer | n | energy in target | pointing | Dice@0.5 | IoU@0.5 | prompt-swap r "
        "| ms/slice (all layers) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        stage = "-" if s["stage"] is None else str(s["stage"])
        if s["n"] == 0:
            lines.append(
                f"| {s['method']} | {stage} | {s['layer']} | 0 | n/a (tap not on the logit path) | | | | "
                f"| {s['ms_per_slice']:.1f} |"
            )
            continue
        lines.append(
            f"| {s['method']} | {stage} | {s['layer']} | {s['n']} | {_f(s['energy'])} | {_f(s['pointing'])} "
            f"| {_f(s['dice'])} | "
            f"{_f(s['iou'])} | {_f(s['prompt_swap_r'])} | {s['ms_per_slice']:.1f} |"
        )
    lines += [
        "",
        "| case | layers | stage | prompts | slices | segment alone (s) | segment + saliency (s) | of which saliency (s) "
        "| overhead (saliency / rest of that run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in overhead:
        lines.append(
            f"| {o['case']} | {o.get('layers', '')} | {o['stage']} | {o['prompts']} | {o['slices']} | {o['segment_s']:.2f} | "
            f"{o['segment_with_saliency_s']:.2f} | {o['sink_s']:.2f} | {100 * o['overhead']:+.0f} % |"
        )
    return "\n".join(lines)


def format_targets(checked: dict) -> str:
    """The issue's four targets as a table: what was measured and whether it is met."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    for key, value in checked["overhead_at_most_10_percent"].items():
        lines.append(f"| saliency adds ≤ 10 % ({key}) | {100 * value:+.0f} % | {'yes' if value <= 0.10 else 'no'} |")
    for stage, value in checked["speedup_vs_grad_cam"].items():
        lines.append(f"| ≥ 10× faster than Grad-CAM, stage {stage} | {value:.1f}× | {'yes' if value >= 10 else 'no'} |")
    for stage, value in checked["prompt_swap_below_0.5"].items():
        lines.append(f"| prompt-swap r < 0.5, stage {stage} (mean over layers) | {value:.2f} | {'yes' if value < 0.5 else 'no'} |")
    for stage, trends in checked["energy_rises_with_depth"].items():
        for family, trend in trends.items():
            energies = " → ".join(f"{e:.2f}" for e in trend["energies"])
            lines.append(f"| energy rises with depth, stage {stage}, {family}.* | {energies} | {'yes' if trend['rises'] else 'no'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- run
def run_benchmark(
    model: Any,
    cases: Sequence[Case],
    *,
    stages: Sequence[int] = (1, 2, 3),
    layers: Optional[Sequence[str]] = None,
    target_mode: str = "gt",
    slices_per_prompt: int = 4,
    device: str = "cpu",
    repeats: int = 3,
    grids: Sequence[str] = ("compact", "source"),
) -> dict:
    layers = list(model.resolve_taps(True if layers is None else list(layers)))
    rows, overhead = [], []
    for case in cases:
        log.info("case %s: %d prompt(s)", case.name, len(case.targets))
        rows += compare_on_slices(
            model,
            case,
            stages=stages,
            layers=layers,
            target_mode=target_mode,
            slices_per_prompt=slices_per_prompt,
            repeats=repeats,
        )
        overhead += measure_overhead(model, case, stages=stages, layers=layers, device=device, repeats=repeats, grids=grids)
    summary = summarise(rows)
    return {
        "layers": layers,
        "stages": list(stages),
        "target": target_mode,
        "summary": summary,
        "overhead": overhead,
        "targets": targets(summary, overhead, layers),
        "rows": rows,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="freqmedclip-tiny", help="model preset (default: %(default)s)")
    parser.add_argument(
        "--weights", default="random", help="weights id or checkpoint; 'random' = plumbing check only (default: %(default)s)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--clip-source", default=None, help="model override, e.g. random:ViT-B-16 (a base-sized tower offline)"
    )
    parser.add_argument(
        "--phantoms", type=non_negative_int, default=2, help="held-out phantom cases, 24×96×96 (default: %(default)s)"
    )
    parser.add_argument(
        "--large-phantoms", type=non_negative_int, default=0,
        help="held-out phantoms at 24×512×512, a clinical in-plane size (default: %(default)s)",
    )
    parser.add_argument("--real", action="store_true", help="also the real CT in --data")
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"),
        help="folder holding ct/totalseg_example_ct_sm (default: ../shared/data beside the repository)",
    )
    parser.add_argument("--stages", default="1,2,3", help="comma-separated saliency stages, 1 to 3 (default: %(default)s)")
    parser.add_argument("--layers", default=None, help="comma-separated taps (default: all)")
    parser.add_argument(
        "--grids", default="compact,source",
        help="where the overhead runs store the maps (comma-separated; compact is the default of the tool; "
             "default: %(default)s)",
    )
    parser.add_argument(
        "--target", choices=("gt", "predicted"), default="gt",
        help="what both methods explain: the ground-truth mask or the model's own (default: %(default)s)",
    )
    parser.add_argument(
        "--slices-per-prompt", type=positive_int, default=4,
        help="slices scored per prompt, those where its mask is largest (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timings: best of this many (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--json", default=str(REPO / "out" / "bench_saliency.json"),
        help="where the results go (default: out/bench_saliency.json in the repository)",
    )
    parser.add_argument("--doc", default=None, help="Markdown file whose bench:BLOCK block gets the table")
    parser.add_argument("--doc-block", default=DOC_BLOCK, help="BLOCK for --doc (one per model, say; default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        parser.error(f"--stages {args.stages!r}: give stages 1, 2 or 3, comma-separated")
    if not stages or not set(stages) <= {1, 2, 3}:
        parser.error(f"--stages {args.stages!r}: give stages 1, 2 or 3, comma-separated")
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    if not grids or not set(grids) <= {"compact", "source"}:
        parser.error(f"--grids {args.grids!r}: give compact and/or source, comma-separated")
    if not (args.phantoms or args.large_phantoms or args.real):
        parser.error("no case to measure: give --phantoms or --large-phantoms above 0, or --real")
    check_outputs(parser, json_path=args.json, doc=args.doc, block=args.doc_block)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    import torch

    from TextSegmentLib.weights import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # random weights are then the same on every run
    overrides = {"clip_source": args.clip_source} if args.clip_source else {}
    model = load_model(args.model, weights=args.weights, device=args.device, **overrides)
    cases = phantom_cases(args.phantoms) + phantom_cases(args.large_phantoms, shape=LARGE_PHANTOM_SHAPE)
    cases += real_cases(Path(args.data)) if args.real else []
    stages = [int(s) for s in args.stages.split(",")]
    layers = args.layers.split(",") if args.layers else None
    result = run_benchmark(
        model,
        cases,
        stages=stages,
        layers=layers,
        target_mode=args.target,
        slices_per_prompt=args.slices_per_prompt,
        device=args.device,
        repeats=args.repeats,
        grids=[g.strip() for g in args.grids.split(",") if g.strip()],
    )
    info = run_info("bench/saliency.py", argv)
    result.update(
        model=args.model,
        overrides=overrides,
        weights=args.weights,
        device=args.device,
        torch_threads=torch.get_num_threads(),
        cases=[c.name for c in cases],
        created=info["created"],
        command=info["command"],
        machine=info["machine"],
        settings=dict(vars(args)),
    )
    title = (
        f"{args.model}{' ' + str(overrides) if overrides else ''}, weights={args.weights}, target={args.target}, "
        f"device={args.device}, "
        f"{torch.get_num_threads()} CPU thread(s), cases: {', '.join(c.name for c in cases)}"
    )
    if args.weights == "random":
        title += " — RANDOM WEIGHTS: plumbing check, not evidence about the method"
    table = format_tables(result["summary"], result["overhead"], title=title) + "\n\n" + format_targets(result["targets"])
    print(table)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {write_json(args.json, result)}")
    if args.doc:
        replace_doc_block(args.doc, args.doc_block, table)
        print(f"updated {args.doc}")
    return 0


def _best_time(fn, repeats: int):
    """(fastest wall time, last result) of ``repeats`` calls: the least disturbed by other load."""
    best, value = float("inf"), None
    for _ in range(max(1, repeats)):
        seconds, value = _timed(fn)
        best = min(best, seconds)
    return best, value


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def _sync(tensor) -> None:
    import torch

    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _f(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
