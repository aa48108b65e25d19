"""SemantiBench: Dice per prompt level, the Prompt Sensitivity Score, negative controls, Wilcoxon.

What is measured is what users get: every case goes through ``engine.segment`` on the whole
volume, with each case's prompt pyramid (L1 atomic, L2 descriptive, L3 exclusionary/compositional,
and negative controls whose ground truth is empty).

The edge cases of the maths, defined once here and tested:

* ``dice(∅, ∅) = 1`` (nothing to find, nothing found); ``dice`` with exactly one side empty is 0.
* Per-slice Dice is taken over the slices where the ground truth is non-empty (slices without the
  target would all score 1 or 0 and swamp the mean); false positives are what negatives measure.
* A negative control is a false positive when its predicted mask has any voxel; the rate is over
  all negative prompts.
  A *false finding* is a negative control whose largest predicted 3D region is ``FINDING_ML`` or
  more: what a reader would actually see, rather than a few stray voxels.
* ``PSS = 1 − mean Dice(L3) / mean Dice(L1)``; undefined (None) when there is no L1 or no L3 score or
  mean Dice(L1) = 0; negative when L3 beats L1. The per-case median PSS uses the cases where it is defined.
* *Matched* PSS (ours, beside the paper's): ``1 − Σ Dice(L3) / Σ L1(L3)`` over the L3 prompts whose
  included targets have L1 prompts in the same case, ``L1(L3)`` being those targets' L1 Dice weighted
  by their true volumes (a union's Dice weighs its parts so). Why: the plain PSS compares whatever
  targets sit at each level; on real data L1 holds ribs and vertebrae and L3 a few large organs, so
  it measured target difficulty (−2.10 on the real CT), not prompts.
* Wilcoxon signed-rank, paired on (case, prompt) and on per-case means (a case is matched by its source
  file): None with no pairs; p = 1 when all differences are 0; otherwise scipy's default, which leaves
  zero differences out of the ranking (``n`` counts all pairs).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .errors import Cancelled, InputError
from .prompts import LEVELS, build_prompt_pyramid, ground_truth

log = logging.getLogger(__name__)

SCORED_LEVELS = ("L1", "L2", "L3")
FINDING_ML = 1.0  # a region this large on a negative control is a false finding, not a speck
LEVEL_TABLE_LEGEND = (
    "*prompts*, *mean / median Dice*: over every (case, prompt) pair of the level; *case mean*: the mean of "
    "each case's mean Dice, so every case weighs the same; *slices*, *slice mean / median*: over the axial "
    "slices whose ground truth is non-empty, pooled over all prompts and cases, so long targets weigh more. "
    "Dice is 1 when truth and mask are both empty, 0 when exactly one is."
)


# --------------------------------------------------------------------------------------- maths


def _mask_array(mask: Any) -> np.ndarray:
    """A mask as a boolean array; a ``Volume`` (``run[0].mask``, ``phantom.labels``) gives its voxels.

    ``np.asarray`` of a ``Volume`` is a 0-d object array, which Dice would score as 1 against any other.
    """
    return np.asarray(getattr(mask, "array", mask), dtype=bool)


def dice(prediction: Any, truth: Any) -> float:
    """Dice of two boolean masks (arrays or ``Volume`` s); 1 when both are empty, 0 when exactly one is.

    Two ``Volume`` s must lie on one grid: voxel by voxel, a mask read in another orientation or
    spacing would score a number that means nothing.
    """
    pred, gt = _mask_array(prediction), _mask_array(truth)
    if pred.shape != gt.shape:
        raise InputError(f"dice needs masks of one shape, got {pred.shape} and {gt.shape}")
    if hasattr(prediction, "same_geometry") and hasattr(truth, "same_geometry") and not prediction.same_geometry(truth):
        raise InputError("dice needs masks on one grid: the two volumes differ in spacing, origin or direction "
                         f"({_grid(prediction)} and {_grid(truth)}); resample one onto the other first")
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _grid(volume: Any) -> str:
    spacing = ", ".join(f"{v:g}" for v in volume.spacing)
    origin = ", ".join(f"{v:g}" for v in volume.origin)
    return f"spacing ({spacing}), origin ({origin}), direction {np.round(volume.direction, 3).tolist()}"


def slice_dices(prediction: Any, truth: Any) -> list[float]:
    """Dice of each slice (axis 0) whose ground truth is non-empty."""
    pred, gt = _mask_array(prediction), _mask_array(truth)
    return [dice(p, g) for p, g in zip(pred, gt) if g.any()]


def pss(mean_l1: Optional[float], mean_l3: Optional[float]) -> Optional[float]:
    """``1 − L3 / L1``; None when either is missing or L1 is 0 (no baseline to be sensitive against)."""
    if mean_l1 is None or mean_l3 is None or not math.isfinite(mean_l1) or mean_l1 <= 0:
        return None
    return 1.0 - float(mean_l3) / float(mean_l1)


def included_targets(target: str) -> list[str]:
    """The names a target's text (``str(Target)``: ``"a ∪ b − c"``) includes."""
    return [name for name in target.split(" − ")[0].split(" ∪ ") if name and name != "∅"]


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> Optional[dict[str, float]]:
    """Paired two-sided Wilcoxon signed-rank test of ``a`` against ``b``."""
    from scipy import stats

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"wilcoxon needs paired samples, got {x.size} and {y.size} values")
    if x.size == 0:
        return None
    diff = x - y
    if np.all(diff == 0):
        return {"n": int(x.size), "statistic": 0.0, "p_value": 1.0, "mean_difference": 0.0}
    result = stats.wilcoxon(x, y)
    return {"n": int(x.size), "statistic": float(result.statistic), "p_value": float(result.pvalue),
            "mean_difference": float(diff.mean())}


