"""The three gradient-free saliency stages as pure tensor functions (no autograd, no model).

Every map is a cosine similarity between L2-normalised features (N, C, h, w) and one or more
reference vectors (N, C), so it costs one matrix product per layer on features the segmentation
pass has already computed. Boxes are given as fractions of the image (``y0, x0, y1, x1`` in
[0, 1]) so the same target lines up with feature grids of any resolution; a feature cell counts as
inside a box when its centre ``((i + 0.5) / h)`` is.

* stage 1: similarity to the organ prototype (mean feature inside the target);
* stage 2: similarity to the normalised blend of the prototype and the prompt embedding;
* stage 3: ``+`` prototype, ``+`` prompt, ``-`` global image feature, ``-`` context around the box,
  mapped to [0, 1] and weighted by a Gaussian prior around the box centre that never drops below
  ``floor`` (the paper keeps "awareness of distant anatomical context"). Without a prompt (a layer
  outside the text space) it keeps its three image components and the prior.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

EPS = 1e-8
HISTOGRAM_MIN = 32_768  # float16 percentiles by histogram from this many values on; below, topk beats 65,536 bins


@dataclass(frozen=True)
class Stage3Weights:
    """Signed weights of stage 3's four components (all given as magnitudes)."""

    prototype: float = 1.0
    prompt: float = 1.0
    global_image: float = 0.5
    context: float = 0.5

    @property
    def total(self) -> float:
        return self.prototype + self.prompt + self.global_image + self.context


