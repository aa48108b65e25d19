"""Saliency as an engine features sink: per-layer maps from the taps of the pass that segments.

``segment(..., features_sink=build_saliency_sink(model=model, stage=2))`` asks the model for the
chosen feature taps, turns every batch's taps into one raw similarity map per layer right away
(so no feature tensor outlives its batch), and at the end rescales each layer over the whole
volume, samples it over the input's extent (on the compact grid of ``grid.py`` by default, or on
the input's own voxel grid) and encodes it in uint8 or float16. ``run.features`` is then a
``SaliencyResult``: per prompt, one ``Volume`` per layer plus the combined map, and a legend.

The target every stage is relative to is, per slice, the model's own predicted mask (probability
≥ ``threshold``) unless a ROI (a box or a mask on the input grid) is given. A slice without a
target has nothing to explain and gets a zero map; the legend counts the slices that had one.

Stages 2 and 3 compare features with the prompt embedding, so they need the layer in the joint
image–text space. A model offers that by listing ``joint_tap_names`` and mapping those taps with
``project_to_joint(name, features)`` (both families do it with the CLIP tower's own final norm and
projection: exact for the last block, an approximation for earlier ones). Every other layer, or
every layer of a model without text embeddings, has no prompt term: stage 2 falls back to stage 1,
stage 3 keeps its three image components and its prior (``stage3_without_text``), and the legend
says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..volume import Volume
from ..grid import GRIDS, compact_plan, compact_slice_shape, on_grid_of, over_extent
from .maths import (
    Stage3Weights,
    box_of,
    box_surrounds,
    percentiles,
    region_mean,
    robust_rescale,
    stage1_map,
    stage2_map,
    stage3_map,
)

log = logging.getLogger(__name__)

COMBINED = "combined"
ENCODINGS = ("uint8", "float16")
STAGE3_WITHOUT_TEXT = ("image-terms", "stage-1")
STACK_MAX_CELLS = 1024  # feature maps up to 32 × 32 are stacked with same-shaped layers and mapped at once
FINISH_CHUNK = 32  # slices brought to the source grid at once: bounds the float32 working memory
METHOD = "gradient-free cosine similarity (Stage 1 prototype / 2 prototype+prompt / 3 four-component)"
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # inclusive (i, j, k) voxel index ranges
Roi = Union[Volume, Box, None]


@dataclass(frozen=True)
class SaliencyConfig:
    """Everything that shapes the maps; the defaults are those of docs/explainability.md."""

    stage: int = 1
    alpha: float = 0.5  # stage 2: weight of the prototype against the prompt
    weights: Stage3Weights = Stage3Weights()
    sigma_scale: float = 1.0  # stage 3: Gaussian σ as a multiple of the box size
    prior_floor: float = 0.25  # stage 3: the prior never drops below this far from the target
    ring_margin: float = 0.5  # stage 3: context ring width as a multiple of the box size
    low_percentile: float = 1.0
    high_percentile: float = 99.0
    threshold: float = 0.5  # predicted-mask threshold when no ROI is given
    encoding: str = "uint8"
    combine: bool = True
    max_map_size: int = 128  # finer maps are area-pooled to this before being kept
    # "compact": in-plane at most max_map_size voxels over the input's extent (grid.py says why: 16×
    # fewer voxels at 512², no detail lost; slices up to that size keep their grid); "source": the
    # input's own voxel grid
    grid: str = "compact"
    # stage 3 on a layer with no text-space projection: keep prototype, global image, context and
    # prior and drop only the prompt term ("image-terms"), or fall back to stage 1 ("stage-1")
    stage3_without_text: str = "image-terms"

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise InputError(f"saliency stage must be 1, 2 or 3, got {self.stage!r}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"saliency encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.grid not in GRIDS:
            raise InputError(f"saliency grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.stage3_without_text not in STAGE3_WITHOUT_TEXT:
            raise InputError(
                f"stage3_without_text must be one of {', '.join(STAGE3_WITHOUT_TEXT)}, got {self.stage3_without_text!r}"
            )
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise InputError("saliency percentiles need 0 <= low < high <= 100")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"saliency threshold must lie strictly between 0 and 1, got {self.threshold}")


@dataclass
class PromptSaliency:
    """One prompt's maps: ``maps[layer]`` is a ``Volume`` over the input (on its grid unless the
    config asked for the compact grid), ``legend[layer]`` says how to read it."""

    prompt: str
    maps: dict[str, Volume]
    legend: dict[str, dict[str, Any]]
    target_slices: int
    source_shape: Optional[tuple[int, int, int]] = None  # the input's grid, where it differs from the maps'

    @property
    def layers(self) -> list[str]:
        return list(self.maps)

    def values(self, layer: str) -> np.ndarray:
        """The map of ``layer`` decoded to float32 in [0, 1], on the input's voxel grid."""
        array = self.maps[layer].array
        values = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        return values if self.source_shape is None else on_grid_of(values, self.source_shape)


