"""bench/inference.py's core on a tiny phantom: the three methods give the same maps; records, ratios and verdicts add up."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bench_scripts import BENCH_DIR, load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("inference")


@pytest.fixture(scope="module")
def one_thread():
    """One thread, as the benchmark is run on shared machines: with every core's OpenMP thread busy-waiting
    beside other processes, a 2-core machine runs this model 50× slower (see docs/performance.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def measured(bench, one_thread):
    model = bench.build_model("freqmedclip-tiny", device="cpu")
    volume = bench.make_volume(4, 64)
    records, outputs = [], {}
    for method in bench.METHODS:
        record, outputs[method] = bench.measure(
            method, model, volume, ["liver"], device="cpu", slices=2, repeats=2, batch_size=2,
            count_flops=method == "engine", matmul_size=256,
        )
        record.update(preset="freqmedclip-tiny", floor_target=True)
        records.append(record)
    return records, outputs


def test_the_three_methods_run_the_same_network(measured):
    _, outputs = measured
    engine = np.stack(outputs["engine"]).astype(np.float32)  # kept as float16, the engine's default
    assert outputs["engine"][0].dtype == np.float16
    assert engine.shape == (1, 2, 64, 64)
    assert engine.std() > 1e-4  # a random model still gives a map that varies, so agreement means something
    for method in ("naive", "sliceinferer"):
        theirs = np.stack(outputs[method])
        assert theirs.shape == engine.shape
        assert np.abs(theirs - engine).max() < 1e-4 + 2.0**-11, method  # float32 noise plus one float16 step


def test_records_hold_times_memory_and_the_engine_scaling(measured):
    records, _ = measured
    for record in records:
        assert len(record["seconds"]) == 2 and all(s > 0 for s in record["seconds"])
        assert record["seconds_per_slice"] == pytest.approx(float(np.median(record["seconds"])) / 2)
        assert record["slices_per_s"] == pytest.approx(1 / record["seconds_per_slice"])
        assert record["matmul_flops_per_s"] > 1e8
        assert record["peak_rss_mb"] >= record["baseline_rss_mb"] > 0
        assert record["delta_rss_mb"] == pytest.approx(record["peak_rss_mb"] - record["baseline_rss_mb"])
        assert record["process_peak_rss_mb"] >= record["peak_rss_mb"] - 1
    engine = records[0]
    assert engine["method"] == "engine" and engine["slices_2n"] == 4 and len(engine["seconds_2n"]) == 2
    assert engine["scaling"] == pytest.approx(float(np.median(engine["seconds_2n"]) / np.median(engine["seconds"])))
    assert 0.5e9 < engine["flops_per_slice"] < 2e9  # freqmedclip-tiny: about 1 GFLOP at 128 px
    assert records[1]["batch_size"] == 1  # the naive loop


def test_summary_ratios_follow_from_the_records(bench, measured):
    records, _ = measured
    [row] = bench.summarise(records)
    engine, naive, inferer = records
    floor = engine["flops_per_slice"] / engine["matmul_flops_per_s"]
    assert row["floor_s_per_slice"] == pytest.approx(floor)
    assert row["floor_ratio"] == pytest.approx(engine["seconds_per_slice"] / floor)
    assert naive["floor_ratio"] == pytest.approx(naive["seconds_per_slice"] * naive["matmul_flops_per_s"] / engine["flops_per_slice"])
    assert row["speedup_vs_sliceinferer"] == pytest.approx(inferer["seconds_per_slice"] / engine["seconds_per_slice"])
    assert row["speedup_vs_naive"] == pytest.approx(naive["seconds_per_slice"] / engine["seconds_per_slice"])
    if inferer["delta_rss_mb"] > 0:
        assert row["memory_vs_sliceinferer"] == pytest.approx(engine["delta_rss_mb"] / inferer["delta_rss_mb"])
    assert row["floor_target_applies"] and isinstance(row["floor_ok"], bool)
    assert isinstance(row["scaling_ok"], bool) and isinstance(row["speedup_ok"], bool)
    tables = bench.format_tables(records, [row], title="t")
    assert "| freqmedclip-tiny | cpu | sliceinferer | 2 | 2 |" in tables


def test_verdicts_fail_what_misses_its_target(bench):
    row = {
        "floor_ratio": 2.0, "floor_target_applies": True, "speedup_vs_sliceinferer": 1.6,
        "memory_vs_sliceinferer": 0.6, "scaling": 2.05,
    }
    assert bench.verdicts(row) == {"floor_ok": False, "speedup_ok": True, "memory_ok": False, "scaling_ok": True}
    row.update(floor_ratio=1.2, scaling=2.2, memory_vs_sliceinferer=None, floor_target_applies=False)
    assert bench.verdicts(row) == {"floor_ok": None, "speedup_ok": True, "memory_ok": None, "scaling_ok": False}
    assert bench.verdicts(dict(row, floor_target_applies=True))["floor_ok"] is True


class _AttentionOnly(torch.nn.Module):
    """A 'model' whose only FLOPs are one linear layer and one CPU attention call, to check the count."""

    image_size = 8

    def encode_text(self, prompts):
        return None

    def forward(self, images, text):
        tokens = images.flatten(2).transpose(1, 2)  # (1, 64, 3)
        q = F.linear(tokens, torch.ones(16, 3)).reshape(1, 64, 2, 8).transpose(1, 2)  # 2 heads of 8
        return F.scaled_dot_product_attention(q, q, q)


def test_flop_count_includes_attention_on_the_cpu(bench):
    linear = 2 * 64 * 3 * 16
    attention = 2 * (2 * 2 * 64 * 64 * 8)  # QKᵀ and AV for each of 2 heads
    assert bench.flops_per_slice(_AttentionOnly(), device="cpu") == linear + attention


def test_doc_block_is_replaced(tmp_path):
    sys.path.insert(0, str(BENCH_DIR.parent))
    from bench.common import markdown_table, replace_doc_block

    doc = tmp_path / "performance.md"
    doc.write_text("intro\n<!-- bench:inference:start -->\nold\n<!-- bench:inference:end -->\noutro\n")
    replace_doc_block(doc, "inference", markdown_table([{"a": 1.23456, "b": None}], [("A", "a"), ("B", "b")]))
    text = doc.read_text()
    assert "old" not in text and "| 1.23 | – |" in text and text.startswith("intro") and text.endswith("outro\n")


def test_the_engine_can_keep_its_maps_on_the_compact_grid(bench, one_thread):
    from TextSegmentLib.grid import on_grid_of

    model = bench.build_model("freqmedclip-tiny", device="cpu")
    volume = bench.make_volume(2, 256)
    full = bench.run_engine(model, volume, ["liver"], device="cpu", batch_size=2)
    small = bench.run_engine(model, volume, ["liver"], device="cpu", batch_size=2, probability_grid="compact")
    assert full[0].shape == (2, 256, 256) and small[0].shape == (2, 128, 128)  # the network's 128 px
    back = on_grid_of(small[0].astype(np.float32), full[0].shape)
    assert np.abs(back - full[0].astype(np.float32)).mean() < 0.01 * max(float(full[0].std()), 1e-3) + 1e-3
