"""bench/saliency_ab.py: an earlier revision's sink is loaded whole, beside today's, and still runs."""

from __future__ import annotations

import subprocess

from bench_scripts import load_bench

ab = load_bench("saliency_ab")


def test_an_earlier_sink_uses_its_own_maths_and_layer_maps_and_segments_with_saliency():
    from TextSegmentLib.phantom import make_phantom
    from TextSegmentLib.saliency import sink as today
    from TextSegmentLib.weights import load_model

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.REPO, capture_output=True, text=True, check=True).stdout.strip()
    before = ab.sink_at(head)
    assert before is not today and before.__name__.endswith(head)
    # every function it imported from its siblings is the same revision's, not today's
    assert before.explain_batch.__module__.endswith(f"layer_maps_at_{head}")
    assert before.percentiles.__module__.endswith(f"maths_at_{head}")
    layer_maps = __import__("sys").modules[before.explain_batch.__module__]
    assert layer_maps.stage3_map.__module__.endswith(f"maths_at_{head}")

    model = load_model("freqmedclip-tiny", weights="random", device="cpu")
    phantom = make_phantom(seed=1, shape=(2, 48, 48))
    times = ab.compare({"before": before, "today": today}, model=model, volume=phantom.ct, prompts=["liver"],
                       stage=3, runs=2)
    assert set(times) == {"before", "today"}
    for t in times.values():
        assert len(t["sink_ms"]) == len(t["share"]) == 2 and all(ms > 0 for ms in t["sink_ms"])
