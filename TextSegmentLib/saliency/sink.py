"""Saliency as an engine features sink: per-layer maps from the taps of the pass that segments.

``segment(..., features_sink=build_saliency_sink(model=model, stage=2))`` asks the model for the
chosen feature taps, turns every batch's taps into one raw similarity map per layer right away
(so no feature tensor outlives its batch), and at the end rescales each layer over the whole
volume, brings it back to the source grid and encodes it compactly. ``run.features`` is then a
``SaliencyResult``: per prompt, one ``Volume`` per layer plus the combined map, and a legend.

The target every stage is relative to is, per slice, the model's own predicted mask (probability
≥ ``threshold``) unless a ROI (a box or a mask on the input grid) is given. A slice without a
target has nothing to explain and gets a zero map; the legend counts the slices that had one.

Stages 2 and 3 compare features with the prompt embedding, so they need the layer in the joint
image–text space. A model offers that by listing ``joint_tap_names`` and mapping those taps with
``project_to_joint(name, features)`` (both families do it with the CLIP tower's own final norm and
projection: exact for the last block, an approximation for earlier ones). Every other layer, or
every layer of a model without text embeddings, falls back to stage 1 and the legend says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .maths import (
    Stage3Weights,
    box_of,
    gaussian_prior,
    percentiles,
    region_mean,
    ring_weights,
    robust_rescale,
    stage1_map,
    stage2_map,
    stage3_map,
)

log = logging.getLogger(__name__)

COMBINED = "combined"
ENCODINGS = ("uint8", "float16")
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

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise InputError(f"saliency stage must be 1, 2 or 3, got {self.stage!r}")
        if self.encoding not in ENCODINGS:
            raise InputError(f"saliency encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise InputError("saliency percentiles need 0 <= low < high <= 100")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"saliency threshold must lie strictly between 0 and 1, got {self.threshold}")


@dataclass
class PromptSaliency:
    """One prompt's maps: ``maps[layer]`` is a ``Volume`` on the input grid, ``legend[layer]`` says how to read it."""

    prompt: str
    maps: dict[str, Volume]
    legend: dict[str, dict[str, Any]]
    target_slices: int

    @property
    def layers(self) -> list[str]:
        return list(self.maps)

    def values(self, layer: str) -> np.ndarray:
        """The map of ``layer`` decoded to float32 in [0, 1]."""
        array = self.maps[layer].array
        return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


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
    config: Optional[SaliencyConfig] = None,
) -> "SaliencySink":
    """A features sink for ``segment(...)``; ``layers`` defaults to the model's ``saliency_layers``.

    ``layers`` may be a comma-separated string ("vit.3,vit.11"); ``roi`` is a mask ``Volume`` on the
    input grid or an inclusive voxel box ``((i0, i1), (j0, j1), (k0, k1))``. ``config`` overrides
    the other options when given.
    """
    config = config or SaliencyConfig(stage=stage, threshold=threshold, encoding=encoding)
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
            for p in np.flatnonzero(has_target.any(axis=1)):
                rows = torch.from_numpy(np.flatnonzero(has_target[p]) + p * n_images)
                kept = self._kept.setdefault((int(p), fit), _Kept())
                kept.indices.append(np.asarray(indices)[has_target[p]])
                for name, m in maps.items():
                    kept.maps.setdefault(name, []).append(m[rows.to(m.device)].to("cpu", torch.float16))
        self._layer_info.update(info)
        self._seconds += time.perf_counter() - started

    def finish(self) -> SaliencyResult:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            prompts = [self._finish_prompt(p) for p in range(len(self._prompts))]
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

        if self._target_slices is None:
            probability = torch.sigmoid(output.logits[:, 0].float())
            target = (probability >= self.config.threshold).float()
            inside = torch.zeros_like(target)
            inside[:, fit.crop[0], fit.crop[1]] = 1.0
            return target * inside
        slices = torch.from_numpy(self._target_slices[indices].astype(np.float32))
        fitted, _ = fit_to_square(slices, size=self._size, pixel_spacing=self._plan.pixel_spacing, mode="linear")
        return fitted.clamp(0.0, 1.0).to(output.logits.device).repeat(n_prompts, 1, 1)

    def _finish_prompt(self, p: int) -> PromptSaliency:
        """Rescale each layer over the volume, sample it onto the source slices, encode; chunk by chunk."""
        import torch
        import torch.nn.functional as F

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
        dtype = np.uint8 if config.encoding == "uint8" else np.float16
        stacks = {name: np.zeros(plan.shape, dtype=dtype) for name in names}
        for fit, indices, maps in merged:
            grid = source_grid(fit, device=self._device)
            for start in range(0, len(indices), FINISH_CHUNK):
                chunk = indices[start : start + FINISH_CHUNK]
                total = None
                for name in self.taps:
                    unit = robust_rescale(
                        maps[name][start : start + FINISH_CHUNK].to(self._device), bounds=bounds[name]
                    )
                    on_source = F.grid_sample(
                        unit[:, None],
                        grid.expand(len(chunk), -1, -1, -1),
                        mode="bilinear",
                        padding_mode="border",
                        align_corners=False,
                    )[:, 0]
                    total = on_source if total is None else total + on_source
                    stacks[name][chunk] = _encode(on_source, dtype)
                if config.combine:
                    stacks[COMBINED][chunk] = _encode(total / len(self.taps), dtype)

        target_slices = int(sum(len(indices) for _, indices, _ in merged))
        prompt = self._prompts[p]
        maps, legend = {}, {}
        for name in names:
            meta = {"prompt": prompt, "saliency_layer": name}
            maps[name] = self._volume.with_array(plan.restore(stacks[name]), metadata=meta)
            legend[name] = self._legend(name, bounds.get(name), target_slices)
        return PromptSaliency(prompt=prompt, maps=maps, legend=legend, target_slices=target_slices)

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

    ``target`` holds (N, S, S) weights in [0, 1] on the model grid, one row per output row. Only
    rows with a target are computed; the others stay zero. ``model`` provides the joint-space
    projection (``joint_tap_names``, ``project_to_joint``) that stages 2 and 3 need. With
    ``images`` = B (rows prompt-major, N = P·B), the model's ``image_tap_names`` are projected once
    per image rather than once per row: they are the same for every prompt.
    """
    import torch.nn.functional as F

    boxes, has_target = box_of(target >= 0.5)
    rows = has_target.nonzero().squeeze(1)
    boxes, target_rows = boxes[rows], target[rows].float()[:, None]
    pooled: dict[tuple[int, int], Any] = {}  # the target on each feature grid, shared by same-sized taps
    prompt = None if output.text_embedding is None else output.text_embedding.float()[rows]
    joint = set(getattr(model, "joint_tap_names", ()) or ()) if hasattr(model, "project_to_joint") else set()
    image_taps = set(getattr(model, "image_tap_names", ()) or ())
    maps: dict[str, Any] = {}
    info: dict[str, dict[str, Any]] = {}
    for name in layers:
        if name not in output.taps:
            raise InputError(f"the model returned no feature tap {name!r}; it returned {sorted(output.taps)}")
        tap = output.taps[name]
        stage, space, note = config.stage, "layer features", None
        if stage > 1 and (prompt is None or name not in joint):
            stage = 1
            note = (
                "no prompt embedding from this model: stage 1 used"
                if prompt is None
                else "this layer cannot be mapped into the text space: stage 1 used"
            )
        shared = images is not None and name in image_taps and tap.shape[0] % images == 0
        if stage > 1 and shared:  # one projection per image, then each row takes its image's
            features = model.project_to_joint(name, tap[:images].float()).float()[rows % images]
        else:
            features = (tap if len(rows) == tap.shape[0] else tap[rows]).float()
            if stage > 1:
                features = model.project_to_joint(name, features).float()
        if stage > 1:
            space = "joint image-text space (model projection)"
        shape = tuple(features.shape[-2:])
        if shape not in pooled:
            pooled[shape] = F.adaptive_avg_pool2d(target_rows, shape)[:, 0]
        raw = _layer_map(features, stage=stage, weights=pooled[shape], boxes=boxes, prompt=prompt, config=config)
        if max(shape) > config.max_map_size:
            raw = F.adaptive_avg_pool2d(raw[:, None], _capped(shape, config.max_map_size))[:, 0]
        full = raw.new_zeros((tap.shape[0],) + tuple(raw.shape[1:]))
        full[rows] = raw
        maps[name] = full
        info[name] = {"stage": stage, "space": space, "feature_shape": list(features.shape[1:]), "note": note}
    return maps, has_target, info


def _layer_map(features: Any, *, stage: int, weights: Any, boxes: Any, prompt: Any, config: SaliencyConfig) -> Any:
    """One layer's raw map (N, h, w) for rows that all have a target; ``weights`` is the target on this grid."""
    import torch

    if stage == 1:
        return stage1_map(features, prototype=region_mean(features, weights))
    if stage == 2:
        return stage2_map(features, prototype=region_mean(features, weights), prompt=prompt, alpha=config.alpha)
    shape = tuple(features.shape[-2:])
    ring = ring_weights(boxes, shape, margin=config.ring_margin)
    prototype, context, global_image = region_mean(
        features, torch.stack([weights, ring, torch.ones_like(ring)], dim=1)
    ).unbind(dim=1)
    context = torch.where((ring.sum(dim=(1, 2)) > 0)[:, None], context, global_image)
    return stage3_map(
        features,
        prototype=prototype,
        prompt=prompt,
        global_image=global_image,
        context=context,
        prior=gaussian_prior(boxes, shape, sigma_scale=config.sigma_scale, floor=config.prior_floor),
        weights=config.weights,
    )