@dataclass
class SaliencyResult:
    """What the sink hands back as ``run.features``."""

    prompts: list[PromptSaliency]
    stage: int
    layers: tuple[str, ...]
    seconds: float  # spent on saliency alone (per-batch maps + finishing), not on the forward pass
    slices: int
    config: SaliencyConfig = field(default_factory=SaliencyConfig)

    def __getitem__(self, key: Union[int, str]) -> PromptSaliency:
        if isinstance(key, int):
            return self.prompts[key]
        for item in self.prompts:
            if item.prompt == key:
                return item
        raise KeyError(key)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class _Kept:
    """The raw maps of one prompt's slices that had a target, for one fit (in practice one per volume)."""

    indices: list[np.ndarray] = field(default_factory=list)
    maps: dict[str, list[Any]] = field(default_factory=dict)  # layer -> [(n, h, w) float16 CPU tensors]


def build_saliency_sink(
    *,
    model: Any,
    layers: Union[str, Sequence[str], None] = None,
    stage: int = 1,
    roi: Roi = None,
    threshold: float = 0.5,
    encoding: str = "uint8",
    grid: str = "compact",
    config: Optional[SaliencyConfig] = None,
) -> "SaliencySink":
    """A features sink for ``segment(...)``; ``layers`` defaults to the model's ``saliency_layers``.

    ``layers`` may be a comma-separated string ("vit.3,vit.11"); ``roi`` is a mask ``Volume`` on the
    input grid or an inclusive voxel box ``((i0, i1), (j0, j1), (k0, k1))``. ``config`` overrides
    the other options when given. ``grid`` "source" stores the maps on the input's voxel grid
    instead of the compact grid over its extent (``grid.py``).
    """
    config = config or SaliencyConfig(stage=stage, threshold=threshold, encoding=encoding, grid=grid)
    if isinstance(layers, str):
        layers = [name.strip() for name in layers.split(",") if name.strip()]
    if layers is None:
        layers = getattr(model, "saliency_layers", ()) or True
    names = model.resolve_taps(layers if layers is True else list(layers))
    if not names:
        raise InputError("no saliency layers: this model exposes no feature taps, or --layers was empty")
    return SaliencySink(layers=names, config=config, roi=roi)


def explain(
    volume: Volume,
    prompts: Union[str, Sequence[str]],
    *,
    model: Any,
    layers: Union[str, Sequence[str], None] = None,
    stage: int = 1,
    roi: Roi = None,
    config: Optional[SaliencyConfig] = None,
    **segment_options: Any,
) -> Any:
    """Segment ``prompts`` and explain them from the same forward pass; ``run.features`` is the ``SaliencyResult``.

    ``segment_options`` go to ``engine.segment`` (device, batch_size, axis, threshold, progress, ...).
    """
    from ..engine import segment

    threshold = segment_options.get("threshold", 0.5)
    sink = build_saliency_sink(
        model=model,
        layers=layers,
        stage=stage,
        roi=roi,
        config=config or SaliencyConfig(stage=stage, threshold=threshold),
    )
    return segment(volume, prompts, model=model, features_sink=sink, **segment_options)


