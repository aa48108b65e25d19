"""``textsegment demo``: the offline demo — phantom, L1/L2/L3 prompts, masks, saliency, report, Dice."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the offline demo: segment and explain a phantom (or --input CT)")
    p.add_argument("--out", "-o", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--input", "-i", default=None, help="your own CT (file or DICOM folder) instead of the phantom")
    p.add_argument("--prompt", "-p", action="append", default=None, help="prompts instead of the demo's L1/L2/L3")
    p.add_argument("--model", "-m", default="freqmedclip-tiny", help="model preset (default: freqmedclip-tiny)")
    p.add_argument("--weights", "-w", default=None, help="weights id or file (default: the model's shipped weights)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda, cuda:N or cpu")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=2, help="saliency stage (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo
    from .progressbar import progress_bar

    try:
        with progress_bar(disable=args.quiet) as bar:
            report = run_demo(
                out_dir=args.out, model_name=args.model, weights=args.weights, input_path=args.input,
                prompts=args.prompt, device=args.device, stage=args.stage, overwrite=args.overwrite, progress=bar,
            )
    except KeyboardInterrupt:
        # the demo's files are moved into --out only once all are written: an interrupted demo left none there
        print(f"textsegment demo: interrupted; nothing of this run was written to {args.out}", file=sys.stderr)
        return 130
    print(f"{report.model} ({report.weights}) on {report.device}: {report.seconds:.1f} s")
    for case in report.cases:
        dice = "" if case.dice is None else f"  Dice {case.dice:.3f}"
        print(f"  {case.level:5s} {case.prompt!r}: {case.voxels} voxels{dice}")
    print(f"report: {report.report}")
    print(f"files: {report.out_dir / 'segmentation'} (label map, Slicer segmentation, legend, probability maps), "
          f"{report.out_dir / 'saliency'} (saliency maps)")
    return 0
