"""``textsegment bench``: SemantiBench for a model on held-out phantoms and/or labelled CT.

Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``; with ``--compare-model`` the
second model runs on the same cases and a paired Wilcoxon test per level joins the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .segment import add_model_arguments

REAL_HELD_OUT = (
    "totalseg:{data}/dicom/totalseg_example_ct_dicom/series,{data}/dicom/totalseg_example_ct_dicom/example_seg_dicom.nii.gz,"
    "{data}/ct/totalsegmentator_class_maps.json"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="SemantiBench: Dice per prompt level, PSS, negative controls, Wilcoxon")
    add_model_arguments(p)
    p.add_argument("--phantoms", type=int, default=0, help="number of held-out phantoms")
    p.add_argument("--seed", type=int, default=2000, help="first phantom seed (keep it apart from training seeds)")
    p.add_argument("--phantom-shape", default="32x128x128", help="phantom grid z x y x x")
    p.add_argument("--real", action="store_true", help="also the real contrast CT held out from training "
                   "(TotalSegmentator's DICOM example with its silver labels)")
    p.add_argument("--data", action="append", default=[], help="more labelled cases: totalseg:CT,SEG,CLASSMAP, msd:FOLDER, "
                   "dicomseg:SERIES,SEG")
    p.add_argument("--shared-data", default="../shared/data", help="where the shared real data lies")
    p.add_argument("--compare-model", help="a second model to run on the same cases (paired Wilcoxon)")
    p.add_argument("--compare-weights", help="weights for --compare-model")
    p.add_argument("--cleanup", action="store_true", help="score masks after segment's --cleanup "
                   "(largest 3D component, holes filled)")
    p.add_argument("--min-component-ml", type=float, default=0.0,
                   help="score masks after dropping 3D islands under this volume (segment's option)")
    p.add_argument("--out", "-o", required=True, help="output folder (earlier results there are never replaced "
                   "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the bench files of an earlier run in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..semantibench import compare, run_bench, write_report
    from ..training.data import load_source, parse_grid
    from ..weights import weights_label
    from .progressbar import progress_bar

    if args.compare_weights and not args.compare_model:
        raise InputError("--compare-weights needs --compare-model: the model those weights are for")
    _check_amounts(args)
    specs = list(args.data)
    names = []
    if args.phantoms > 0:
        try:
            shape = "x".join(map(str, parse_grid(args.phantom_shape.lower())))
        except InputError:
            raise InputError(f"--phantom-shape must be three positive whole numbers Z x Y x X, e.g. 32x128x128; "
                             f"got {args.phantom_shape!r}") from None
        specs.insert(0, f"phantoms:{args.seed}-{args.seed + args.phantoms - 1}@{shape}")
        names.append(f"{args.phantoms} phantoms (seeds {args.seed}–{args.seed + args.phantoms - 1})")
    if args.real:
        specs.append(REAL_HELD_OUT.format(data=Path(args.shared_data)))
        names.append("real CT (TotalSegmentator DICOM example, silver labels)")
    names += args.data
    if not specs:
        raise InputError("nothing to benchmark: give --phantoms N, --real or --data SOURCE")
    out = Path(args.out)
    _check_free(out, compare=bool(args.compare_model), overwrite=args.overwrite)  # before the (long) run
    models = _load_models(args)  # both before any run: a typo in the second must not cost the first one's run
    cases = []
    unread: list[dict[str, str]] = []  # cases that could not be read: reported as failed, the others still run
    for spec in specs:
        real = args.real and spec == REAL_HELD_OUT.format(data=Path(args.shared_data))
        missing = [p for p in spec.partition(":")[2].split(",") if real and not Path(p).exists()]
        if missing:  # the loaders name the file, but not the option that points at it
            raise InputError(f"--real: {missing[0]} not found; point --shared-data at the shared data folder "
                             f"(now {args.shared_data!r}, relative to the current folder)")
        try:
            cases += load_source(spec, failed=unread)
        except FileNotFoundError as exc:  # a missing data file is a usage error, not a traceback
            unread.append({"case": spec, "source": exc.filename or "",
                           "error": f"--data {spec}: {exc.filename or 'a file'}: no such file"})
        except (InputError, OSError) as exc:
            unread.append({"case": spec, "source": "", "error": f"{type(exc).__name__}: {exc}"})
    if not cases:  # one error line, not warnings before it
        more = f" (and {len(unread) - 1} other source(s))" if len(unread) > 1 else ""
        raise InputError(f"no case could be read: {unread[0]['error']}{more}" if unread else "no cases to benchmark")
    for f in unread:  # now, not only after the (long) run
        print(f"warning: case {f['case']} could not be read and is left out: {f['error']}", file=sys.stderr)
    dataset = "; ".join(names)

    cleanup = {"largest_component": args.cleanup, "fill_holes": args.cleanup, "min_component_ml": args.min_component_ml}
    flags = (" --cleanup" if args.cleanup else "") + (
        f" --min-component-ml {args.min_component_ml:g}" if args.min_component_ml else "")
    notes = [f"masks cleaned up as by `segment{flags}`"] if flags else []
    reports = []
    for model_name, weights, model in models:
        label = weights_label(model, weights)
        with progress_bar(disable=args.quiet) as bar:
            reports.append(run_bench(model, cases, model_name=model_name, weights=label, dataset=dataset,
                                     progress=bar, batch_size=args.batch_size, device=args.device, **cleanup))
        reports[-1].notes += notes
        reports[-1].failed[:0] = [dict(f) for f in unread]
    comparison = compare(reports[0], reports[1]) if len(reports) == 2 else None
    paths = write_report(reports[0], out, comparison=comparison, overwrite=args.overwrite)
    written = [paths["json"], paths["markdown"], paths["plot"]]
    if len(reports) == 2:
        written += write_report(reports[1], out / "compare", comparison=comparison, overwrite=args.overwrite).values()
    elif args.overwrite and (out / "compare").is_dir():  # else an earlier run's second model reads as this run's
        for name in REPORT_FILES:
            (out / "compare" / name).unlink(missing_ok=True)
    for report in reports:
        _print_summary(report, dataset)
    if comparison is not None:
        print(f"Wilcoxon, a = {reports[0].model} ({reports[0].weights}) − b = {reports[1].model} "
              f"({reports[1].weights}): " + "; ".join(_wilcoxon_text(comparison, lv) for lv in ("L1", "L2", "L3")))
    print(f"wrote {', '.join(map(str, written))}")
    failed = [(report.model, f) for report in reports for f in report.failed]
    for model_name, f in failed:
        print(f"{model_name}: case {f['case']} failed ({f['source'] or 'no file'}): {f['error']}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} failed case run(s) are left out of the scores (listed in bench.md); "
              "the other cases were scored", file=sys.stderr)
    return 1 if failed else 0


def _print_summary(report, dataset: str) -> None:
    """One model's headline numbers, so a comparison run shows both models, not only the first."""
    summary = report.summary()
    levels = summary["levels"]
    print(f"{report.model} ({report.weights}) on {dataset}: " + ", ".join(
        f"{lv} Dice {levels[lv]['prompts']['mean']:.3f}" if levels[lv]["prompts"]["mean"] is not None else f"{lv} n/a"
        for lv in levels))
    pss, matched = summary["pss"], summary["pss_matched"]
    fp, ff = summary["false_positive_rate"], summary["false_finding_rate"]
    print(f"PSS {'n/a' if pss is None else f'{pss:.3f}'} (matched: {'n/a' if matched is None else f'{matched:.3f}'} "
          f"over {summary['pss_matched_prompts']} L3 prompts); on negatives: false-positive rate "
          f"{'n/a' if fp is None else f'{fp:.3f}'} (any voxel), {'n/a' if ff is None else f'{ff:.3f}'} (a region ≥ 1 mL)")


