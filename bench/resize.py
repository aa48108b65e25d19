"""Bilinear resizing on the CPU: PyTorch's kernel against ``resize_to``'s two matrix products.

    .venv/bin/python bench/resize.py --threads 1 --doc docs/performance.md    # ~2 min, other core idle

``models.layers.resize_to`` resizes inputs of up to ``MATMUL_RESIZE_MAX_SIDE`` cells a side to
outputs of at least ``MATMUL_RESIZE_MIN_OUTPUT`` by two products with cached interpolation
matrices instead of ``F.interpolate``, whose CPU kernel on (N, C, h, w) tensors costs ~5 ns per
output value whatever the input (elsewhere the kernel is faster and is kept). Two tables:

* **kernel**: the resizes one batch of the two tiny models makes on the real CT, timed both ways
  (``F.interpolate`` and ``resize_by_matrices``), and which one ``resize_to`` takes (best of ``--repeats`` × 20 calls), with the
  largest difference between the two results;
* **segment**: ``segment`` on the real CT (its four prompts) for freqmedclip-tiny and
  tgcnet-tiny with their shipped weights, with the matrix path on and off, alternating in one
  process (best of ``--repeats`` each), and the largest probability difference.

Prints both tables, writes JSON (``--json``) and, with ``--doc``, replaces the
``<!-- bench:resize:start/end -->`` block of that file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, markdown_table, replace_doc_block, write_json  # noqa: E402

# (input shape, output size, who asks): every resize of one batch's forward on the real CT
KERNEL_CASES = [
    ((4, 32, 16, 16), (64, 64), "freqmedclip-tiny decoder, last stage"),
    ((4, 48, 8, 8), (16, 16), "freqmedclip-tiny decoder"),
    ((4, 64, 4, 4), (8, 8), "freqmedclip-tiny decoder"),
    ((4, 96, 2, 2), (4, 4), "freqmedclip-tiny decoder"),
    ((4, 40, 8, 8), (16, 16), "freqmedclip-tiny ViT guide"),
    ((4, 160, 8, 8), (4, 4), "freqmedclip-tiny ViT guide"),
    ((4, 320, 8, 8), (2, 2), "freqmedclip-tiny ViT guide"),
    ((2, 64, 8, 8), (64, 64), "tgcnet-tiny fusion"),
    ((2, 64, 8, 8), (16, 16), "tgcnet-tiny fusion"),
    ((2, 48, 16, 16), (32, 32), "tgcnet-tiny decoder"),
    ((2, 32, 32, 32), (64, 64), "tgcnet-tiny decoder"),
    ((2, 64, 32, 32), (64, 64), "tgcnet-tiny fusion"),
    ((4, 1, 64, 64), (128, 128), "freqmedclip-tiny logits"),
]
PRESETS = (("freqmedclip-tiny", "freqmedclip-tiny-v8"), ("tgcnet-tiny", "tgcnet-tiny-v9"))


def kernel_rows(*, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from TextSegmentLib.models import layers

    rows = []
    for shape, size, where in KERNEL_CASES:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        kernel = lambda: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        products = lambda: layers.resize_by_matrices(x, size)  # noqa: E731
        kernel_ms, products_ms = _best_ms(kernel, repeats), _best_ms(products, repeats)
        rows.append(
            {
                "where": where,
                "input": "×".join(map(str, shape)),
                "output": "×".join(map(str, size)),
                "path": "products" if _matrix_path(shape, size) else "kernel",
                "kernel_ms": kernel_ms,
                "matrices_ms": products_ms,
                "speedup": kernel_ms / products_ms,
                "max_abs_diff": float((kernel() - products()).abs().max()),
            }
        )
    return rows


def segment_rows(*, repeats: int, data_root: Path) -> list[dict]:
    import numpy as np

    from bench.saliency import real_cases
    from TextSegmentLib.engine import segment
    from TextSegmentLib.models import layers
    from TextSegmentLib.weights import load_model

    case = real_cases(data_root)[0]  # the real CT, with its four prompts
    prompts = list(case.targets)
    limit = layers.MATMUL_RESIZE_MAX_SIDE
    rows = []
    try:
        for preset, weights in PRESETS:
            model = load_model(preset, weights=weights, device="cpu")
            best = {"matrices": float("inf"), "kernel": float("inf")}
            result = {}
            for _ in range(repeats):
                for path, side in (("matrices", limit), ("kernel", 0)):  # 0: no input is small enough
                    layers.MATMUL_RESIZE_MAX_SIDE = side
                    start = time.perf_counter()
                    result[path] = segment(case.volume, prompts, model=model, device="cpu")
                    best[path] = min(best[path], time.perf_counter() - start)
            difference = max(
                float(np.abs(a.probability_values() - b.probability_values()).max())
                for a, b in zip(result["matrices"].results, result["kernel"].results)
            )
            rows.append(
                {
                    "preset": f"{preset} ({weights})",
                    "case": f"{case.name}, {len(prompts)} prompts, {case.volume.shape[0]} slices",
                    "kernel_s": best["kernel"],
                    "matrices_s": best["matrices"],
                    "speedup": best["kernel"] / best["matrices"],
                    "max_abs_diff_probability": difference,
                }
            )
    finally:
        layers.MATMUL_RESIZE_MAX_SIDE = limit
    return rows


def format_tables(kernels: list[dict], segments: list[dict]) -> str:
    return "\n\n".join(
        [
            markdown_table(
                kernels,
                [("where", "where"), ("input", "input"), ("output", "output"), ("resize_to takes", "path"), ("F.interpolate ms", "kernel_ms"),
                 ("two products ms", "matrices_ms"), ("products' speed-up", "speedup"), ("max |Δ|", "max_abs_diff")],
            ),
            markdown_table(
                segments,
                [("preset", "preset"), ("case", "case"), ("kernel everywhere s", "kernel_s"),
                 ("resize_to s", "matrices_s"), ("speed-up", "speedup"),
                 ("max |Δ probability|", "max_abs_diff_probability")],
            ),
        ]
    )


def _matrix_path(shape, size) -> bool:
    from TextSegmentLib.models import layers

    return max(shape[-2:]) <= layers.MATMUL_RESIZE_MAX_SIDE and min(size) >= layers.MATMUL_RESIZE_MIN_OUTPUT


def _best_ms(fn, repeats: int, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return 1e3 * best


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--json", default=str(REPO / "out" / "bench_resize.json"))
    parser.add_argument("--doc", default=None, help="Markdown file whose bench:resize block gets the tables")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        kernels = kernel_rows(repeats=args.repeats)
    segments = segment_rows(repeats=args.repeats, data_root=Path(args.data_root))
    tables = format_tables(kernels, segments)
    print(tables)
    machine = machine_info()
    path = write_json(args.json, {"machine": machine, "kernel": kernels, "segment": segments})
    print(f"wrote {path}")
    if args.doc:
        note = (
            f"`.venv/bin/python bench/resize.py{' --threads ' + str(args.threads) if args.threads else ''} "
            f"--doc {args.doc}` on {machine['cpu']}, {machine['torch_threads']} thread(s), torch {machine['torch']}."
        )
        replace_doc_block(args.doc, "resize", note + "\n\n" + tables)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
