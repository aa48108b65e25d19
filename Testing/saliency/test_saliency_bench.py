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


def test_bench_predicted_targets_leave_out_the_padding_as_the_tool_does():
    """A slice that is not square is padded; the planted model calls the dark padding "dark". The tool's
    predicted target (``SaliencySink._target``) covers the image only, so the bench's must too: with the
    padding in it, stage 3's box, prior and context are those of a different target."""
    import torch
    import torch.nn.functional as F

    from TextSegmentLib.preprocess import fit_to_square
    from TextSegmentLib.saliency import SaliencyConfig, explain_batch
    from TextSegmentLib.saliency.sink import image_inside

    bench = load_bench("saliency")
    model = PlantedModel()
    slices = np.zeros((1, 3, 20, 32), np.float32)
    slices[:, 2, 6:14, 4:12] = 1.0  # a bright square; the rest of the image (and the padding) is dark
    images, fit = fit_to_square(torch.from_numpy(slices), size=model.image_size)
    assert fit.padding[0] > 0  # rows of padding above and below the image
    layers = ["shallow", "deep"]
    maps = bench._methods(
        model, images, "dark", None, layers=layers, stages=(1, 3), target_mode="predicted", crop=fit.crop
    )

    def tool_maps(target, stage):
        with torch.inference_mode():
            raw, _, _ = explain_batch(output, layers=layers, target=target, config=SaliencyConfig(stage=stage), model=model,
                                      inside=image_inside(fit, images.shape[-1]))  # as the tool's sink does
        size = images.shape[-2:]
        return {n: F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for n, m in raw.items()}

    with torch.inference_mode():
        output = model(images, model.encode_text(["dark"]), taps=layers)
        everywhere = (torch.sigmoid(output.logits[:, 0]) >= 0.5).float()
    in_image = torch.zeros_like(everywhere)
    in_image[:, fit.crop[0], fit.crop[1]] = everywhere[:, fit.crop[0], fit.crop[1]]
    for stage in (1, 3):
        expected, with_padding = tool_maps(in_image, stage), tool_maps(everywhere, stage)
        for name in layers:
            assert np.allclose(maps[(bench.OURS, stage)][0][name], expected[name].numpy(), atol=1e-6)
        assert not np.allclose(expected["shallow"].numpy(), with_padding["shallow"].numpy(), atol=1e-3)
