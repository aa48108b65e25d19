"""One batch's raw saliency maps, layer by layer, from the taps of the pass that segments.

``explain_batch`` turns the model's feature taps into one raw map per layer and row, on each
layer's own grid, for the stage the config asks for (``maths.py`` holds the formulas). The sink
calls it once per batch and keeps only the maps, so no feature tensor outlives its batch.

Stages 2 and 3 compare features with the prompt embedding, so they need the layer in the joint
image–text space. A model offers that by listing ``joint_tap_names`` and mapping those taps with
``project_to_joint(name, features)`` (both families do it with the CLIP tower's own final norm and
projection: exact for the last block, an approximation for earlier ones). Every other layer, or
every layer of a model without text embeddings, has no prompt term: stage 2 falls back to stage 1,
stage 3 keeps its three image components and its prior (``stage3_without_text``), and the legend
says so.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from ..errors import InputError
from ..grid import compact_slice_shape
from .config import SaliencyConfig
from .maths import box_of, box_surrounds, region_mean, stage1_map, stage2_map, stage3_map

STACK_MAX_CELLS = 1024  # feature maps up to 32 × 32 are stacked with same-shaped layers and mapped at once


def explain_batch(
    output: Any,
    *,
    layers: Sequence[str],
    target: Any,
    config: SaliencyConfig = SaliencyConfig(),
    model: Any = None,
    images: Optional[int] = None,
    inside: Any = None,
) -> tuple[dict[str, Any], Any, dict[str, dict[str, Any]]]:
    """Raw per-layer maps for one forward pass: ``({layer: (N, h, w)}, has_target (N,), {layer: info})``.

    ``target`` holds (N, S, S) weights in [0, 1] on the model grid, one row per output row; rows
    without a target come back as zeros. ``model`` provides the joint-space projection
    (``joint_tap_names``, ``project_to_joint``) that stages 2 and 3 need. With ``images`` = B
    (rows prompt-major, N = P·B), the model's ``image_tap_names`` are the same for every prompt:
    they are projected once per image, and each image's features are compared with its P
    references at once instead of being copied P times.

    Rows without a target are skipped where that saves work: row-by-row taps (the decoder's, which
    can be large) are computed for the rows with a target only. Per-image taps are computed for
    every row and zeroed where there is no target: an image's features are compared with all its
    prompts at once anyway.

    ``inside`` (S, S) marks the image within the model square (1) against the padding that fits a
    non-square slice into it (0). Stage 3's global image feature is the mean over the image, and
    its context ring stays on the image: padding is not part of the slice. None: all image.
    """
    import torch
    import torch.nn.functional as F

    boxes, has_target = box_of(target)
    every = bool(has_target.all())
    target_rows = target.float()[:, None]
    prompt = None if output.text_embedding is None else output.text_embedding.float()
    joint = set(getattr(model, "joint_tap_names", ()) or ()) if hasattr(model, "project_to_joint") else set()
    image_taps = set(getattr(model, "image_tap_names", ()) or ())
    one_projection = bool(getattr(model, "joint_projection_shared", False))
    features_of: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    per_image_of: dict[str, bool] = {}
    text_of: dict[str, bool] = {}  # compared with the prompt embedding (joint space at stages 2, 3)
    # a tap that is the very tensor of an earlier one ("fused" is the last decoder stage) shares its map
    aliases: dict[str, str] = {}
    first_of: dict[tuple[int, int, bool, bool], str] = {}
    for name in layers:
        if name not in output.taps:
            raise InputError(f"the model returned no feature tap {name!r}; it returned {sorted(output.taps)}")
        tap = output.taps[name]
        stage, space, note = config.stage, "layer features", None
        text = stage > 1 and prompt is not None and name in joint
        if stage > 1 and not text:
            reason = "this layer cannot be mapped into the text space"
            if prompt is None:
                reason = "no prompt embedding from this model"
            if stage == 3 and config.stage3_without_text == "image-terms":
                note = f"{reason}: stage 3 without its prompt term (prototype, global image, context, prior)"
            else:
                stage, note = 1, f"{reason}: stage 1 used"
        shared = images is not None and name in image_taps and tap.shape[0] % images == 0
        same = first_of.setdefault((id(tap), stage, text, shared), name)
        if same != name:
            aliases[name], info[name] = same, info[same]
            continue
        if text:
            space = "joint image-text space (model projection)"
        per_image_of[name] = shared
        text_of[name] = text
        features_of[name] = (tap[:images] if shared else tap).float()  # projected per group, below
        info[name] = {"stage": stage, "space": space, "feature_shape": None, "note": note}

    # Layers with the same stage and small feature maps of one shape (the ViT blocks, typically) are
    # stacked along the batch and mapped in one go; large maps are mapped one by one. Taps in the
    # text space are stacked only where the model maps them all with one projection
    # (``joint_projection_shared``), which then runs once on the stack.
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, features in features_of.items():
        key = (info[name]["stage"], text_of[name], per_image_of[name]) + tuple(features.shape[1:])
        large = features.shape[-2] * features.shape[-1] > STACK_MAX_CELLS  # copying it costs more than a call
        if large or (text_of[name] and not one_projection):
            key = key[:3] + (name,) + key[3:]
        groups.setdefault(key, []).append(name)
    pooled: dict[tuple[int, int], Any] = {}  # the target on each feature grid, shared by same-sized taps
    # stage 3's share of image (not padding) per cell, once per grid like the target
    image_on: dict[tuple[int, int], Any] = {}
    pool_image = inside is not None and any(key[0] == 3 for key in groups)
    for shape in sorted({key[-2:] for key in groups}, key=lambda hw: -hw[0] * hw[1]):  # finest first
        pooled[shape] = _pool(target_rows, shape, pooled)
        if pool_image:
            image_on[shape] = _pool(inside.float()[None, None], shape, image_on)
    rows = None if every else has_target.nonzero().squeeze(1)
    maps: dict[str, Any] = {}
    # stage 3's context ring and prior depend on the targets' boxes and the grid only: every row's, on
    # every grid at once, then per layer group the rows it maps
    rings_and_priors = box_surrounds(
        boxes,
        [key[-2:] for key in groups if key[0] == 3],
        margin=config.ring_margin,
        sigma_scale=config.sigma_scale,
        floor=config.prior_floor,
    )
    surrounds: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}
    for (stage, text, per_image, *_, h, w), names in groups.items():
        k = len(names)
        # Per image the work is one image's features whatever the prompts, so every row is kept;
        # row by row, only the rows with a target are computed (a decoder map can be large).
        gather = rows is not None and not per_image
        chosen = [features_of[n][rows] if gather else features_of[n] for n in names]
        features = torch.cat(chosen) if k > 1 else chosen[0]
        if text:  # stacked taps share the model's one projection: one call, not k
            features = model.project_to_joint(names[0], features).float()
        for name in names:
            info[name]["feature_shape"] = list(features.shape[1:])

        def own_rows(x: Any) -> Any:
            """This group's rows of a per-row tensor: those with a target, or per image (B, P, ...)."""
            if x is None:
                return None
            x = x[rows] if gather else x
            return _by_image(x, images) if per_image else x  # prompt-major rows (P·B, ...) -> (B, P, ...)

        weights, row_prompt = own_rows(pooled[(h, w)]), own_rows(prompt if text else None)

        def stacked(x: Any) -> Any:
            return x if k == 1 or x is None else x.repeat(k, *([1] * (x.ndim - 1)))

        surround = None
        if stage == 3:  # shared by the layers on one grid with the same rows
            key = (h, w, per_image, gather)
            if key not in surrounds:
                ring, prior = (own_rows(x) for x in rings_and_priors[(h, w)])
                image = image_on[(h, w)][0] if pool_image else None
                surrounds[key] = _surround(weights, ring, prior, image)
            surround = tuple(stacked(x) for x in surrounds[key])
        raw = _layer_map(
            features, stage=stage, weights=stacked(weights), prompt=stacked(row_prompt), config=config,
            surround=surround,
        )
        for name, part in zip(names, raw.chunk(k)):
            if per_image:  # (B, P, h, w) -> prompt-major (P·B, h, w)
                part = part.transpose(0, 1).reshape(-1, h, w)
            if max(h, w) > config.max_map_size:
                part = F.adaptive_avg_pool2d(part[:, None], compact_slice_shape((h, w), config.max_map_size))[:, 0]
            if gather:  # back to every row, zeros where there is no target
                full = part.new_zeros((len(has_target),) + tuple(part.shape[1:]))
                full[rows] = part
                part = full
            elif not every:
                part = torch.where(has_target[:, None, None], part, 0.0)
            maps[name] = part
    return {name: maps[aliases.get(name, name)] for name in layers}, has_target, info