class SaliencySink:
    """The engine's features sink (``taps``, ``begin``, ``consume``, ``finish``); see the module docstring."""

    def __init__(self, *, layers: Sequence[str], config: SaliencyConfig = SaliencyConfig(), roi: Roi = None) -> None:
        self.taps = tuple(layers)
        self.config = config
        self.roi = roi
        self._seconds = 0.0

    # engine protocol --------------------------------------------------------------------------
    def begin(self, *, volume: Volume, plan: Any, prompts: Sequence[str], model: Any) -> None:
        self._volume, self._plan, self._prompts = volume, plan, list(prompts)
        self._size = int(model.image_size)
        self._device = model.device
        self._model = model
        self._target_slices = None if self.roi is None else plan.extract(_roi_mask(self.roi, volume))
        self._kept: dict[tuple[int, Any], _Kept] = {}  # (prompt index, fit) -> maps of slices with a target
        self._layer_info: dict[str, dict[str, Any]] = {}
        self._seconds = 0.0

    def consume(self, *, indices: np.ndarray, prompt_rows: Any, output: Any, fit: Any) -> None:
        import torch

        started = time.perf_counter()
        n_prompts, n_images = len(self._prompts), len(indices)
        if int(prompt_rows.shape[0]) != n_prompts * n_images:
            raise ValueError(f"expected {n_prompts} × {n_images} rows, got {int(prompt_rows.shape[0])}")
        with torch.inference_mode():
            target = self._target(output, indices, fit, n_prompts)
            maps, has_target, info = explain_batch(
                output, layers=self.taps, target=target, config=self.config, model=self._model, images=n_images
            )
            has_target = has_target.cpu().numpy().reshape(n_prompts, n_images)
            maps = {name: m.to("cpu", torch.float16) for name, m in maps.items()}
            for p in np.flatnonzero(has_target.any(axis=1)):
                kept = self._kept.setdefault((int(p), fit), _Kept())
                kept.indices.append(np.asarray(indices)[has_target[p]])
                if has_target[p].all():  # the common case: a contiguous block of rows, no gather
                    rows: Any = slice(p * n_images, (p + 1) * n_images)
                else:
                    rows = torch.from_numpy(np.flatnonzero(has_target[p]) + p * n_images)
                for name, m in maps.items():
                    kept.maps.setdefault(name, []).append(m[rows])
        self._layer_info.update(info)
        self._seconds += time.perf_counter() - started

    def finish(self) -> SaliencyResult:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            resamplers: dict[tuple[Any, tuple[int, ...]], Any] = {}  # (fit, map size) -> matrices, shared by prompts
            prompts = [self._finish_prompt(p, resamplers) for p in range(len(self._prompts))]
        self._kept, self._model = {}, None
        self._seconds += time.perf_counter() - started
        return SaliencyResult(
            prompts=prompts,
            stage=self.config.stage,
            layers=self.taps,
            seconds=self._seconds,
            slices=self._plan.num_slices,
            config=self.config,
        )

    # internals --------------------------------------------------------------------------------
    def _target(self, output: Any, indices: np.ndarray, fit: Any, n_prompts: int) -> Any:
        """(P·B, S, S) target weights in [0, 1] on the model grid, rows prompt-major like the model's."""
        import torch

        from ..preprocess.resize import fit_to_square

        if self._target_slices is None:  # sigmoid(logit) >= t  <=>  logit >= log(t / (1 - t))
            cut = math.log(self.config.threshold / (1.0 - self.config.threshold))
            logits = output.logits[:, 0]
            target = logits.new_zeros(logits.shape, dtype=torch.float32)
            target[:, fit.crop[0], fit.crop[1]] = (logits[:, fit.crop[0], fit.crop[1]] >= cut).float()
            return target
        slices = torch.from_numpy(self._target_slices[indices].astype(np.float32))
        fitted, _ = fit_to_square(slices, size=self._size, pixel_spacing=self._plan.pixel_spacing, mode="linear")
        return fitted.clamp(0.0, 1.0).to(output.logits.device).repeat(n_prompts, 1, 1)

    def _finish_prompt(self, p: int, resamplers: dict[tuple[Any, tuple[int, ...]], Any]) -> PromptSaliency:
        """Rescale each layer over the volume, sample it onto the stored grid's slices, encode; chunk by chunk."""
        import torch

        config, plan = self.config, self._plan
        groups = [(fit, kept) for (q, fit), kept in self._kept.items() if q == p]
        merged = [
            (fit, np.concatenate(kept.indices), {n: torch.cat(kept.maps[n]) for n in self.taps}) for fit, kept in groups
        ]
        bounds = {
            name: _bounds(
                torch.cat([maps[name].reshape(-1) for _, _, maps in merged]) if merged else torch.zeros(0), config
            )
            for name in self.taps
        }
        names = list(self.taps) + ([COMBINED] if config.combine else [])
        stored_plan = self._stored_plan()  # the source grid, or the compact one over the same extent
        # numpy's zeros come from calloc: pages are mapped as slices are written, at half the cost of
        # torch.zeros filling them first (a 512² volume's ten maps per prompt are ~60 MB).
        stacks = {name: torch.from_numpy(np.zeros(stored_plan.shape, dtype=config.encoding)) for name in names}
        # The plan's flips are folded into the resampling matrices (rows, columns) and into where
        # each slice is stored, so the stacks come out in the volume's own order and need no
        # flipped copy at the end; only a transposing plan (coronal or sagittal slicing) needs one.
        row_flip, col_flip = plan.flips[1], plan.flips[2]
        unflipped = dataclasses.replace(stored_plan, flips=(False, False, False))
        # Encoding is affine (uint8: 255·v + 0.5, then truncation rounds) and bilinear weights sum to
        # one, so it is applied to the small maps before resampling. The combined map (the mean of
        # the layers) is resampled in one product: Σ_g R_g (S_g C_gᵀ) = [R_1 … R_G] · [S_1 C_1ᵀ; …],
        # with S_g the sum of group g's small maps, rather than as a sum of full-size maps.
        scale, offset = (255.0, 0.5) if config.encoding == "uint8" else (1.0, 0.0)
        # Each layer's chunk is resampled into one reused float32 buffer and encoded from there: the
        # working memory is one chunk of one layer, and it stays in cache (~10 % faster than fresh
        # (chunk, layers, H, W) products).
        scratch = torch.empty((FINISH_CHUNK,) + tuple(stored_plan.shape[1:]), device=self._device)
        for fit, indices, maps in merged:
            same_size: dict[tuple[int, ...], list[str]] = {}  # layers on one grid share one resampling
            for name in self.taps:
                same_size.setdefault(tuple(maps[name].shape[1:]), []).append(name)
            for shape in same_size:
                if (fit, shape) not in resamplers:
                    rows, cols = source_weights(fit, shape, out_shape=stored_plan.shape[1:], device=self._device)
                    resamplers[fit, shape] = (rows.flip(0) if row_flip else rows, cols.flip(0) if col_flip else cols)
            stored = plan.num_slices - 1 - indices if plan.flips[0] else indices
            for start in range(0, len(indices), FINISH_CHUNK):
                chunk: Any = stored[start : start + FINISH_CHUNK]
                on_source = scratch[: len(chunk)]
                if len(chunk) > 1 and np.all(np.diff(chunk) == 1):  # consecutive slices: a view, not a gather
                    chunk = slice(int(chunk[0]), int(chunk[-1]) + 1)
                tall, wide = [], []  # the combined map's factors, one block per group
                for shape, group in same_size.items():
                    units = [  # (n, h, w) in [0, 1], one per layer
                        robust_rescale(maps[name][start : start + FINISH_CHUNK].to(self._device), bounds=bounds[name])
                        for name in group
                    ]
                    if config.combine:
                        rows, cols = resamplers[fit, shape]
                        tall.append(rows)
                        wide.append(sum(units) @ (cols.T * (scale / len(self.taps))))
                    for name, unit in zip(group, units):
                        to_source(unit * scale + offset, resamplers[fit, shape], out=on_source)
                        _store(stacks[name], chunk, on_source)
                if config.combine:
                    combined = torch.matmul(torch.cat(tall, dim=1), torch.cat(wide, dim=1), out=on_source)
                    _store(stacks[COMBINED], chunk, combined.add_(offset))

        target_slices = int(sum(len(indices) for _, indices, _ in merged))
        prompt = self._prompts[p]
        maps, legend = {}, {}
        for name in names:
            meta = {"prompt": prompt, "saliency_layer": name}
            maps[name] = over_extent(self._volume, unflipped.restore(stacks[name].numpy()), metadata=meta)
            legend[name] = self._legend(name, bounds.get(name), target_slices)
        compact = stored_plan.source_shape != plan.source_shape
        return PromptSaliency(prompt=prompt, maps=maps, legend=legend, target_slices=target_slices,
                              source_shape=plan.source_shape if compact else None)

    def _stored_plan(self) -> Any:
        """The slice plan of the grid the maps are stored on: the input's, or its compact twin."""
        if self.config.grid == "source":
            return self._plan
        return compact_plan(self._plan, self.config.max_map_size)

    def _legend(self, name: str, bounds: Optional[tuple[float, float]], target_slices: int) -> dict[str, Any]:
        config = self.config
        encoding = (
            "uint8: value = stored / 255, in [0, 1]" if config.encoding == "uint8" else "float16: value in [0, 1]"
        )
        entry: dict[str, Any] = {
            "layer": name,
            "encoding": encoding,
            "target": _describe_target(self.roi, config.threshold),
            "slices_with_target": target_slices,
            "stage_requested": config.stage,
            "grid": "the input's voxel grid" if config.grid == "source" else (
                f"compact: in-plane at most {config.max_map_size} voxels over the input's extent"),
        }
        if name == COMBINED:
            entry.update(method="mean of the per-layer maps", layers=list(self.taps))
            return entry
        info = self._layer_info.get(name, {"stage": config.stage, "space": "layer features"})
        entry.update(
            method=METHOD,
            stage=info["stage"],
            space=info["space"],
            feature_shape=info.get("feature_shape"),
            bounds=None if bounds is None else [round(bounds[0], 6), round(bounds[1], 6)],
            rescale=f"{config.low_percentile}th–{config.high_percentile}th percentile over the volume → 0–1",
        )
        if info.get("note"):
            entry["note"] = info["note"]
        return entry


