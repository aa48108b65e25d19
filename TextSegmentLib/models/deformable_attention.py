"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch.

Each query looks at a few learned points around its reference point on every feature level instead
of at every pixel, so attention over a 96² + 48² + 24² pyramid stays linear in the number of
queries. The sampling is ``F.grid_sample``, not the compiled CUDA kernel of the original code: it
runs on any device PyTorch runs on, is differentiable, and keeps the package free of C extensions.

Conventions: locations are normalised ``(x, y)`` in ``[0, 1]`` with pixel centres at
``(i + 0.5) / size`` (``align_corners=False``); points outside a level read zeros.
``spatial_shapes`` are small ``(L, 2)`` long tensors of ``(h, w)`` kept on the CPU, so reading
them never waits for the GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def flatten_levels(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[(B, C, h_l, w_l)]`` → tokens ``(B, Σ h_l·w_l, C)`` and ``spatial_shapes`` ``(L, 2)`` as ``(h, w)``."""
    shapes = torch.tensor([tuple(f.shape[-2:]) for f in features], dtype=torch.long)
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    return tokens, shapes


def unflatten_levels(tokens: torch.Tensor, spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of ``flatten_levels``: ``(B, N, C)`` → ``[(B, C, h_l, w_l)]``."""
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    return [
        chunk.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], int(h), int(w))
        for chunk, (h, w) in zip(tokens.split(sizes, dim=1), spatial_shapes.tolist())
    ]


def level_reference_points(
    spatial_shapes: torch.Tensor, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel centres of every level, normalised to ``[0, 1]`` as ``(x, y)``: ``(Σ h·w, 2)``."""
    points = []
    for h, w in spatial_shapes.tolist():
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
    return torch.cat(points, dim=0)


def deformable_sample(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The core of deformable attention: bilinear reads at given points, weighted and summed.

    ``value`` (B, N, H, Dh) per head; ``sampling_locations`` (B, Q, H, L, P, 2) in ``[0, 1]``;
    ``attention_weights`` (B, Q, H, L, P) → (B, Q, H·Dh).

    Each level's samples are weighted and summed as soon as they are read, so the working memory
    is one level's samples, not all levels' samples plus their concatenation and product (about
    20 MB less at the peak of a tgcnet-tiny run at two images per call, docs/performance.md).
    The samples are read points-major, (B·H, Dh, P, Q), so weighting and summing the P points run
    along the long, contiguous query axis: with queries-major samples (…, Q, P), summing four
    innermost values made the whole call 1.7× slower on the CPU (``bench/cpu_kernels.py``).
    Without autograd each point's weighted samples are added into one running sum (``addcmul_``)
    instead of being multiplied out and summed; with autograd the product-and-sum stays, since
    the in-place sum's backward pass costs more than it saves.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2.0 * sampling_locations - 1.0
    weights = attention_weights.permute(0, 2, 3, 4, 1).reshape(batch * heads, 1, levels, points, queries)
    out = None
    for level, (value_level, (h, w)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes.tolist())):
        value_level = value_level.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, int(h), int(w))
        grid = grids[:, :, :, level].permute(0, 2, 3, 1, 4).reshape(batch * heads, points, queries, 2)
        sampled = F.grid_sample(value_level, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # (B·H, Dh, P, Q) · (B·H, 1, P, Q), summed over P → (B·H, Dh, Q)
        if torch.is_grad_enabled() and (sampled.requires_grad or weights.requires_grad):
            part = (sampled * weights[:, :, level]).sum(2)
            out = part if out is None else out + part
            continue
        for point in range(points):
            if out is None:
                out = sampled[:, :, point] * weights[:, :, level, point]
            else:
                out.addcmul_(sampled[:, :, point], weights[:, :, level, point])
    return out.reshape(batch, heads * head_dim, queries).transpose(1, 2)


def sampling_locations(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: torch.Tensor
) -> torch.Tensor:
    """Reference + offset / level size: (B, Q, L, 2) in [0, 1] and (B, Q, H, L, P, 2) in pixels → (B, Q, H, L, P, 2).

    (level, point, axis) are flattened into one contiguous axis of L·P·2 first: broadcasting over
    an innermost axis of 2 ran ~7× slower on the CPU.
    """
    batch, queries, heads, levels, points, _ = offsets.shape
    size_xy = spatial_shapes.flip(-1).to(device=offsets.device, dtype=offsets.dtype)  # (L, 2) as (w, h)
    per_offset = size_xy[:, None, :].expand(levels, points, 2).reshape(-1)
    start = reference_points[:, :, :, None, :].expand(batch, queries, levels, points, 2).reshape(batch, queries, 1, -1)
    return (offsets.reshape(batch, queries, heads, -1) / per_offset + start).view(offsets.shape)


class MultiScaleDeformableAttention(nn.Module):
    """Queries attend to ``num_points`` learned locations per head and level around a reference point.

    Offsets are predicted from the query and measured in pixels of each level; they start on a
    ring of directions (one per head, as in Deformable DETR) so the heads look in different
    directions from the first step, and the attention weights start uniform.
    """

    def __init__(self, dim: int, *, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        ring = directions[:, None, None, :].repeat(1, self.num_levels, self.num_points, 1)
        ring = ring * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
    ) -> torch.Tensor:
        """``query`` (B, Q, C), ``reference_points`` (B, Q, 2) or (B, Q, L, 2) in ``[0, 1]``,
        ``value`` (B, Σ h·w, C) flattened levels of ``spatial_shapes`` (L, 2) → (B, Q, C)."""
        batch, queries, _ = query.shape
        levels = int(spatial_shapes.shape[0])
        if levels != self.num_levels:
            raise ValueError(f"expected {self.num_levels} value levels, got {levels}")
        heads, points = self.num_heads, self.num_points
        value = self.value_proj(value).view(batch, value.shape[1], heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        if reference_points.dim() == 3:
            reference_points = reference_points[:, :, None, :].expand(batch, queries, levels, 2)
        locations = sampling_locations(reference_points, offsets, spatial_shapes)
        return self.output_proj(deformable_sample(value, spatial_shapes, locations, weights))