def source_grid(fit: Any, *, device: Any = "cpu") -> Any:
    """``grid_sample`` coordinates (1, H, W, 2) of every source pixel on the fitted model square.

    Maps of any resolution cover the whole square, so one grid per batch brings every layer back
    to the source slice in a single bilinear lookup (the padding is simply never sampled).
    """
    import torch

    height, width = fit.source_shape
    top, _, left, _ = fit.padding
    inner_h, inner_w = fit.resized_shape
    rows = (top + (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * inner_h / height) / fit.size
    cols = (left + (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * inner_w / width) / fit.size
    y, x = torch.meshgrid(rows * 2 - 1, cols * 2 - 1, indexing="ij")
    return torch.stack([x, y], dim=-1)[None]


def _bounds(values: Any, config: SaliencyConfig) -> Optional[tuple[float, float]]:
    if values.numel() == 0:
        return None
    low, high = percentiles(values, (config.low_percentile, config.high_percentile))
    return low, high


def _capped(shape: tuple[int, int], limit: int) -> tuple[int, int]:
    scale = limit / max(shape)
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _encode(unit: Any, dtype: Any) -> np.ndarray:
    """[0, 1] tensor → uint8 (rounded ×255) or float16, encoded where it lies and then moved to numpy."""
    import torch

    if dtype == np.uint8:
        return unit.mul(255.0).clamp_(0.0, 255.0).add_(0.5).to(torch.uint8).cpu().numpy()  # +0.5, truncate = round
    return unit.clamp(0.0, 1.0).to(torch.float16).cpu().numpy()


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
