"""``textsegment train --config recipes/NAME.json``: train (or resume) a model, then export small weights.

Multi-process: ``torchrun --nproc-per-node N -m TextSegmentLib train --config ...`` (gloo on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on phantoms and labelled CT (see recipes/)")
    p.add_argument("--config", "-c", help="a recipe JSON with TrainConfig fields (command-line options win)")
    p.add_argument("--model", "-m", help="model preset")
    p.add_argument("--data", action="append", help="data source, repeatable: phantoms:0-47, totalseg:CT,SEG,CLASSMAP, "
                   "msd:FOLDER, dicomseg:SERIES,SEG")
    p.add_argument("--val", action="append", help="validation source (same forms as --data)")
    p.add_argument("--init", help="fine-tune: start from these weights (a weights id, e.g. freqmedclip-tiny-v5, or a file)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-minutes", type=float, help="wall-clock budget of this command, loading included: save "
                   "and stop cleanly after it (a --resume does not inherit it)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", "-o", help="run folder: last.pt (to resume), best.safetensors, config.json, curves.png")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (with OUT/config.json when no --config)")
    p.add_argument("--export", help="write the best weights here as an fp16 TextSegment checkpoint when done "
                   "(mixed with the init weights when the recipe sets export_mix below 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export file, and start again "
                   "from step 0 in an --out folder that holds an earlier run")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from ..training import TrainConfig, load_recipe

    values = {}
    for arg, name in (("model", "model"), ("steps", "steps"), ("batch_size", "batch_size"), ("max_minutes", "max_minutes"),
                      ("threads", "threads"), ("device", "device"), ("seed", "seed"), ("out", "out_dir"),
                      ("init", "init_weights")):
        if getattr(args, arg) is not None:
            values[name] = getattr(args, arg)
    if args.data:
        values["sources"] = tuple(args.data)
    if args.val:
        values["val_sources"] = tuple(args.val)
    if args.config:
        return load_recipe(args.config, **values)
    out = Path(values.get("out_dir", TrainConfig.out_dir))
    saved = out / "config.json"
    if args.resume and saved.is_file():  # the run's own settings: resuming with others is refused
        # the time and step budgets were the earlier session's (``max_minutes``: "of this run"): a resume
        # without --max-minutes stopped again after the old budget, unasked
        return dataclasses.replace(load_recipe(saved, **values), max_minutes=values.get("max_minutes"), stop_after=None)
    if args.resume:  # a mistyped --out trained the default model from step 0, for hours, with only a warning
        from ..errors import InputError

        raise InputError(f"--resume: {out} holds no run (no config.json); check the --out folder, or give "
                         "--config to start a run there")
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from ..training import export_weights, train
    from .progressbar import progress_bar

    config = build_config(args)
    check_outputs(config, args)
    with progress_bar(disable=args.quiet) as bar:
        result = train(config, resume=args.resume, progress=bar)
    if not result.is_main:  # torchrun: rank 0 reports and exports; a second export of the same file failed the job
        return 0
    budget = f" after its --max-minutes {config.max_minutes:g}" if config.max_minutes is not None else ""
    state = "finished" if result.finished else f"stopped{budget} (continue with --resume --out {result.out_dir})"
    print(f"{config.model}: {state} at step {result.step}/{config.steps}; run folder {result.out_dir}")
    if result.history["val"]:
        print(f"last validation (step {result.history['val_step'][-1]}): {result.history['val'][-1]}")
    if args.export and not result.finished:
        # an export of a stopped run put half-trained weights on the --export path (the recipes': the shipped
        # file), and the resume with the same command was then refused because that file existed
        print(f"not exported: the run has not finished; resume it with --export {args.export} to export it when it does")
    elif args.export and result.best_path is not None:
        info = export_weights(result.best_path, Path(args.export), overwrite=args.overwrite,
                              metadata={"recipe": str(args.config or "")},
                              mix_with=config.init_weights, mix=config.export_mix)
        print(f"exported {info.path} ({info.path.stat().st_size / 1e6:.1f} MB, fp16)")
    return 0


def check_outputs(config, args: argparse.Namespace) -> None:
    """Refuse, before the (long) run, an --out that is a file, an earlier run (it would start over
    and replace its last.pt, or its best.safetensors alone) without --resume or --overwrite, and an
    --export that exists or that a run without validation could not write (it exported nothing, without a word)."""
    from ..errors import InputError, OutputExistsError
    from ..export import refuse_file_as_folder

    out = Path(config.out_dir)
    refuse_file_as_folder(out)
    if not args.resume and not args.overwrite and (out / "last.pt").exists():
        raise OutputExistsError(f"{out}: holds an earlier training run (last.pt); continue it with --resume, "
                                "start it again with --overwrite, or choose another --out folder")
    if not args.overwrite and not (out / "last.pt").exists() and (out / "best.safetensors").exists():
        # a finished run whose last.pt was deleted to save space: its first validation would replace the weights
        raise OutputExistsError(f"{out}: holds an earlier run's best.safetensors (and no last.pt to resume); "
                                "choose another --out folder, or pass --overwrite to replace it")
    mine = [name for name in ("config.json", "curves.png") if (out / name).exists()]
    if not args.resume and not args.overwrite and not (out / "last.pt").exists() and mine:
        # a folder of the user's own (notes, a plot): the run replaced these files without a word
        raise OutputExistsError(f"{out}: holds {' and '.join(mine)}, which a run writes (an earlier run that saved no "
                                "checkpoint, or files of yours); continue it with --resume, replace them with "
                                "--overwrite, or choose another --out folder")
    export = Path(args.export) if args.export else None
    if export is not None and export.is_dir():
        raise InputError(f"--export {export}: is a folder; give the file to write, e.g. {export / 'model.safetensors'}")
    if export is not None and export.exists() and not args.overwrite:
        raise OutputExistsError(f"--export {export}: exists already; choose another file or pass --overwrite")
    if export is not None and not config.val_sources:  # the export is the best validated checkpoint: there would be none
        raise InputError(f"--export {export}: needs validation data (--val, or val_sources in the recipe); "
                         "the exported weights are the run's best on it")
