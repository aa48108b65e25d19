"""Post-hoc changes that need no training, scored on phantoms the way ``textsegment bench`` scores.

    .venv/bin/python bench/post_hoc.py --model tgcnet-tiny --soups tgcnet-tiny-v9 tgcnet-tiny-v8+tgcnet-tiny-v9
    .venv/bin/python bench/post_hoc.py --model tgcnet-tiny --weights tgcnet-tiny-v9 --phantoms 2000-2003 \
        --smoothing "0.25,0.5,0.25" "1/6,2/3,1/6" --thresholds 0.4 0.5 0.6

Four questions about the shipped weights, each answered by mean 3D Dice per prompt level
(L1 / L2 / L3) and how many absent structures (negative controls) get any voxel:

* **weight averages** (``--soups A+B+C``): the uniform average of checkpoints of one lineage
  (each phase starts from the one before, so they share a basin), as in "model soups";
* **smoothing across slices** (``--smoothing W``): each probability map averaged with its
  neighbours along the slice axis with weights ``W`` (edge slices repeated) before thresholding;
* **thresholds** (``--thresholds T``): the mask at probability ≥ T instead of the engine's 0.5;
* **test-time shifts** (``--shifts ROWS,COLUMNS``): the mean of the runs on the CT and on copies
  moved in-plane by whole voxels (air comes in), each map moved back before the mean.

The prompts are the bench's (``semantibench.case_prompts``: the pyramid, seed = case index, one L2 per
target). Pick settings on the validation phantoms (1000–1003, the default, the ones training
picks its checkpoints on) and only then look at the held-out seeds 2000+. Prints a Markdown
table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import check_outputs, markdown_table, positive_int, run_info, user_errors, write_json  # noqa: E402

LEVELS = ("L1", "L2", "L3")


def soup_model(model_name: str, members: Sequence[str]):
    """The last member with every floating tensor replaced by the uniform average over the members."""
    from TextSegmentLib.weights import load_model

    models = [load_model(model_name, weights=w, device="cpu") for w in members]
    states = [m.state_dict() for m in models]
    models[-1].load_state_dict({
        key: sum(s[key].float() for s in states) / len(states) if value.is_floating_point() else value
        for key, value in states[-1].items()
    })
    return models[-1]


def smoothed(probability: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``probability`` (slices first) averaged along axis 0 with ``weights``, edge slices repeated."""
    reach = len(weights) // 2
    padded = np.concatenate([probability[:1].repeat(reach, 0), probability, probability[-1:].repeat(reach, 0)])
    return sum(w * padded[i : i + len(probability)] for i, w in enumerate(weights))


def shifted(array: np.ndarray, rows: int, columns: int, *, fill: float) -> np.ndarray:
    """``array`` moved by (rows, columns) along its last two axes; what comes in is ``fill``."""
    out = np.full_like(array, fill)
    height, width = array.shape[-2:]
    out[..., max(rows, 0) : height + min(rows, 0), max(columns, 0) : width + min(columns, 0)] = array[
        ..., max(-rows, 0) : height + min(-rows, 0), max(-columns, 0) : width + min(-columns, 0)
    ]
    return out


def score(model, cases, variants: dict, *, shifts: Sequence[tuple[int, int]] = ((0, 0),)) -> dict[str, dict]:
    """{variant: {level: [Dice], "negatives": n, "marked": n}}; a variant maps (slices, h, w) probabilities to masks.

    With several ``shifts`` the probabilities are the mean of runs on copies of the CT moved by
    (rows, columns) in its array (air comes in), each moved back (test-time augmentation).
    """
    from TextSegmentLib.engine import segment
    from TextSegmentLib.preprocess import slice_plan
    from TextSegmentLib.semantibench import case_prompts, dice, ground_truth
    from TextSegmentLib.volume import Volume

    out = {name: {"negatives": 0, "marked": 0, **{level: [] for level in LEVELS}} for name in variants}
    for index, case in enumerate(cases):
        prompts = case_prompts(case, seed=index)
        ct, runs = case.ct, []
        for rows, columns in shifts:
            moved = Volume(array=shifted(ct.array, rows, columns, fill=-1024), spacing=ct.spacing, origin=ct.origin,
                           direction=ct.direction)
            run = segment(moved, [p.text for p in prompts], model=model, device="cpu", probability_dtype="float32")
            runs.append([shifted(r.probability.array, -rows, -columns, fill=0.0) for r in run.results])
        plan = slice_plan(ct, axis="axial")
        for number, prompt in enumerate(prompts):
            probability = plan.extract(sum(r[number] for r in runs) / len(runs))
            truth = None if prompt.level == "negative" else ground_truth(prompt, case.labels, case.label_names)
            for name, to_mask in variants.items():
                mask = plan.restore(to_mask(probability).astype(np.uint8)).astype(bool)
                if truth is None:
                    out[name]["negatives"] += 1
                    out[name]["marked"] += bool(mask.any())
                else:
                    out[name][prompt.level].append(dice(mask, truth))
    return out