def explain_batch(
    output: Any,
    *,
    layers: Sequence[str],
    target: Any,
    config: SaliencyConfig = SaliencyConfig(),
    model: Any = None,
    images: Optional[int] = None,
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
    """
    import torch
    import torch.nn.functional as F

    boxes, has_target = box_of(target)
    every = bool(has_target.all())
    target_rows = target.float()[:, None]
    prompt = None if output.text_embedding is None else output.text_embedding.float()
    joint = set(getattr(model, "joint_tap_names", ()) or ()) if hasattr(model, "project_to_joint") else set()
    image_taps = set(getattr(model, "image_tap_names", ()) or ())
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
        features = (tap[:images] if shared else tap).float()
        if text:
            features = model.project_to_joint(name, features).float()
            space = "joint image-text space (model projection)"
        per_image_of[name] = shared
        text_of[name] = text
        features_of[name] = features
        info[name] = {"stage": stage, "space": space, "feature_shape": list(features.shape[1:]), "note": note}

    # Layers with the same stage and small feature maps of one shape (the ViT blocks, typically) are
    # stacked along the batch and mapped in one go; large maps are mapped one by one.
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, features in features_of.items():
        key = (info[name]["stage"], text_of[name], per_image_of[name]) + tuple(features.shape[1:])
        if features.shape[-2] * features.shape[-1] > STACK_MAX_CELLS:  # copying it costs more than a call
            key = key[:3] + (name,) + key[3:]
        groups.setdefault(key, []).append(name)
    pooled: dict[tuple[int, int], Any] = {}  # the target on each feature grid, shared by same-sized taps
    for shape in sorted({key[-2:] for key in groups}, key=lambda hw: -hw[0] * hw[1]):  # finest first
        pooled[shape] = _pool(target_rows, shape, pooled)
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
        weights, row_prompt = pooled[(h, w)], prompt if text else None
        if gather:
            weights = weights[rows]
            row_prompt = None if row_prompt is None else row_prompt[rows]
        if per_image:  # prompt-major rows (P·B, ...) -> (B, P, ...)
            weights, row_prompt = _by_image(weights, images), _by_image(row_prompt, images)

        def stacked(x: Any) -> Any:
            return x if k == 1 or x is None else x.repeat(k, *([1] * (x.ndim - 1)))

        surround = None
        if stage == 3:  # shared by the layers on one grid with the same rows
            key = (h, w, per_image, gather)
            if key not in surrounds:
                ring, prior = rings_and_priors[(h, w)]
                if gather:
                    ring, prior = ring[rows], prior[rows]
                if per_image:
                    ring, prior = _by_image(ring, images), _by_image(prior, images)
                surrounds[key] = _surround(weights, ring, prior)
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


def _surround(weights: Any, ring: Any, prior: Any) -> tuple[Any, Any, Any]:
    """Stage 3's regions on one grid: (targets, rings, whole image) weights, which rings are non-empty, the prior.

    Row by row: weights, ring and prior (N, h, w); per image: (B, P, h, w). Shapes come back per
    image: (B, 2P + 1, h, w), (B, P, 1) and (B, P, h, w), with P = 1 row by row.
    """
    import torch

    if weights.ndim == 3:
        weights, ring, prior = weights[:, None], ring[:, None], prior[:, None]
    regions = torch.cat([weights, ring, torch.ones_like(ring[:, :1])], dim=1)
    return regions, (ring.sum(dim=(-2, -1)) > 0)[..., None], prior


def source_weights(
    fit: Any, shape: tuple[int, int], *, out_shape: Optional[tuple[int, int]] = None, device: Any = "cpu"
) -> tuple[Any, Any]:
    """Bilinear resampling matrices (H, h) and (W, w) from an (h, w) map over the model square to the source slice.

    ``out_shape`` (H, W) samples the source slice's extent on a grid of its own (the compact grid);
    by default the source slice's own pixels.

    A map of any resolution covers the whole fitted square; source pixel centres land inside its
    unpadded part. Each row holds the two weights of the neighbouring cells (sum 1, edge cells
    repeated past the border), exactly ``grid_sample(..., "bilinear", padding_mode="border",
    align_corners=False)``, but separable: two small matrix products instead of a gather per pixel.
    """
    import torch

    height, width = out_shape or fit.source_shape
    top, _, left, _ = fit.padding
    inner_h, inner_w = fit.resized_shape

    def weights(count: int, offset: int, inner: int, cells: int) -> Any:
        centres = (offset + (torch.arange(count, device=device, dtype=torch.float64) + 0.5) * inner / count) / fit.size
        position = (centres * cells - 0.5).clamp(0.0, cells - 1)  # in cell units, border-clamped
        below = position.floor().long()
        above = (below + 1).clamp(max=cells - 1)
        frac = position - below
        matrix = torch.zeros(count, cells, device=device, dtype=torch.float64)
        rows = torch.arange(count, device=device)
        matrix.index_put_((rows, below), 1.0 - frac, accumulate=True)
        matrix.index_put_((rows, above), frac, accumulate=True)
        return matrix.float()

    return weights(height, top, inner_h, shape[0]), weights(width, left, inner_w, shape[1])


def to_source(maps: Any, weights: tuple[Any, Any], *, out: Any = None) -> Any:
    """``(..., h, w)`` maps → ``(..., H, W)`` on the source slice, with ``source_weights``."""
    import torch

    rows, cols = weights
    return torch.matmul(rows @ maps, cols.T, out=out)


def _bounds(values: Any, config: SaliencyConfig) -> Optional[tuple[float, float]]:
    if values.numel() == 0:
        return None
    low, high = percentiles(values, (config.low_percentile, config.high_percentile))
    return low, high


def _store(stack: Any, chunk: Any, scaled: Any) -> None:
    """Encode ``scaled`` into the slices ``chunk`` of a CPU ``stack``, converting while copying.

    uint8 from ``255·v + 0.5`` (the conversion truncates, so this rounds), float16 from ``v``. No
    clamping: ``v`` is a convex combination of values already clipped to [0, 1]. On the CPU numpy
    does the conversion: its float32 → uint8 cast is ~7× faster than torch's, with the same
    truncation.
    """
    if scaled.device.type != "cpu":  # convert where the values are; move a quarter of the bytes
        scaled = scaled.to(stack.dtype).cpu()
    target, values = stack.numpy(), scaled.numpy()
    if isinstance(chunk, slice):
        np.copyto(target[chunk], values, casting="unsafe")
    else:
        target[chunk] = values


def _roi_mask(roi: Union[Volume, Box], volume: Volume) -> np.ndarray:
    """The ROI as a (z, y, x) 0/1 array on the input grid."""
    if isinstance(roi, Volume):
        if not roi.same_geometry(volume):
            raise InputError("the saliency target mask must lie on the same voxel grid as the CT (resample it first)")
        mask = np.asarray(roi.array) > 0
    else:
        try:
            (i0, i1), (j0, j1), (k0, k1) = ((int(a), int(b)) for a, b in roi)
        except (TypeError, ValueError):
            raise InputError(f"a saliency ROI box is ((i0, i1), (j0, j1), (k0, k1)) in voxels, got {roi!r}") from None
        mask = np.zeros(volume.shape, dtype=bool)
        nz, ny, nx = volume.shape
        mask[max(k0, 0) : min(k1, nz - 1) + 1, max(j0, 0) : min(j1, ny - 1) + 1, max(i0, 0) : min(i1, nx - 1) + 1] = (
            True
        )
    if not mask.any():
        raise InputError("the saliency ROI is empty or lies outside the image")
    return mask.astype(np.uint8)


def _describe_target(roi: Roi, threshold: float) -> str:
    if roi is None:
        return f"per slice, the model's predicted mask (probability >= {threshold})"
    if isinstance(roi, Volume):
        return "per slice, the given target mask"
    return f"per slice, the given voxel box (i, j, k ranges) {[list(map(int, r)) for r in roi]}"
