"""bench/post_hoc.py: smoothing by hand, and its variants that change nothing reproduce the shipped scores."""

from __future__ import annotations

import json

import numpy as np
from bench_scripts import load_bench


def test_smoothing_averages_neighbouring_slices_and_repeats_the_edges():
    bench = load_bench("post_hoc")
    probability = np.array([0.0, 1.0, 0.0, 0.4], dtype=np.float32)[:, None, None]
    out = bench.smoothed(probability, [0.25, 0.5, 0.25])[:, 0, 0]
    # slice 0 sees (0, 0, 1): the first slice repeated; slice 3 sees (0, 0.4, 0.4)
    np.testing.assert_allclose(out, [0.25, 0.5, 0.35, 0.3], rtol=1e-6)
    assert bench._weights("1/6,2/3,1/6") == [1 / 6, 2 / 3, 1 / 6]


def test_a_shift_moves_the_last_two_axes_and_fills_what_comes_in():
    bench = load_bench("post_hoc")
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    moved = bench.shifted(array, 1, -1, fill=-1)
    np.testing.assert_array_equal(moved[0], [[-1, -1, -1, -1], [1, 2, 3, -1], [5, 6, 7, -1]])
    back = bench.shifted(moved, -1, 1, fill=-1)
    np.testing.assert_array_equal(back[0, :2, 1:], array[0, :2, 1:])  # what stayed inside comes back unchanged


def test_variants_that_change_nothing_score_as_shipped(tmp_path, capsys):
    bench = load_bench("post_hoc")
    out = tmp_path / "post_hoc.json"
    bench.main([
        "--model", "freqmedclip-tiny", "--weights", "freqmedclip-tiny-v8", "--phantoms", "1000-1000",
        "--shape", "12x64x64", "--thresholds", "0.5", "--smoothing", "0,1,0",
        "--shifts", "0,0", "--soups", "freqmedclip-tiny-v8+freqmedclip-tiny-v8", "--json", str(out),
    ])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "mask at 0.5 (as shipped)", "smoothing 0,1,0", "threshold 0.5", "mean over shifts (0,0) (0,0)",
        "freqmedclip-tiny-v8+freqmedclip-tiny-v8"]
    shipped = rows[0]
    assert shipped["L1"] > 0.3  # the shipped model finds the organs on a phantom at all
    for row in rows[1:]:
        for key in ("L1", "L2", "L3", "negatives marked"):
            assert row[key] == shipped[key], (row["variant"], key)
    assert "| weight average | freqmedclip-tiny-v8+freqmedclip-tiny-v8 |" in capsys.readouterr().out
