"""How far a reproduced checkpoint lies from the shipped one, measured against the phase's own step.

    .venv/bin/python tools/weights_distance.py runs/repro/freqmedclip-tiny-v8.safetensors \
        freqmedclip-tiny-v8 --start freqmedclip-tiny-v7

Prints ‖reproduced − shipped‖ / ‖shipped‖ over every floating-point tensor and, with ``--start``
(the weights the phase began from), ‖shipped − start‖ / ‖shipped‖: how far the phase itself moved
the weights. A reproduction that is the same training up to rounding lies orders of magnitude
closer to the shipped weights than the phase's own step. The bench (``textsegment bench ...
--compare-weights``) says whether the difference matters for the masks; this says how large it is.
Weights are shipped ids or checkpoint files; exit code 2 when one is missing or the tensors differ
in names or shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_tensors(weights: str) -> dict:
    """The floating-point tensors of a shipped weights id or a checkpoint file, as float32."""
    from safetensors.torch import load_file

    from TextSegmentLib.weights import load_manifest, resolve_weights

    path = Path(weights)
    if not path.is_file():
        entry = load_manifest().get(weights)
        if entry is None:
            raise ValueError(f"{weights}: neither a checkpoint file nor a known weights id (textsegment weights list)")
        path = resolve_weights(weights, model_name=entry.model, offline=True).path
    return {name: t.float() for name, t in load_file(str(path)).items() if t.is_floating_point()}


def relative_distance(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all tensors together (the same names and shapes in both)."""
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("the two checkpoints hold different tensors (names or shapes); not the same model")
    difference = sum(float((a[k] - b[k]).square().sum()) for k in a)
    size = sum(float(b[k].square().sum()) for k in b)
    return (difference / max(size, 1e-30)) ** 0.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reproduced", help="the reproduced checkpoint (a file or a weights id)")
    parser.add_argument("shipped", help="the shipped weights id (or file) it should match")
    parser.add_argument("--start", help="the weights the phase started from, for scale")
    args = parser.parse_args(argv)
    try:
        shipped = load_tensors(args.shipped)
        print(f"reproduced vs shipped: {relative_distance(load_tensors(args.reproduced), shipped):.2e}")
        if args.start:
            print(f"shipped vs start (the phase's own step): {relative_distance(load_tensors(args.start), shipped):.2e}")
    except Exception as exc:  # a missing file or id, or another model's checkpoint: one line, exit 2
        print(f"weights_distance: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