def rows_of(scores: dict[str, dict], kind: str) -> list[dict]:
    rows = []
    for name, s in scores.items():
        means = {level: float(np.mean(s[level])) for level in LEVELS}
        rows.append({"kind": kind, "variant": name, **means, "mean": float(np.mean(list(means.values()))),
                     "negatives marked": f"{s['marked']}/{s['negatives']}"})
    return rows


def _weights(text: str) -> list[float]:
    try:
        return [float(Fraction(part.strip())) for part in text.split(",")]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r}: write slice weights such as 0.25,0.5,0.25 or 1/6,2/3,1/6") from None


def _smoothing(text: str) -> str:
    """An argparse ``type``: the weights as written (they name the variant), checked to read as numbers."""
    weights = _weights(text)
    if len(weights) % 2 == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give an odd number of weights, centred on the slice itself")
    return text


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is no probability threshold; give one in (0, 1]")
    return value


def _shift(text: str) -> tuple[int, int]:
    try:
        rows, columns = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a shift as ROWS,COLUMNS in whole voxels, e.g. 2,-2") from None
    return rows, columns


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tgcnet-tiny", help="model preset (default: %(default)s)")
    parser.add_argument("--weights", default=None, help="weights for --smoothing/--thresholds/--shifts (default: the model's)")
    parser.add_argument(
        "--phantoms", default="1000-1003", help="phantom seeds FIRST-LAST or A,B,C (default: %(default)s, validation)"
    )
    parser.add_argument("--shape", default="32x128x128", help="phantom grid SLICESxROWSxCOLUMNS (default: %(default)s)")
    parser.add_argument("--soups", nargs="*", default=[], help="weight averages, members joined by '+'")
    parser.add_argument(
        "--smoothing", nargs="*", type=_smoothing, default=[],
        help="slice weights, e.g. '0.25,0.5,0.25' or '1/6,2/3,1/6'",
    )
    parser.add_argument("--thresholds", nargs="*", type=_threshold, default=[], help="mask thresholds in (0, 1]")
    parser.add_argument(
        "--shifts", nargs="*", type=_shift, default=[],
        help="test-time shifts 'ROWS,COLUMNS' averaged with the unshifted run",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write the numbers here (default: none written)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.soups or args.smoothing or args.thresholds or args.shifts):
        parser.error("nothing to score: give --soups, --smoothing, --thresholds or --shifts")
    check_outputs(parser, json_path=args.json)
    with user_errors():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    import torch

    from TextSegmentLib.training.data import load_source
    from TextSegmentLib.weights import load_model

    torch.set_num_threads(args.threads)
    cases = load_source(f"phantoms:{args.phantoms}@{args.shape}")
    rows: list[dict] = []
    shipped = load_model(args.model, weights=args.weights, device="cpu") if args.smoothing or args.thresholds or args.shifts else None
    if args.smoothing or args.thresholds:
        variants = {"mask at 0.5 (as shipped)": lambda p: p >= 0.5}
        variants.update({f"smoothing {w}": (lambda p, w=_weights(w): smoothed(p, w) >= 0.5) for w in args.smoothing})
        variants.update({f"threshold {t:g}": (lambda p, t=t: p >= t) for t in args.thresholds})
        rows += rows_of(score(shipped, cases, variants), "post-processing")
    if args.shifts:
        shifts = [(0, 0)] + list(args.shifts)
        name = "mean over shifts " + " ".join(f"({r},{c})" for r, c in shifts)
        rows += rows_of(score(shipped, cases, {name: lambda p: p >= 0.5}, shifts=shifts), "test-time shifts")
    for soup in args.soups:
        rows += rows_of(score(soup_model(args.model, soup.split("+")), cases, {soup: lambda p: p >= 0.5}), "weight average")
    columns = [("kind", "kind"), ("variant", "variant"), *((f"{level} Dice", level) for level in LEVELS),
               ("mean", "mean"), ("negatives marked", "negatives marked")]
    print(f"{args.model}, phantoms {args.phantoms} ({args.shape}), {torch.get_num_threads()} thread(s)\n")
    print(markdown_table(rows, columns))
    if args.json:
        write_json(args.json, {**run_info("bench/post_hoc.py", argv), "settings": dict(vars(args)),
                               "threads": torch.get_num_threads(), "model": args.model,
                               "weights": shipped.weights_source.label if shipped is not None else None,
                               "phantoms": args.phantoms, "shape": args.shape, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