def _by_image(x: Any, images: int) -> Any:
    """Prompt-major rows (P·B, ...) as (B, P, ...): each image with its P prompts' rows."""
    if x is None:
        return None
    return x.reshape((-1, images) + tuple(x.shape[1:])).transpose(0, 1)


def _pool(target: Any, shape: tuple[int, int], pooled: dict[tuple[int, int], Any]) -> Any:
    """The (N, 1, S, S) target averaged onto an ``shape`` grid, from the finest pooled grid that divides into it.

    Block means of block means over equal blocks are the block means: pooling 64×64 down to 8×8
    reads 16× less than pooling the 128×128 target again.
    """
    import torch.nn.functional as F

    sources = [(tuple(t.shape[-2:]), t[:, None]) for t in pooled.values()] + [(tuple(target.shape[-2:]), target)]
    fits = [(h, w, t) for (h, w), t in sources if h % shape[0] == 0 and w % shape[1] == 0]
    if not fits:
        return F.adaptive_avg_pool2d(target, shape)[:, 0]
    h, w, source = min(fits, key=lambda fit: fit[0] * fit[1])
    if (h, w) == (2 * shape[0], 2 * shape[1]):  # four strided sums: ~6× faster than avg_pool2d's 2×2 on CPU
        pairs = source[..., 0::2, :] + source[..., 1::2, :]
        return (pairs[..., 0::2] + pairs[..., 1::2]).mul_(0.25)[:, 0]
    return F.avg_pool2d(source, (h // shape[0], w // shape[1]))[:, 0]


def _layer_map(
    features: Any, *, stage: int, weights: Any, prompt: Any, config: SaliencyConfig, surround: Any = None
) -> Any:
    """One layer's raw map for rows that all have a target; ``weights`` is the target on this grid.

    Row by row: features (N, C, h, w), weights (N, h, w), prompt (N, C) → (N, h, w). Per image:
    features (B, C, h, w), weights (B, P, h, w), prompt (B, P, C) → (B, P, h, w). Stage 3 takes
    its regions and prior on this grid from ``_surround``, and drops its prompt term when
    ``prompt`` is None.
    """
    import torch

    if stage == 1:
        return stage1_map(features, prototype=region_mean(features, weights))
    if stage == 2:
        return stage2_map(features, prototype=region_mean(features, weights), prompt=prompt, alpha=config.alpha)
    regions, has_ring, prior = surround
    rows = weights.ndim == 3  # row by row is per image with one prompt each
    if rows and prompt is not None:
        prompt = prompt[:, None]
    b, k = prior.shape[:2]
    # the K targets, the K rings and the whole image (one global mean shared by the prompts), in one pass
    means = region_mean(features, regions)
    prototype, context, global_image = means[:, :k], means[:, k : 2 * k], means[:, 2 * k :].expand(b, k, -1)
    context = torch.where(has_ring, context, global_image)
    maps = stage3_map(
        features,
        prototype=prototype,
        prompt=prompt,
        global_image=global_image,
        context=context,
        prior=prior,
        weights=config.weights,
    )
    return maps[:, 0] if rows else maps


def _surround(weights: Any, ring: Any, prior: Any, image: Any = None) -> tuple[Any, Any, Any]:
    """Stage 3's regions on one grid: (targets, rings, whole image) weights, which rings are non-empty, the prior.

    Row by row: weights, ring and prior (N, h, w); per image: (B, P, h, w). Shapes come back per
    image: (B, 2P + 1, h, w), (B, P, 1) and (B, P, h, w), with P = 1 row by row. ``image`` (h, w)
    is each cell's share of the image, not the padding (None: every cell is image).
    """
    import torch

    if weights.ndim == 3:
        weights, ring, prior = weights[:, None], ring[:, None], prior[:, None]
    whole = torch.ones_like(ring[:, :1]) if image is None else image.expand_as(ring[:, :1])
    if image is not None:
        ring = ring * image
    regions = torch.cat([weights, ring, whole], dim=1)
    return regions, (ring.sum(dim=(-2, -1)) > 0)[..., None], prior
