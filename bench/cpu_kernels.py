"""CPU kernels the models route around: PyTorch's textbook form against ours, call by call and whole runs.

    .venv/bin/python bench/cpu_kernels.py --threads 1 --doc docs/performance.md    # ~3 min, other core idle

Four places where the plain PyTorch expression hits a slow CPU path, each replaced by an exact
equivalent (up to float rounding), and the trainer's optimizer step:

* **bilinear resize** (``models.layers.resize_to``): ``F.interpolate`` on (N, C, h, w) tensors
  costs ~5 ns per output value whatever the input; small contiguous inputs to outputs of 16 × 16
  or more go through two products with cached interpolation matrices (``resize_by_matrices``);
* **grouped cosine** (``models.tgcnet.grouped_cosine``): ``F.normalize`` along a middle axis of 8
  channels is slow; a multiply-and-sum over lengths from sums of squares is not;
* **deformable sampling** (``models.deformable_attention.deformable_sample``): reading the samples
  queries-major and summing four innermost values is slow; reading them points-major sums along
  the long query axis;
* **sampling locations** (``models.deformable_attention.sampling_locations``): reference + offset /
  level size broadcast over an innermost axis of 2 is slow; over one flattened axis of L·P·2 it
  is not.

Three tables:

* **calls**: every distinct call of these functions in the first batch of ``segment`` on the real
  CT with each tiny preset (shapes recorded, inputs random), timed both ways (best of
  ``--repeats`` × 10 calls), with the largest difference between the two results;
* **segment**: ``segment`` on the real CT (its four prompts) for freqmedclip-tiny and tgcnet-tiny
  with their shipped weights, with every replacement on and with the textbook forms everywhere,
  alternating in one process (best of ``--repeats`` each), the largest probability difference
  and how many mask voxels differ;
* **training**: forward + backward of one training-sized batch (8 images, 8 prompts) of each
  preset, both ways (best of ``--repeats``), and the AdamW step on its gradients: PyTorch's
  default on the CPU (a loop over tensors) against the fused kernel the trainer uses.

Prints the tables, writes JSON (``--json``) and, with ``--doc``, replaces the
``<!-- bench:cpu-kernels:start/end -->`` block of that file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    check_outputs,
    markdown_table,
    positive_int,
    replace_doc_block,
    run_info,
    user_errors,
    write_json,
)

PRESETS = (("freqmedclip-tiny", "freqmedclip-tiny-v8"), ("tgcnet-tiny", "tgcnet-tiny-v9"))


# ------------------------------------------------------------------------- the textbook forms
def textbook_resize(x, size):
    import torch.nn.functional as F

    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def textbook_grouped_cosine(pixels, text, groups):
    import torch
    import torch.nn.functional as F

    batch, channels, height, width = pixels.shape
    pixels = F.normalize(pixels.reshape(batch, groups, channels // groups, height, width), dim=2)
    text = F.normalize(text.reshape(batch, groups, channels // groups), dim=2)
    return torch.einsum("bgchw,bgc->bghw", pixels, text)


def textbook_deformable_sample(value, spatial_shapes, sampling_locations, attention_weights):
    import torch.nn.functional as F

    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2.0 * sampling_locations - 1.0
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    out = None
    for level, (value_level, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        value_level = value_level.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, int(h), int(w))
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(value_level, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        part = (sampled * weights[..., level, :]).sum(-1)
        out = part if out is None else out + part
    return out.reshape(batch, heads * head_dim, queries).transpose(1, 2)


def textbook_sampling_locations(reference_points, offsets, spatial_shapes):
    size_xy = spatial_shapes.flip(-1).to(device=offsets.device, dtype=offsets.dtype)
    return reference_points[:, :, None, :, None, :] + offsets / size_xy[None, None, None, :, None, :]


def _targets():
    """(kernel, [(module, attribute)], textbook form): where each replacement is looked up by its callers."""
    from TextSegmentLib.models import deformable_attention, freqmedclip, layers, tgcnet

    return [
        ("bilinear resize", [(layers, "resize_to"), (freqmedclip, "resize_to"), (tgcnet, "resize_to")],
         textbook_resize),
        ("grouped cosine", [(tgcnet, "grouped_cosine")], textbook_grouped_cosine),
        ("deformable sampling", [(deformable_attention, "deformable_sample")], textbook_deformable_sample),
        ("sampling locations", [(deformable_attention, "sampling_locations")], textbook_sampling_locations),
    ]


@contextlib.contextmanager
def _swapped(stand_in: Callable[[str, Callable, Callable], Callable]):
    """Each replacement's attribute set to ``stand_in(kernel, ours, textbook)`` for the duration."""
    saved = []
    try:
        for kernel, places, textbook in _targets():
            ours = getattr(*places[0])
            for module, name in places:
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, stand_in(kernel, ours, textbook))
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def textbook_everywhere():
    """Every replacement swapped for its textbook form for the duration (a context manager)."""
    return _swapped(lambda kernel, ours, textbook: textbook)