def _summary(values: Sequence[float]) -> dict[str, Any]:
    if not len(values):
        return {"n": 0, "mean": None, "median": None}
    return {"n": len(values), "mean": float(np.mean(values)), "median": float(np.median(values))}


# --------------------------------------------------------------------------------------- records


@dataclass
class PromptResult:
    """One prompt on one case."""

    case: str
    prompt: str
    level: str
    target: str
    truth_voxels: int
    predicted_voxels: int
    dice: Optional[float]  # None for negatives
    slice_dice: list[float] = field(default_factory=list)
    largest_component_ml: float = 0.0  # of the prediction: a speck, or a finding a reader would see?

    @property
    def false_positive(self) -> bool:
        return self.level == "negative" and self.predicted_voxels > 0

    @property
    def false_finding(self) -> bool:
        """A negative control with a predicted region of at least ``FINDING_ML``."""
        return self.level == "negative" and self.largest_component_ml >= FINDING_ML


@dataclass
class BenchReport:
    model: str
    weights: str
    dataset: str
    results: list[PromptResult]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # case name → the file or folder it was read from
    failed: list[dict[str, str]] = field(default_factory=list)  # cases that raised: case, source, error; not scored

    # ---- aggregates

    def scores(self, level: str) -> list[float]:
        return [r.dice for r in self.results if r.level == level and r.dice is not None]

    def level_table(self) -> dict[str, dict[str, Any]]:
        """Per level: Dice over (case, prompt) pairs, over per-case means, and over slices."""
        table = {}
        for level in SCORED_LEVELS:
            rows = [r for r in self.results if r.level == level and r.dice is not None]
            per_case = [float(np.mean([r.dice for r in rows if r.case == c])) for c in self.cases if any(r.case == c for r in rows)]
            table[level] = {
                "prompts": _summary([r.dice for r in rows]),
                "cases": _summary(per_case),
                "slices": _summary([d for r in rows for d in r.slice_dice]),
            }
        return table

    @property
    def cases(self) -> list[str]:
        return list(dict.fromkeys(r.case for r in self.results))

    def pss(self) -> Optional[float]:
        table = self.level_table()
        return pss(table["L1"]["prompts"]["mean"], table["L3"]["prompts"]["mean"])

    def pss_matched(self) -> tuple[Optional[float], int]:
        """The matched PSS (module docstring) and how many L3 prompts it is taken over."""
        l3_sum = l1_sum = 0.0
        n = 0
        for case in self.cases:
            l1: dict[str, list[PromptResult]] = {}
            for r in self.results:
                if r.case == case and r.level == "L1":
                    l1.setdefault(r.target, []).append(r)
            for r in self.results:
                if r.case != case or r.level != "L3":
                    continue
                parts = [l1[name] for name in included_targets(r.target) if name in l1]
                volume = sum(rs[0].truth_voxels for rs in parts)
                if volume > 0:
                    built_on = sum(rs[0].truth_voxels * float(np.mean([x.dice for x in rs])) for rs in parts) / volume
                    l3_sum, l1_sum, n = l3_sum + r.dice, l1_sum + built_on, n + 1
        return (pss(l1_sum / n, l3_sum / n) if n else None), n

    def pss_per_case(self) -> dict[str, Optional[float]]:
        out = {}
        for case in self.cases:
            l1 = [r.dice for r in self.results if r.case == case and r.level == "L1"]
            l3 = [r.dice for r in self.results if r.case == case and r.level == "L3"]
            out[case] = pss(float(np.mean(l1)) if l1 else None, float(np.mean(l3)) if l3 else None)
        return out

    def false_positive_rate(self) -> Optional[float]:
        return self._negative_rate("false_positive")

    def false_finding_rate(self) -> Optional[float]:
        return self._negative_rate("false_finding")

    def _negative_rate(self, flag: str) -> Optional[float]:
        negatives = [r for r in self.results if r.level == "negative"]
        return sum(getattr(r, flag) for r in negatives) / len(negatives) if negatives else None

    def target_table(self) -> list[dict[str, Any]]:
        """Per (target, level): how many prompts, mean Dice (or FP rate for negatives)."""
        groups: dict[tuple[str, str], list[PromptResult]] = {}
        for r in self.results:
            groups.setdefault((r.target, r.level), []).append(r)
        rows = []
        for (target, level), rs in sorted(groups.items(), key=lambda kv: (LEVELS.index(kv[0][1]), kv[0][0])):
            row = {"target": target, "level": level, "n": len(rs)}
            if level == "negative":
                row["false_positive_rate"] = sum(r.false_positive for r in rs) / len(rs)
            else:
                row["mean_dice"] = float(np.mean([r.dice for r in rs]))
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        per_case = [v for v in self.pss_per_case().values() if v is not None]
        matched, matched_n = self.pss_matched()
        return {
            "model": self.model,
            "weights": self.weights,
            "dataset": self.dataset,
            "cases": len(self.cases),
            "failed_cases": len(self.failed),
            "levels": self.level_table(),
            "pss": self.pss(),
            "pss_case_median": float(np.median(per_case)) if per_case else None,
            "pss_matched": matched,
            "pss_matched_prompts": matched_n,
            "false_positive_rate": self.false_positive_rate(),
            "false_finding_rate": self.false_finding_rate(),
            "seconds": self.seconds,
            "notes": self.notes,
        }

    # ---- outputs

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BenchReport":
        """A report back from its ``bench.json``: every number is recomputed from the stored results,
        so a measure added later (the matched PSS) applies to earlier runs without rerunning them."""
        summary = data["summary"]
        return cls(model=summary["model"], weights=summary["weights"], dataset=summary["dataset"],
                   results=[PromptResult(**r) for r in data["results"]], seconds=summary.get("seconds", 0.0),
                   notes=list(summary.get("notes", [])), failed=list(data.get("failed", [])),
                   sources={c["case"]: c["source"] for c in data.get("cases", []) if c.get("source")})

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "cases": [{"case": c, "source": self.sources.get(c)} for c in self.cases],
                "failed": self.failed, "targets": self.target_table(), "results": [asdict(r) for r in self.results]}

    def to_markdown(self) -> str:
        s = self.summary()
        lines = [f"# SemantiBench: {self.model} on {self.dataset}", "",
                 f"weights: `{self.weights}`; {s['cases']} case(s); {self.seconds:.0f} s", ""]
        if self.failed:  # a reader must not take these numbers for the whole data set
            lines += [f"**{len(self.failed)} case(s) failed and are not in any number below:**", ""] + [
                f"- {_cell(f['case'])}" + (f" (`{f['source']}`)" if f.get("source") else "") + f": {_cell(f['error'])}"
                for f in self.failed] + [""]
        lines += ["| level | prompts | mean Dice | median Dice | case mean | slices | slice mean | slice median |",
                  "|---|---|---|---|---|---|---|---|"]
        for level, t in s["levels"].items():
            lines.append(f"| {level} | {t['prompts']['n']} | {_f(t['prompts']['mean'])} | {_f(t['prompts']['median'])} | "
                         f"{_f(t['cases']['mean'])} | {t['slices']['n']} | {_f(t['slices']['mean'])} | "
                         f"{_f(t['slices']['median'])} |")
        negatives = [r for r in self.results if r.level == "negative"]
        lines += ["", LEVEL_TABLE_LEGEND, "",
                  f"**PSS** = 1 − mean Dice(L3) / mean Dice(L1) = {_f(s['pss'])} "
                  f"(per-case median {_f(s['pss_case_median'])}); below 0 when L3 prompts score higher than L1 ones, "
                  "which can come from easier L3 targets as well as from the prompts.",
                  f"**Matched PSS** = 1 − Σ Dice(L3) / Σ Dice(L1 of the targets each L3 prompt includes, weighted by "
                  f"their volumes) = "
                  f"{_f(s['pss_matched'])} over {s['pss_matched_prompts']} L3 prompt(s) whose targets have L1 prompts "
                  "in the same case: the same anatomy asked for in plain and in exclusionary words.",
                  f"**False-positive rate on negative controls** (prompts for structures absent from the case, and "
                  f"nonsense): {_f(s['false_positive_rate'])} (any voxel: {sum(r.false_positive for r in negatives)} "
                  f"of {len(negatives)}); {_f(s['false_finding_rate'])} (a region of {FINDING_ML:g} mL or more: "
                  f"{sum(r.false_finding for r in negatives)} of {len(negatives)})", "",
                  "| target | level | n | mean Dice | FP rate |", "|---|---|---|---|---|"]
        for row in self.target_table():
            lines.append(f"| {_cell(row['target'])} | {row['level']} | {row['n']} | "
                         f"{_f(row['mean_dice']) if 'mean_dice' in row else '–'} | "
                         f"{_f(row['false_positive_rate']) if 'false_positive_rate' in row else '–'} |")
        lines += [""] + [f"- {n}" for n in self.notes]
        read_from = [f"{_cell(c)}: `{self.sources[c]}`" for c in self.cases if self.sources.get(c) not in (None, "", c)]
        if read_from:  # "ct.nii.gz #2" alone does not say which patient's CT it was
            lines += ["", "Cases read from: " + "; ".join(read_from)]
        return "\n".join(lines).rstrip() + "\n"

    def plot(self, path: Path) -> None:
        """Dice distributions per level (box) and the negatives' false-positive rate (bar)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 1]})
        data = [self.scores(level) or [np.nan] for level in SCORED_LEVELS]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, 4), SCORED_LEVELS)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice per (case, prompt)")
        ax.set_title(f"{self.model}: PSS {_f(self.pss())}")
        fp_rate = self.false_positive_rate()
        if fp_rate is None:  # no negative controls: no rate to draw, rather than a bar at 0
            ax2.text(0.5, 0.5, "no negatives", ha="center", va="center", transform=ax2.transAxes)
            ax2.set_xticks([])
        else:
            ax2.bar(["negatives"], [fp_rate], color="tab:red")
        ax2.set_ylim(0, 1)
        ax2.set_title(f"false-positive rate{'' if fp_rate is not None else ': n/a'}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _f(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: Any) -> str:
    """Text for a markdown table cell: a pipe or a line break would split the row."""
    return str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("|", "\\|")


def compare(a: BenchReport, b: BenchReport) -> dict[str, Any]:
    """Paired Wilcoxon per level on the (case, prompt) pairs both reports scored, and on per-case means.

    A case is matched by the file it was read from where the reports know it, not by its name
    alone: "ct.nii.gz #1" is whichever file came first in that run's list. Prompts of one case
    are not independent samples, so the per-case test (n = cases) is the one to trust for a claim.
    """
    out: dict[str, Any] = {"a": a.model, "b": b.model, "a_weights": a.weights, "b_weights": b.weights}
    keys_a, keys_b = _case_keys(a), _case_keys(b)
    dropped, per_case = {}, {}
    for level in SCORED_LEVELS:
        da = {(keys_a[r.case], r.prompt): r.dice for r in a.results if r.level == level and r.dice is not None}
        db = {(keys_b[r.case], r.prompt): r.dice for r in b.results if r.level == level and r.dice is not None}
        keys = sorted(set(da) & set(db), key=repr)
        out[level] = wilcoxon([da[k] for k in keys], [db[k] for k in keys])
        dropped[level] = {"only_a": len(da) - len(keys), "only_b": len(db) - len(keys)}
        cases = list(dict.fromkeys(case for case, _ in keys))
        per_case[level] = wilcoxon([float(np.mean([da[k] for k in keys if k[0] == c])) for c in cases],
                                   [float(np.mean([db[k] for k in keys if k[0] == c])) for c in cases])
    out["per_case"] = per_case  # each case's mean Dice over its paired prompts: n = cases
    out["dropped"] = dropped  # (case, prompt) pairs scored by one report only: left out of the test
    return out


def _case_keys(report: BenchReport) -> dict[str, tuple]:
    """Case name → what identifies the case across runs: its source file, with the name where cases share one."""
    from collections import Counter

    sources = {case: report.sources.get(case) for case in report.cases}
    shared = Counter(sources.values())
    return {case: (source, "" if source and shared[source] == 1 else case) for case, source in sources.items()}


# --------------------------------------------------------------------------------------- running


def case_prompts(
    case: Any, *, seed: int = 0, max_l2_per_target: int = 1, prompts: Optional[Sequence[Any]] = None
) -> list[Any]:
    """The prompts a bench scores on a case: its pyramid (or ``prompts``), one per distinct text."""
    if prompts is None:
        prompts = build_prompt_pyramid(case.labels, case.label_names, seed=seed, max_l2_per_target=max_l2_per_target,
                                       min_voxels=20)
    from .engine import prompt_key

    return list({prompt_key(p.text): p for p in prompts}.values())


def evaluate_case(
    model: Any, case: Any, *, prompts: Optional[Sequence[Any]] = None, seed: int = 0, batch_size: Any = "auto",
    device: str = "auto", max_l2_per_target: int = 1, largest_component: bool = False, fill_holes: bool = False,
    min_component_ml: float = 0.0,
) -> list[PromptResult]:
    """Segment every prompt of a case's pyramid with ``engine.segment`` and score it on the volume grid.

    The clean-up options are ``segment``'s own, so a report scores exactly what a user with those
    settings gets.
    """
    from .engine import segment
    from .postprocess import largest_component_voxels
    from .preprocess import slice_plan

    prompts = case_prompts(case, seed=seed, max_l2_per_target=max_l2_per_target, prompts=prompts)
    run = segment(case.ct, [p.text for p in prompts], model=model, batch_size=batch_size, device=device,
                  largest_component=largest_component, fill_holes=fill_holes, min_component_ml=min_component_ml)
    plan = slice_plan(case.ct, axis="axial")
    voxel_ml = float(np.prod(case.ct.spacing)) / 1000.0
    results = []
    for prompt, result in zip(prompts, run.results):
        truth = ground_truth(prompt, case.labels, case.label_names)
        pred = result.mask.array.astype(bool)
        scored = prompt.level != "negative"
        results.append(PromptResult(
            case=case.name, prompt=prompt.text, level=prompt.level, target=str(prompt.target),
            truth_voxels=int(truth.sum()), predicted_voxels=int(pred.sum()),
            largest_component_ml=largest_component_voxels(pred) * voxel_ml,
            dice=dice(pred, truth) if scored else None,
            slice_dice=slice_dices(plan.extract(pred), plan.extract(truth)) if scored else [],
        ))
    return results


def run_bench(
    model: Any, cases: Iterable[Any], *, model_name: Optional[str] = None, weights: Optional[str] = None,
    dataset: Optional[str] = None, seed: int = 0, progress: Any = None, **options: Any,
) -> BenchReport:
    """Score ``model`` on ``cases`` (``training.LabelledCase`` s or ``phantom.Phantom`` s): the report ``bench`` writes.

    Case ``i`` gets the prompt pyramid of seed ``seed + i``; ``options`` go to ``evaluate_case``
    (device, batch_size, clean-up). ``model_name``, ``weights`` and ``dataset`` default to the
    model's preset, the weights it carries and the cases' names. A case that raises is listed in
    the report's ``failed`` and the others still run (a long batch is not lost to one bad case);
    when every case fails, the first error is raised.
    """
    import time

    from .engine import model_label
    from .weights import weights_label

    cases = list(cases)
    names = _distinct_names([case.name for case in cases])
    model_name = model_name or model_label(model)
    weights = weights or weights_label(model)
    dataset = dataset or ", ".join(names)
    started = time.perf_counter()
    results: list[PromptResult] = []
    failed: list[dict[str, str]] = []
    first_error: Optional[Exception] = None
    for i, (case, name) in enumerate(zip(cases, names)):
        try:
            scored = evaluate_case(model, case, seed=seed + i, **options)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad case must not cost the other cases' scores
            log.warning("bench %s: case %s failed: %s", model_name, name, exc)
            failed.append({"case": name, "source": _source(case) or "", "error": f"{type(exc).__name__}: {exc}"})
            first_error = first_error or exc
        else:
            for r in scored:  # per-case statistics and the Wilcoxon pairs are keyed by the case's name
                r.case = name
            results += scored
            log.info("bench %s: case %s done", model_name, name)
        if progress is not None:
            progress((i + 1) / len(cases), f"case {i + 1}/{len(cases)}")
    if first_error is not None and len(failed) == len(cases):  # nothing to report: the error is the answer
        raise first_error
    sources = {name: source for case, name in zip(cases, names) if (source := _source(case))}
    return BenchReport(model=model_name, weights=weights, dataset=dataset, results=results,
                       seconds=time.perf_counter() - started, sources=sources, failed=failed)


def _source(case: Any) -> Optional[str]:
    """The file or folder a case's CT was read from; None for a phantom (its name is its seed)."""
    if getattr(case, "synthetic", True) or not getattr(case.ct, "source", None):
        return None
    return str(case.ct.source)