def _wilcoxon_text(comparison: dict, level: str) -> str:
    """A level's test on pairs and on per-case means: the pairs' p alone overstates a few cases."""
    pairs, cases = comparison.get(level), comparison.get("per_case", {}).get(level)
    if pairs is None:
        return f"{level} no pairs"
    return (f"{level} {pairs['mean_difference']:+.3f}, p {pairs['p_value']:.3g} ({pairs['n']} pairs), "
            f"p {cases['p_value']:.3g} ({cases['n']} cases)")


def _check_amounts(args: argparse.Namespace) -> None:
    """A negative count or volume is a typo: refuse it before any phantom is made or model loaded."""
    from ..errors import InputError

    if args.phantoms < 0:
        raise InputError(f"--phantoms must be 0 or more (a number of phantoms), got {args.phantoms}")
    if not args.min_component_ml >= 0:
        raise InputError(f"--min-component-ml must be 0 or more (mL), got {args.min_component_ml:g}")


def _load_models(args: argparse.Namespace) -> list:
    """(name, weights option, model) for the model and the --compare-model, when given."""
    from ..weights import load_model

    pairs = [(args.model, args.weights), (args.compare_model, args.compare_weights)]
    return [(name, weights, load_model(name, weights=weights, device=args.device)) for name, weights in pairs if name]


REPORT_FILES = ("bench.json", "bench.md", "bench.png")


def _check_free(out: Path, *, compare: bool, overwrite: bool) -> None:
    """Refuse an --out that is a file, or that holds an earlier bench's files (unless --overwrite)."""
    from ..errors import OutputExistsError

    from ..export import refuse_file_as_folder

    folders = [out, out / "compare"] if compare else [out]
    for folder in folders:
        refuse_file_as_folder(folder)
    if overwrite:
        return
    taken = [folder / name for folder in folders for name in REPORT_FILES if (folder / name).exists()]
    if taken:
        raise OutputExistsError(
            f"{out}: holds bench results already ({', '.join(str(p.relative_to(out)) for p in taken)}); "
            "choose another --out folder or pass --overwrite"
        )
