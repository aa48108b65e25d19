"""bench/saliency.py end to end on the planted model: the table, the targets and the doc block."""

from __future__ import annotations

import math

import numpy as np
from planted_model import PlantedModel, sphere_phantom
from bench_scripts import load_bench


def test_bench_scores_the_planted_answer_and_writes_its_table(tmp_path):
    bench = load_bench("saliency")
    volume, ball, _ = sphere_phantom()
    body = (volume.array > -500) & ~ball
    case = bench.Case("planted", volume, {"bright": ball, "dark": body})
    result = bench.run_benchmark(PlantedModel(), [case], stages=(1, 3), slices_per_prompt=2, repeats=1)

    lines = {(s["method"], s["stage"], s["layer"]): s for s in result["summary"]}
    deep, shallow = lines[(bench.OURS, 1, "deep")], lines[(bench.OURS, 1, "shallow")]
    assert deep["energy"] > shallow["energy"] and deep["pointing"] == 1.0
    assert lines[(bench.GRAD_CAM, None, "deep")]["n"] == 0  # the planted taps are not on the logit path
    assert (
        -1.0 <= lines[(bench.OURS, 3, "joint")]["prompt_swap_r"] < 0.5
    )  # "bright" and "dark" explain opposite regions
    assert [(o["grid"], o["stage"]) for o in result["overhead"]] == [("compact", 1), ("compact", 3), ("source", 1), ("source", 3)]
    assert {o["layers"] for o in result["overhead"]} == {"default (3), compact grid", "default (3), source grid"}
    checked = bench.format_targets(result["targets"])
    assert "| saliency adds ≤ 10 % (default (3), compact grid, stage 1) |" in checked
    assert "| prompt-swap r < 0.5, stage 3 (mean over layers) |" in checked
    assert all(o["sink_s"] > 0 for o in result["overhead"])
    assert set(result["targets"]) == {
        "overhead_at_most_10_percent",
        "speedup_vs_grad_cam",
        "prompt_swap_below_0.5",
        "energy_rises_with_depth",
    }

    table = bench.format_tables(result["summary"], result["overhead"], title="planted")
    assert "| gradient-free | 1 | deep |" in table and "n/a (tap not on the logit path)" in table
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n<!-- bench:{bench.DOC_BLOCK}:start -->\nold\n<!-- bench:{bench.DOC_BLOCK}:end -->\noutro\n")
    bench.replace_doc_block(doc, bench.DOC_BLOCK, table)
    text = doc.read_text()
    assert "old" not in text and "| gradient-free | 1 | deep |" in text and text.endswith("outro\n")
    assert math.isfinite(deep["ms_per_slice"]) and np.isfinite(deep["dice"])
