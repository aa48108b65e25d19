"""``textsegment phantom OUT --seed N``: a synthetic CT, its labels and a prompt pyramid, for when no data exists."""

from __future__ import annotations

import argparse

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("phantom", help="write a seeded synthetic abdominal CT with labels and prompts (test bed)")
    p.add_argument("out", help="output folder: ct.nii.gz, labels.nii.gz, labels.json, prompts.json")
    p.add_argument("--seed", type=int, default=0, help="anatomy, lesions and noise (default 0)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(48, 160, 160), help="voxels (default 48 160 160)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), default=None,
                   help="mm (default: fit a 400×400×240 mm field of view into the grid)")
    p.add_argument("--lesions", default="random", help="random, all, none, or comma-separated: liver_tumor,kidney_cyst,lung_nodule")
    p.add_argument("--noise", type=float, default=12.0, metavar="HU", help="noise standard deviation (default 12)")
    p.add_argument("--phase", choices=("portal_venous", "non_contrast"), default="portal_venous")
    p.add_argument("--flip-x", action="store_true", help="store the x axis toward the patient's right (like RAS files)")
    p.add_argument("--oblique", type=float, default=0.0, metavar="DEG", help="tilt the grid DEG degrees about the left-right axis")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..phantom import make_phantom, oblique_direction, save_phantom

    direction = oblique_direction(args.oblique, axis="x") if args.oblique else np.eye(3)
    if args.flip_x:
        direction = direction @ np.diag([-1.0, 1.0, 1.0])
    lesions = args.lesions if args.lesions in ("random", "all", "none") else [s.strip() for s in args.lesions.split(",") if s.strip()]
    phantom = make_phantom(seed=args.seed, shape=args.shape, spacing=args.spacing, direction=direction,
                           lesions=lesions, noise_hu=args.noise, phase=args.phase)
    paths = save_phantom(phantom, args.out, overwrite=args.overwrite)
    lesion_text = ", ".join(phantom.lesions) or "no lesions"
    print(f"phantom seed {args.seed}: {'×'.join(map(str, phantom.ct.shape))} voxels, {lesion_text} -> {paths['ct.nii.gz'].parent}")
    return 0
