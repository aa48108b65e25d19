"""Re-render the README picture and the extension's screenshot (``Resources/Screenshots/TextSegment1.png``).

    .venv/bin/python tools/render_screenshot.py --overwrite

It segments a real CT that the shipped model never saw in training (TotalSegmentator's DICOM example
in ../shared/data) with the shipped default weights on the CPU, takes the saliency from the same
forward pass (``features_sink``, as ``textsegment segment --saliency``), and renders the slice where
the mask is largest through Slicer's slice pipeline, headless (``TextSegmentLib.slicer_screenshot``).
Exit code 0 on success, 2 on an error (nothing is replaced unless ``--overwrite``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CT = REPO.parent / "shared" / "data" / "dicom" / "totalseg_example_ct_dicom"
DEFAULT_OUT = REPO / "Resources" / "Screenshots" / "TextSegment1.png"
DEFAULT_MODEL = "freqmedclip-tiny"
OUTLINE_RGB = (0.22, 1.0, 0.08)  # the neon green of the `textsegment explain` montages: visible over Inferno


def slice_arg(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a slice index or 'auto', got {text!r}") from None


def parse(argv):
    p = argparse.ArgumentParser(prog="render_screenshot.py", description=__doc__.splitlines()[0])
    p.add_argument("--ct", default=str(DEFAULT_CT), help="CT file or DICOM folder (default: the TotalSegmentator DICOM example)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="PNG to write (default: Resources/Screenshots/TextSegment1.png)")
    p.add_argument("--prompt", default="liver", help="what to segment and explain")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model preset")
    p.add_argument("--weights", default=None, help="weights id or checkpoint (default: the model's shipped default)")
    p.add_argument("--layer", default="combined", help="saliency layer to overlay (default: the combined map)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=1, help="saliency stage")
    p.add_argument("--hide-below", type=float, default=0.3, help="saliency below this is transparent (0: only zero)")
    p.add_argument("--opacity", type=float, default=0.5, help="saliency overlay opacity")
    p.add_argument("--slice", type=slice_arg, default="auto", help="canonical axial slice index, or auto (largest mask)")
    p.add_argument("--width", type=int, default=800, help="picture width in pixels")
    p.add_argument("--overwrite", action="store_true", help="replace an existing picture")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from TextSegmentLib.engine import segment
    from TextSegmentLib.errors import OutputExistsError, TextSegmentError
    from TextSegmentLib.io import read_volume
    from TextSegmentLib.saliency import build_saliency_sink
    from TextSegmentLib.slicer_screenshot import render_slice_overlay, save_png, slice_width_for
    from TextSegmentLib.weights import load_manifest, load_model

    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise OutputExistsError(f"{out}: exists already; pass --overwrite to replace it")
        weights = args.weights
        if weights is None:
            entry = load_manifest().default_for(args.model)
            weights = entry.id if entry is not None else None
        volume = read_volume(args.ct)
        model = load_model(args.model, weights=weights, device="cpu")
        sink = build_saliency_sink(model=model, layers=None, stage=args.stage)
        run = segment(volume, [args.prompt], model=model, device="cpu", features_sink=sink)
        saliency = run.features[0]
        if args.layer not in saliency.maps:
            raise TextSegmentError(f"no saliency layer {args.layer!r}; there are {', '.join(saliency.layers)}")
        result = run.results[0]
        image = render_slice_overlay(
            volume, mask=result.mask, saliency=saliency.maps[args.layer], prompt=args.prompt,
            slice_index=args.slice, opacity=args.opacity, label_color=OUTLINE_RGB,
            saliency_threshold=args.hide_below or None, width=slice_width_for(args.width),
        )
        hidden = f", < {args.hide_below:g} hidden" if args.hide_below else ""
        title = (f"“{args.prompt}” · {args.model} · weights {weights or 'default'} · "
                 f"saliency: {args.layer} (stage {args.stage}{hidden})")
        footnote = (f"CT {Path(args.ct).name} · axial · {result.volume_ml:.0f} ml segmented · rendered headless by Slicer's "
                    "slice logic · research use only")
        path = save_png(image, out, title=title, footnote=footnote,
                        legend={f"{args.prompt} mask (outline)": OUTLINE_RGB}, overwrite=args.overwrite)
    except TextSegmentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB); {result.voxels} voxels, {run.seconds:.1f} s on {run.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