def normalise(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Unit L2 norm along ``dim``; an all-zero vector stays zero instead of becoming NaN."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


def projection_map(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each unit-normalised feature vector dotted with its row's reference(s), taken as they are.

    (N, C, h, w) with (N, C) → (N, h, w); with K references per row, (N, K, C) → (N, K, h, w).
    The features are normalised once however many references there are.
    """
    length = features.square().sum(dim=1).sqrt_().clamp_min_(EPS)  # ~40× faster than vector_norm(dim=1) on CPU
    references = reference if reference.ndim == 3 else reference[:, None]
    similarity = torch.bmm(references, features.flatten(2)).unflatten(2, features.shape[2:]) / length[:, None]
    return similarity if reference.ndim == 3 else similarity[:, 0]


def cosine_map(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every feature vector with its row's reference(s); shapes as ``projection_map``."""
    return projection_map(features, normalise(reference, dim=-1))


def region_mean(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean feature over positions weighted by ``weights`` ≥ 0; zeros where a region is empty.

    (N, h, w) weights give (N, C); K regions at once, (N, K, h, w), give (N, K, C) in one pass.
    Written as (N, K, hw) @ (N, hw, C): with one region, einsum's (N, C, hw) @ (N, hw, 1) is a
    batched matrix-vector product that runs ~10× slower on CPU.
    """
    regions = weights if weights.ndim == 4 else weights[:, None]
    total = regions.sum(dim=(2, 3)).clamp_min(EPS)[..., None]
    means = torch.bmm(regions.flatten(2), features.flatten(2).transpose(1, 2)) / total
    return means if weights.ndim == 4 else means[:, 0]


def percentiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """The ``qs``-th percentiles (0–100) of all ``values``, linearly interpolated like ``numpy.percentile``.

    Exact order statistics without a full ``sort``: from a histogram of the bit patterns when the
    values are many float16s (the sink keeps its maps so; 2–3× faster than ``topk`` from 10⁵
    values on), otherwise from two partial sorts (``topk`` of the smallest values for the low
    percentiles, of the largest for the high ones; ~5× faster than ``sort``). Not
    ``torch.quantile``, which refuses inputs above 16 M elements (a whole volume of maps can
    have more).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    positions = [(n - 1) * float(q) / 100.0 for q in qs]
    ranks = sorted({r for p in positions for r in (int(p), min(int(p) + 1, n - 1))})
    if flat.dtype == torch.float16 and n >= HISTOGRAM_MIN:
        value = _float16_order_statistics(flat, ranks)
    else:
        value = _order_statistics(flat.float(), ranks)
    out = []
    for position in positions:
        below = int(position)
        above = min(below + 1, n - 1)
        out.append(float(value[below] + (value[above] - value[below]) * (position - below)))
    return out


def _order_statistics(flat: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """The ``ranks``-th smallest values (0-based) of ``flat``, from partial sorts of either end."""
    n = flat.numel()
    low = [r for r in ranks if r < n // 2]
    high = [r for r in ranks if r >= n // 2]
    value = {}
    if low:
        smallest = flat.topk(max(low) + 1, largest=False, sorted=True).values
        value.update((r, float(smallest[r])) for r in low)
    if high:
        largest = flat.topk(n - min(high), largest=True, sorted=True).values
        value.update((r, float(largest[n - 1 - r])) for r in high)
    return value


def _float16_order_statistics(flat: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    """The ``ranks``-th smallest of float16 ``flat``, exactly, from one pass over its 65,536 bit patterns.

    Bit patterns become keys that sort as the values do (negatives reversed below positives);
    the k-th smallest value is the key where the running count first exceeds k.
    """
    bits = flat.contiguous().cpu().numpy().view(np.uint16)
    keys = np.where(bits & 0x8000, ~bits, bits | 0x8000)
    counts = np.bincount(keys, minlength=1 << 16).cumsum()
    found = np.searchsorted(counts, np.asarray(ranks), side="right").astype(np.uint16)
    values = np.where(found & 0x8000, found & 0x7FFF, ~found).astype(np.uint16).view(np.float16)
    return {r: float(v) for r, v in zip(ranks, values)}


def percentile(values: torch.Tensor, q: float) -> float:
    """One percentile; see ``percentiles``."""
    return percentiles(values, (q,))[0]


def robust_rescale(
    maps: torch.Tensor, *, low: float = 1.0, high: float = 99.0, bounds: tuple[float, float] | None = None
) -> torch.Tensor:
    """Map the ``low``–``high`` percentiles of each map (leading index) onto [0, 1], clipped.

    ``bounds`` (value → 0, value → 1) replaces the per-map percentiles, e.g. with a whole volume's.
    A flat map becomes zeros: nothing stands out.
    """
    if bounds is not None:
        lo, hi = bounds
        if hi - lo <= EPS:
            return torch.zeros_like(maps, dtype=torch.float32)
        return ((maps.float() - lo) / (hi - lo)).clamp_(0.0, 1.0)
    return torch.stack([robust_rescale(m, bounds=tuple(percentiles(m, (low, high)))) for m in maps.float()])


def box_of(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes (N, 4) as fractions ``(y0, x0, y1, x1)`` of targets (N, H, W), and which exist.

    A target is binary, or weights in [0, 1] of which the cells at 0.5 or more are inside.
    """
    n, h, w = target.shape
    weights = target.float()  # amax of floats: ~10-30× faster than any() of bools on CPU
    rows = weights.amax(dim=2) >= 0.5
    cols = weights.amax(dim=1) >= 0.5
    present = rows.any(dim=1)
    r = torch.arange(h, device=target.device)
    c = torch.arange(w, device=target.device)
    big = torch.tensor(max(h, w) + 1, device=target.device)
    y0 = torch.where(rows, r, big).min(dim=1).values
    y1 = torch.where(rows, r, -1).max(dim=1).values + 1
    x0 = torch.where(cols, c, big).min(dim=1).values
    x1 = torch.where(cols, c, -1).max(dim=1).values + 1
    boxes = torch.stack([y0 / h, x0 / w, y1 / h, x1 / w], dim=1).float()
    return torch.where(present[:, None], boxes, torch.zeros_like(boxes)), present


def _cell_centres(size: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size


def box_weights(boxes: torch.Tensor, shape: tuple[int, int], *, margin: float = 0.0) -> torch.Tensor:
    """1 where a cell centre of an (h, w) grid lies in the box grown by ``margin`` × its size per side."""
    h, w = shape
    y0, x0, y1, x1 = boxes.float().unbind(dim=1)
    grow_y, grow_x = (y1 - y0) * margin, (x1 - x0) * margin
    yc = _cell_centres(h, boxes.device)[None, :]
    xc = _cell_centres(w, boxes.device)[None, :]
    inside_y = (yc >= (y0 - grow_y)[:, None]) & (yc <= (y1 + grow_y)[:, None])
    inside_x = (xc >= (x0 - grow_x)[:, None]) & (xc <= (x1 + grow_x)[:, None])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()


def ring_weights(boxes: torch.Tensor, shape: tuple[int, int], *, margin: float = 0.5) -> torch.Tensor:
    """The band of cells around each box (the grown box minus the box): the target's local context."""
    return box_weights(boxes, shape, margin=margin) - box_weights(boxes, shape)


def gaussian_prior(
    boxes: torch.Tensor, shape: tuple[int, int], *, sigma_scale: float = 1.0, floor: float = 0.25
) -> torch.Tensor:
    """``floor + (1 - floor) · exp(-d²/2)`` around each box centre, with σ = ``sigma_scale`` × box size per axis."""
    h, w = shape
    y0, x0, y1, x1 = boxes.float().unbind(dim=1)
    min_sigma = 1.0 / max(h, w)
    sy = ((y1 - y0) * sigma_scale).clamp_min(min_sigma)[:, None]
    sx = ((x1 - x0) * sigma_scale).clamp_min(min_sigma)[:, None]
    dy = (_cell_centres(h, boxes.device)[None, :] - ((y0 + y1) / 2)[:, None]) / sy
    dx = (_cell_centres(w, boxes.device)[None, :] - ((x0 + x1) / 2)[:, None]) / sx
    gauss = torch.exp(-0.5 * (dy[:, :, None] ** 2 + dx[:, None, :] ** 2))
    return floor + (1.0 - floor) * gauss


def box_surrounds(
    boxes: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    *,
    margin: float = 0.5,
    sigma_scale: float = 1.0,
    floor: float = 0.25,
) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """``ring_weights`` and ``gaussian_prior`` of the same boxes on several grids at once: {shape: (ring, prior)}.

    Stage 3 needs both on every tapped grid of every batch, and computed grid by grid they cost
    more than the maps themselves (dozens of tiny operations each). Both are separable: a box is
    the product of a row and a column interval, the Gaussian the product of two 1-D Gaussians. So
    each axis is evaluated once over the cells of every grid together, and each grid then costs two
    batched outer products: ring = grown_y ⊗ grown_x − inside_y ⊗ inside_x, prior = floor +
    (1 − floor) · g_y ⊗ g_x.
    """
    shapes = list(dict.fromkeys(tuple(shape) for shape in shapes))
    if not shapes:
        return {}
    y0, x0, y1, x1 = boxes.float().unbind(dim=1)
    grown_y, inside_y, gauss_y = _axis_factors(y0, y1, [(h, max(h, w)) for h, w in shapes], margin, sigma_scale)
    grown_x, inside_x, gauss_x = _axis_factors(x0, x1, [(w, max(h, w)) for h, w in shapes], margin, sigma_scale)
    # per grid, (N, h, 2) @ (N, 2, w) gives the ring and (N, h, 1) @ (N, 1, w) the prior less its floor
    rows = torch.stack([grown_y, inside_y.neg_(), gauss_y.mul_(1.0 - floor)], dim=2)
    cols = torch.stack([grown_x, inside_x, gauss_x], dim=1)
    row_parts = rows.split([h for h, _ in shapes], dim=1)
    col_parts = cols.split([w for _, w in shapes], dim=2)
    surrounds = {}
    for shape, r, c in zip(shapes, row_parts, col_parts):
        ring = torch.bmm(r[..., :2], c[:, :2])
        prior = torch.bmm(r[..., 2:], c[:, 2:]).add_(floor)
        surrounds[shape] = ring, prior
    return surrounds


def _axis_factors(
    lo: torch.Tensor, hi: torch.Tensor, cells: list[tuple[int, int]], margin: float, sigma_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis, over the cells of several grids end to end: grown box, box and Gaussian, each (N, T).

    ``cells`` lists (cells on this axis, the grid's larger side) per grid; the larger side sets
    the smallest σ, as in ``gaussian_prior``.
    """
    centres, min_sigma = _axis_cells(tuple(cells), lo.device)
    lo, hi = lo[:, None], hi[:, None]
    grow = (hi - lo) * margin
    grown = ((centres >= lo - grow) & (centres <= hi + grow)).float()
    inside = ((centres >= lo) & (centres <= hi)).float()
    sigma = torch.maximum((hi - lo) * sigma_scale, min_sigma)
    gauss = torch.exp(-0.5 * ((centres - (lo + hi) / 2) / sigma) ** 2)
    return grown, inside, gauss


@functools.lru_cache(maxsize=64)
def _axis_cells(cells: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of several grids along one axis, end to end, and each cell's smallest σ."""
    centres = torch.cat([_cell_centres(n, device) for n, _ in cells])
    min_sigma = torch.cat([torch.full((n,), 1.0 / side, device=device) for n, side in cells])
    return centres, min_sigma


def stage1_map(features: torch.Tensor, *, prototype: torch.Tensor) -> torch.Tensor:
    """How much each position looks like the organ prototype."""
    return cosine_map(features, prototype)


def stage2_map(
    features: torch.Tensor, *, prototype: torch.Tensor, prompt: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """Similarity to ``alpha`` · prototype + (1 − ``alpha``) · prompt, both unit-normalised first.

    (N, C) references give (N, h, w); (N, K, C) give K maps per row, (N, K, h, w).
    """
    reference = alpha * normalise(prototype, dim=-1) + (1.0 - alpha) * normalise(prompt, dim=-1)
    return cosine_map(features, reference)


def stage3_map(
    features: torch.Tensor,
    *,
    prototype: torch.Tensor,
    prompt: Optional[torch.Tensor],
    global_image: torch.Tensor,
    context: torch.Tensor,
    prior: torch.Tensor,
    weights: Stage3Weights = Stage3Weights(),
) -> torch.Tensor:
    """Four-component score, mapped from [-1, 1] to [0, 1] and multiplied by the spatial ``prior``.

    The score Σ_k s_k · cos(f, r_k) equals f̂ · Σ_k s_k r̂_k, so the four unit references are
    combined first and each position needs one dot product, not four. (N, C) references with an
    (N, h, w) prior give (N, h, w); (N, K, C) with (N, K, h, w) give (N, K, h, w). ``prompt`` =
    None drops the prompt term, weight included, and keeps the three image components.
    """
    reference = (
        weights.prototype * normalise(prototype, dim=-1)
        - weights.global_image * normalise(global_image, dim=-1)
        - weights.context * normalise(context, dim=-1)
    )
    total = weights.total
    if prompt is None:
        total -= weights.prompt
    else:
        reference = reference + weights.prompt * normalise(prompt, dim=-1)
    unit = (projection_map(features, reference) / max(total, EPS) + 1.0) / 2.0
    return unit * prior
