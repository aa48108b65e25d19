"""``textsegment reproduce WEIGHTS_ID --out DIR``: make a shipped model again from scratch, phase by phase."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train a shipped model again from random weights, following its recipes")
    p.add_argument("weights", help="a shipped weights id, e.g. tgcnet-tiny-v9 (its recipe is RECIPES/<id>.json)")
    p.add_argument("--out", "-o", required=True, help="folder for every phase's run and export (run again to continue)")
    p.add_argument("--recipes", default="recipes", help="recipe folder (default: recipes, from the repository root)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dry-run", action="store_true", help="list the phases and their recipes; train nothing")
    p.add_argument("--steps", type=int, help="train each phase for this many steps only: a quick check that the whole "
                   "chain runs here before the real run (into another --out); not the shipped model")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _recipes_id(weights_id: str) -> str:
    """The id whose recipes make ``weights_id``: its own, or the chain it was made by running again (the
    manifest's ``recipes_of``: freqmedclip-tiny-v9 is freqmedclip-tiny-v8's recipes rerun from scratch)."""
    from ..weights import load_manifest

    entry = load_manifest().get(weights_id)
    if entry is None or not entry.recipes_of:
        return weights_id
    print(f"{weights_id} was made by running the recipes of {entry.recipes_of} again from random weights: "
          f"reproducing those (the last export is named {entry.recipes_of})", file=sys.stderr)
    return entry.recipes_of


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..export import refuse_file_as_folder
    from ..training import recipe_chain, reproduce
    from ..training.recipes import phase_state
    from .progressbar import progress_bar

    if args.steps is not None and args.steps < 1:  # --dry-run listed "0 steps" per phase for a run that refuses them
        raise InputError(f"steps per phase must be at least 1, got {args.steps}")
    chain = recipe_chain(_recipes_id(args.weights), recipes_dir=args.recipes)
    if args.dry_run:  # the steps the run would train (--steps's, not the recipe's) and what --out holds already
        for number, phase in enumerate(chain, start=1):
            start = f"from {phase.starts_from}" if phase.starts_from else "from random weights"
            steps = args.steps if args.steps is not None else phase.config.steps
            state = phase_state(phase, out_dir=args.out, steps=args.steps)
            print(f"{number}. {phase.weights_id}: {phase.recipe}, {state}, {steps} steps {start}")
        return 0
    refuse_file_as_folder(args.out)  # else the first phase loads its data, then fails with a traceback
    from tqdm import tqdm

    try:
        with progress_bar(disable=args.quiet) as bar:
            # tqdm.write: a print ran on after the bar's text, "...loss 1.646phase 2/8: ..."
            made = reproduce(chain[-1].weights_id, out_dir=args.out, recipes_dir=args.recipes, threads=args.threads,
                             device=args.device, steps=args.steps, progress=bar, report=tqdm.write)
    except KeyboardInterrupt:  # the generic message named no way to continue
        print("textsegment reproduce: interrupted; finished phases were kept; run the same command again to continue "
              "(an unfinished phase resumes from its last checkpoint)", file=sys.stderr)
        return 130
    if made is None:
        return 1
    if args.steps is not None:
        print(f"made {made} with {args.steps} steps per phase: the chain runs here. For the model itself, run "
              f"again without --steps into another --out folder.")
        return 0
    model = chain[-1].config.model
    print(f"made {made}; compare it with the shipped one: textsegment bench --model {model} --weights {made} "
          f"--compare-model {model} --compare-weights {args.weights} --phantoms 4 --seed 2000 --out OUT")
    return 0
