"""The saliency sink of an earlier git revision against the working tree's, in one process.

    .venv/bin/python bench/saliency_ab.py --before af50f48 --stage 3 --json out/saliency_ab.json

Loads ``TextSegmentLib/saliency/{maths,layer_maps,sink}.py`` as they were at ``--before`` beside
today's, then segments the real CT in ``../shared/data`` (its four prompts, the model's default
layers, compact grid) with each sink in turn, alternating which goes first, ``--runs`` times. A
change to the sink of a few per cent is below what two separate bench runs can tell apart on a
busy machine; alternating in one process puts both under the same load. Prints the sink's time
and its share of the rest of the run (the overhead ``bench/saliency.py`` reports), min and median.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import check_outputs, positive_int, run_info, user_errors, write_json  # noqa: E402

SINK_MODULES = ("maths", "layer_maps", "sink")  # in import order: sink uses the other two


def sink_at(revision: str) -> ModuleType:
    """The saliency sink module as it was at ``revision``, its own maths and layer maps included."""
    loaded = {}
    for name in SINK_MODULES:
        source = subprocess.run(
            ["git", "show", f"{revision}:TextSegmentLib/saliency/{name}.py"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout
        spec = importlib.util.spec_from_loader(f"TextSegmentLib.saliency.{name}_at_{revision}", loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "TextSegmentLib.saliency"  # its relative imports resolve to today's package
        sys.modules[spec.name] = module  # before it runs: dataclasses look their module up
        exec(compile(source, f"{revision}:saliency/{name}.py", "exec"), module.__dict__)
        loaded[name] = module
    # their relative imports bound today's functions: point each at the same revision's instead
    for name, module in loaded.items():
        for other in SINK_MODULES:
            today = importlib.import_module(f"TextSegmentLib.saliency.{other}")
            for attr, value in list(vars(module).items()):
                if other != name and getattr(today, attr, None) is value and hasattr(loaded[other], attr):
                    setattr(module, attr, getattr(loaded[other], attr))
    return loaded["sink"]


def compare(sinks: dict, *, model, volume, prompts, stage: int, runs: int) -> dict:
    """{label: {"sink_ms": [...], "share": [...]}}, the sinks taking turns to go first."""
    from TextSegmentLib.engine import segment
    from TextSegmentLib.saliency import SaliencyConfig

    segment(volume, prompts, model=model, device="cpu")  # warm-up
    times = {label: {"sink_ms": [], "share": []} for label in sinks}
    order = list(sinks)
    for run in range(runs):
        for label in order if run % 2 == 0 else order[::-1]:
            sink = sinks[label].build_saliency_sink(model=model, config=SaliencyConfig(stage=stage, grid="compact"))
            started = time.perf_counter()
            result = segment(volume, prompts, model=model, device="cpu", features_sink=sink)
            total = time.perf_counter() - started
            spent = result.features.seconds
            times[label]["sink_ms"].append(1000 * spent)
            times[label]["share"].append(spent / max(total - spent, 1e-9))
    return times


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="git revision whose sink to compare with the working tree's")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="saliency stage (default: %(default)s)")
    parser.add_argument("--model", default="freqmedclip-tiny", help="model preset (default: %(default)s)")
    parser.add_argument("--weights", default=None, help="weights id or checkpoint (default: the model's shipped default)")
    parser.add_argument("--runs", type=positive_int, default=12, help="whole-volume runs per sink (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data"),
        help="folder holding ct/totalseg_example_ct_sm (default: ../shared/data beside the repository)",
    )
    parser.add_argument("--json", help="write the timings here (default: none written)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.before}^{{commit}}"], cwd=REPO,
                           capture_output=True, text=True)
    if known.returncode != 0:
        parser.error(f"--before {args.before!r}: no such git revision in {REPO}")
    args.before_commit = known.stdout.strip()  # recorded: a branch name or HEAD~1 moves on
    check_outputs(parser, json_path=args.json)
    with user_errors():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv) -> int:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from saliency import real_cases

    import TextSegmentLib.saliency.sink as today
    from TextSegmentLib.weights import load_model

    torch.set_num_threads(args.threads)
    case = real_cases(Path(args.data))[0]
    model = load_model(args.model, weights=args.weights, device="cpu")
    sinks = {args.before: sink_at(args.before), "working tree": today}
    times = compare(sinks, model=model, volume=case.volume, prompts=list(case.targets), stage=args.stage, runs=args.runs)
    print(f"{case.name}, {args.model}, stage {args.stage}, {args.runs} runs each, {args.threads} thread(s)")
    print("| sink | min ms | median ms | min share | median share |\n|---|---|---|---|---|")
    for label, t in times.items():
        print(f"| {label} | {min(t['sink_ms']):.1f} | {statistics.median(t['sink_ms']):.1f} | "
              f"{100 * min(t['share']):.1f} % | {100 * statistics.median(t['share']):.1f} % |")
    if args.json:
        write_json(args.json, {**run_info("bench/saliency_ab.py", argv), "settings": dict(vars(args)),
                               "threads": torch.get_num_threads(), "case": case.name, "model": args.model,
                               "weights": model.weights_source.label,
                               "stage": args.stage, "times": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