# ------------------------------------------------------------------------------- measurements
def recorded_calls(model: Any, case: Any) -> list[tuple[str, Callable, Callable, tuple]]:
    """The distinct calls of the replaced functions in the first batch of ``segment`` on ``case``.

    Returns (kernel, ours, textbook, args) per call; calls that differ only in their batch size
    (the last, partial batch) are counted once, at the first batch's size.
    """
    from TextSegmentLib.engine import segment

    calls: dict[tuple, tuple] = {}

    def spy(kernel: str, ours: Callable, textbook: Callable) -> Callable:
        def record(*args):
            key = (kernel,) + tuple(tuple(a.shape[1:]) if hasattr(a, "shape") else a for a in args)
            key += (args[0].is_contiguous(),)  # the layout decides the resize path
            if not (kernel == "bilinear resize" and tuple(args[0].shape[-2:]) == tuple(args[1])):  # no-op
                calls.setdefault(key, (kernel, ours, textbook, args))
            return ours(*args)

        return record

    with _swapped(spy):
        segment(case.volume, ["liver"], model=model, device="cpu")
    return list(calls.values())


def call_rows(models: dict[str, Any], case: Any, *, repeats: int) -> list[dict]:
    import torch

    rows = []
    for preset, model in models.items():
        for kernel, ours, textbook, args in recorded_calls(model, case):
            args = tuple(_random_like(a) for a in args)
            with torch.inference_mode():
                textbook_ms = _best_ms(lambda: textbook(*args), repeats)
                ours_ms = _best_ms(lambda: ours(*args), repeats)
                difference = float((textbook(*args) - ours(*args)).abs().max())
            rows.append(
                {
                    "preset": preset,
                    "kernel": kernel,
                    "shapes": " · ".join("×".join(map(str, a.shape)) for a in args if getattr(a, "ndim", 0) > 1),
                    "output": _output_note(kernel, args),
                    "textbook_ms": textbook_ms,
                    "ours_ms": ours_ms,
                    "speedup": textbook_ms / ours_ms,
                    "max_abs_diff": difference,
                }
            )
    return rows


def segment_rows(models: dict[str, Any], case: Any, *, repeats: int) -> list[dict]:
    import numpy as np

    from TextSegmentLib.engine import segment

    prompts = list(case.targets)
    rows = []
    for preset, model in models.items():
        weights = dict(PRESETS)[preset]
        best = {"ours": float("inf"), "textbook": float("inf")}
        result = {}
        for _ in range(repeats):
            for way in ("ours", "textbook"):
                with textbook_everywhere() if way == "textbook" else contextlib.nullcontext():
                    start = time.perf_counter()
                    result[way] = segment(case.volume, prompts, model=model, device="cpu")
                    best[way] = min(best[way], time.perf_counter() - start)
        pairs = list(zip(result["ours"].results, result["textbook"].results))
        rows.append(
            {
                "preset": f"{preset} ({weights})",
                "case": f"{case.name}, {len(prompts)} prompts, {case.volume.shape[0]} slices",
                "textbook_s": best["textbook"],
                "ours_s": best["ours"],
                "speedup": best["textbook"] / best["ours"],
                "max_abs_diff_probability": max(
                    float(np.abs(a.probability_values() - b.probability_values()).max()) for a, b in pairs
                ),
                "mask_voxels_differing": int(sum(int((a.mask.array != b.mask.array).sum()) for a, b in pairs)),
            }
        )
    return rows