def _distinct_names(names: Sequence[str]) -> list[str]:
    """The case names, with ``#k`` added where several cases share one (TotalSegmentator's ``sXXXX/ct.nii.gz``).

    Two cases under one name would be merged into one case and would overwrite each other's
    (case, prompt) pairs in ``compare``.
    """
    from collections import Counter

    counts, numbered, taken, out = Counter(names), Counter(), set(names), []
    for name in names:
        candidate = name
        while counts[name] > 1 and candidate in taken:  # every case of a shared name gets its number
            numbered[name] += 1
            candidate = f"{name} #{numbered[name]}"
        taken.add(candidate)
        out.append(candidate)
    return out


def _no_nan(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value


def read_report(path: Path) -> BenchReport:
    """The ``BenchReport`` of a ``bench.json`` written by ``write_report`` (or ``textsegment bench``)."""
    try:
        return BenchReport.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a bench.json written by textsegment bench ({type(exc).__name__}: {exc})") from None


def write_report(
    report: BenchReport, folder: Path, *, comparison: Optional[dict] = None, overwrite: bool = False
) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` (plus the Wilcoxon comparison) in ``folder``.

    An earlier bench's files there are refused before anything is written unless ``overwrite``, as
    every other writer does: a second call must not replace the first report in silence.
    """
    from .errors import OutputExistsError
    from .export import refuse_file_as_folder

    folder = Path(folder)
    refuse_file_as_folder(folder)
    files = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}
    taken = [name for name in files.values() if (folder / name).exists()]
    if taken and not overwrite:
        raise OutputExistsError(f"{folder}: holds bench results already ({', '.join(taken)}); "
                                "choose another folder or pass overwrite=True (CLI: --overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    markdown = report.to_markdown()
    if comparison is not None:
        data["comparison"] = comparison
        names = [f"{comparison.get(k)}" + (f" ({comparison[k + '_weights']})" if comparison.get(k + "_weights") else "")
                 for k in ("a", "b")]
        markdown += (f"\n## Paired Wilcoxon signed-rank test\n\nMean difference = a − b, with a = {names[0]} and "
                     f"b = {names[1]}. *pairs*: the (case, prompt) pairs both scored, tested as if independent; "
                     "*cases*: each case's mean Dice over its paired prompts, one pair per case. Prompts of one "
                     "case share its image, so the per-case p is the one to quote.\n\n"
                     "| level | pairs | mean difference | p (pairs) | cases | p (cases) |\n|---|---|---|---|---|---|\n")
        for level in SCORED_LEVELS:
            w, c = comparison.get(level), comparison.get("per_case", {}).get(level)
            pairs = "0 | n/a | n/a" if w is None else f"{w['n']} | {w['mean_difference']:+.3f} | {w['p_value']:.3g}"
            cases = "0 | n/a" if c is None else f"{c['n']} | {c['p_value']:.3g}"
            markdown += f"| {level} | {pairs} | {cases} |\n"
        dropped = {lv: d for lv, d in comparison.get("dropped", {}).items() if d["only_a"] or d["only_b"]}
        if dropped:
            markdown += ("\nLeft out (scored by one report only): " + "; ".join(
                f"{lv}: {d['only_a']} only in {comparison.get('a')}, {d['only_b']} only in {comparison.get('b')}"
                for lv, d in dropped.items()) + "\n")
    paths = {kind: folder / name for kind, name in files.items()}
    # NaN is not JSON: a value that cannot be computed is null, as the markdown's n/a
    paths["json"].write_text(json.dumps(_no_nan(data), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown)
    report.plot(paths["plot"])
    return paths