def training_rows(*, repeats: int) -> list[dict]:
    """Forward + backward of one training-sized batch (8 images, 8 prompts) both ways."""
    import torch

    from TextSegmentLib.weights import load_model

    prompts = ["liver", "spleen", "left kidney", "aorta", "liver without the tumour", "pancreas", "heart", "stomach"]
    rows = []
    for preset, weights in PRESETS:  # models of their own: training mode and gradients change them
        model = load_model(preset, weights=weights, device="cpu").train()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        size = int(model.image_size)
        images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0))

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(images, model.encode_text(prompts)).logits.float().sigmoid().mean().backward()

        best = {"ours": float("inf"), "textbook": float("inf")}
        for _ in range(repeats):
            for way in ("ours", "textbook"):
                with textbook_everywhere() if way == "textbook" else contextlib.nullcontext():
                    step()  # warm-up in this form
                    start = time.perf_counter()
                    step()
                    best[way] = min(best[way], time.perf_counter() - start)
        rows.append(
            {
                "preset": f"{preset} ({weights})",
                "batch": f"8 × {size}², 8 prompts, forward + backward",
                "textbook_s": best["textbook"],
                "ours_s": best["ours"],
                "speedup": best["textbook"] / best["ours"],
            }
        )
        # the optimizer step on these gradients: PyTorch's default on the CPU (a loop over
        # tensors) against the fused kernel the trainer asks for
        parameters = [p for p in model.parameters() if p.grad is not None]
        optimizer_s = {}
        for way, options in (("textbook", {"foreach": False}), ("ours", {"fused": True})):
            optimizer = torch.optim.AdamW(parameters, lr=1e-5, weight_decay=0.01, **options)
            optimizer.step()
            optimizer_s[way] = _best_ms(optimizer.step, repeats) / 1e3
        rows.append(
            {
                "preset": f"{preset} ({weights})",
                "batch": f"AdamW step over {len(parameters)} tensors (loop → fused)",
                "textbook_s": optimizer_s["textbook"],
                "ours_s": optimizer_s["ours"],
                "speedup": optimizer_s["textbook"] / optimizer_s["ours"],
            }
        )
    return rows


def format_tables(calls: list[dict], segments: list[dict], training: list[dict]) -> str:
    return "\n\n".join(
        [
            markdown_table(
                calls,
                [("preset", "preset"), ("kernel", "kernel"), ("inputs", "shapes"), ("output", "output"),
                 ("textbook ms", "textbook_ms"), ("ours ms", "ours_ms"), ("speed-up", "speedup"),
                 ("max |Δ|", "max_abs_diff")],
            ),
            markdown_table(
                segments,
                [("preset", "preset"), ("case", "case"), ("textbook forms s", "textbook_s"), ("ours s", "ours_s"),
                 ("speed-up", "speedup"), ("max |Δ probability|", "max_abs_diff_probability"),
                 ("mask voxels differing", "mask_voxels_differing")],
            ),
            markdown_table(
                training,
                [("preset", "preset"), ("training step", "batch"), ("textbook forms s", "textbook_s"),
                 ("ours s", "ours_s"), ("speed-up", "speedup")],
            ),
        ]
    )


def _random_like(arg: Any) -> Any:
    import torch

    if isinstance(arg, torch.Tensor) and arg.is_floating_point():
        return torch.rand_like(arg) if arg.min() >= 0 and arg.max() <= 1 else torch.randn_like(arg)
    return arg


def _output_note(kernel: str, args: tuple) -> str:
    if kernel == "bilinear resize":
        import torch

        from TextSegmentLib.models import layers

        x, size = args
        with torch.inference_mode():  # as in segment
            kept = "" if layers.resize_takes_matrices(x, size) else " (resize_to keeps the kernel)"
        return "×".join(map(str, size)) + ("" if x.is_contiguous() else ", channels-last input") + kept
    return ""


def _best_ms(fn: Callable[[], Any], repeats: int, calls: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timings: best of this many (default: %(default)s)")
    parser.add_argument(
        "--data-root", default=str(REPO.parent / "shared" / "data"),
        help="folder holding ct/totalseg_example_ct_sm (default: ../shared/data beside the repository)",
    )
    parser.add_argument(
        "--json", default=str(REPO / "out" / "bench_cpu_kernels.json"),
        help="where the results go (default: out/bench_cpu_kernels.json in the repository)",
    )
    parser.add_argument("--doc", default=None, help="Markdown file whose bench:cpu-kernels block gets the tables")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, json_path=args.json, doc=args.doc, block="cpu-kernels")
    with user_errors():
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.saliency import real_cases
    from TextSegmentLib.weights import load_model

    case = real_cases(Path(args.data_root))[0]
    models = {preset: load_model(preset, weights=weights, device="cpu") for preset, weights in PRESETS}
    calls = call_rows(models, case, repeats=args.repeats)
    segments = segment_rows(models, case, repeats=args.repeats)
    training = training_rows(repeats=args.repeats)
    tables = format_tables(calls, segments, training)
    print(tables)
    info = run_info("bench/cpu_kernels.py", argv)
    machine = info["machine"]
    path = write_json(
        args.json,
        {**info, "settings": dict(vars(args)), "calls": calls, "segment": segments, "training": training},
    )
    print(f"wrote {path}")
    if args.doc:
        note = (
            f"`.venv/bin/python {info['command']}` on {machine['cpu']}, {machine['torch_threads']} thread(s), "
            f"torch {machine['torch']}."
        )
        replace_doc_block(args.doc, "cpu-kernels", note + "\n\n" + tables)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
