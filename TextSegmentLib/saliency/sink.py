"""Saliency as an engine features sink: per-layer maps from the taps of the pass that segments.

``segment(..., features_sink=build_saliency_sink(model=model, stage=2))`` asks the model for the
chosen feature taps, turns every batch's taps into one raw similarity map per layer right away
(``layer_maps.explain_batch``: no feature tensor outlives its batch), and at the end rescales each
layer over the whole volume, samples it over the input's extent (on the compact grid of
``grid.py`` by default, or on the input's own voxel grid) and encodes it in uint8 or float16.
``run.features`` is then a ``SaliencyResult``: per prompt, one ``Volume`` per layer plus the
combined map, and a legend.

The target every stage is relative to is, per slice, the model's own predicted mask (probability
≥ ``threshold``) unless a ROI (a box or a mask on the input grid) is given. A slice without a
target has nothing to explain and gets a zero map; the legend counts the slices that had one.
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
from ..grid import compact_plan, on_grid_of, over_extent
from .config import SaliencyConfig
from .layer_maps import explain_batch
from .maths import percentiles, robust_rescale

log = logging.getLogger(__name__)

COMBINED = "combined"
FINISH_CHUNK = 32  # slices brought to the source grid at once: bounds the float32 working memory
METHOD = "gradient-free cosine similarity (Stage 1 prototype / 2 prototype+prompt / 3 four-component)"
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # inclusive (i, j, k) voxel index ranges
Roi = Union[Volume, Box, None]


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
    axis: str = "axial"  # the slice direction: slice counts in the legend are along it

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

    ``layers`` may be a comma-separated string ("vit.3,vit.11"); names are stripped, blanks dropped and
    repeats kept once; an unknown name is a ``ModelError`` listing the model's taps, and a tap named
    "combined" an ``InputError`` (the name is reserved for the combined map). ``roi`` is a mask ``Volume`` on the
    input grid or an inclusive voxel box ``((i0, i1), (j0, j1), (k0, k1))``, clipped to the input
    with a logged warning (entirely outside or i0 > i1 is an ``InputError``: ``fit_roi``). ``config``
    overrides the other options when given. ``grid`` "source" stores the maps on the input's voxel
    grid instead of the compact grid over its extent (``grid.py``).
    """
    config = config or SaliencyConfig(stage=stage, threshold=threshold, encoding=encoding, grid=grid)
    if layers is None:
        layers = getattr(model, "saliency_layers", ()) or True
    if layers is not True:  # names stripped, blanks dropped, repeats kept once (first place wins)
        parts = layers.split(",") if isinstance(layers, str) else layers
        layers = list(dict.fromkeys(str(name).strip() for name in parts if str(name).strip()))
        if not layers:  # asked for none at all: say what could be asked for, and how to get the default
            default = ", ".join(getattr(model, "saliency_layers", ()) or ()) or "every tap"
            raise InputError(
                f"no saliency layers given (--layers / layers is empty); name some among "
                f"{', '.join(getattr(model, 'tap_names', ()))}, or leave the option out for the default ({default})"
            )
    names = model.resolve_taps(layers)  # unknown names: ModelError listing the model's taps
    if not names:
        raise InputError("no saliency layers: this model exposes no feature taps")
    if COMBINED in names:  # its map would overwrite (or be overwritten by) the combined map
        others = [name for name in getattr(model, "tap_names", ()) if name != COMBINED]
        raise InputError(
            f"feature tap {COMBINED!r} cannot be a saliency layer: the name is reserved for the combined map; "
            f"choose layers among {others}"
        )
    return SaliencySink(layers=names, config=config, roi=roi)


def explain(
    volume: Volume,
    prompts: Union[str, Sequence[str]],
    *,
    model: Any,
    layers: Union[str, Sequence[str], None] = None,
    stage: Optional[int] = None,
    roi: Roi = None,
    config: Optional[SaliencyConfig] = None,
    **segment_options: Any,
) -> Any:
    """Segment ``prompts`` and explain them from the same forward pass; ``run.features`` is the ``SaliencyResult``.

    ``segment_options`` go to ``engine.segment`` (device, batch_size, axis, threshold, progress, ...).
    ``stage`` (default 1) and ``threshold`` given beside a ``config`` replace the config's: the maps
    explain the masks this call makes (a config's own threshold used to win over the one given here).
    """
    from ..engine import segment

    changes = {"stage": stage} if stage is not None else {}
    if "threshold" in segment_options:
        changes["threshold"] = segment_options["threshold"]
    config = dataclasses.replace(config, **changes) if config is not None else SaliencyConfig(
        stage=changes.get("stage", 1), threshold=changes.get("threshold", 0.5))
    sink = build_saliency_sink(model=model, layers=layers, roi=roi, config=config)
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
        # the target as explained: a box clipped to this volume (the legend names that, not the one asked)
        self._explained, warning = self.roi, None
        if isinstance(self.roi, Volume):
            warning = mask_labels_warning(self.roi)
        elif self.roi is not None:
            self._explained, warning = fit_roi(self.roi, volume.shape)
        if warning:
            log.warning("%s", warning)
        self._target_slices = None if self._explained is None else plan.extract(roi_mask(self._explained, volume))
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
                output, layers=self.taps, target=target, config=self.config, model=self._model, images=n_images,
                inside=image_inside(fit, target.shape[-1], device=target.device),
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
            axis=self._plan.view,
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
            "target": _describe_target(self._explained, config.threshold),
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
            # the percentiles are taken where maps are computed, the slices with a target, not the whole volume
            rescale=(f"bounds are percentiles {config.low_percentile:g} and {config.high_percentile:g} of this layer's "
                     "raw similarities over the slices with a target; they map to 0 and 1, values beyond are clipped"),
        )
        if info.get("note"):
            entry["note"] = info["note"]
        return entry


def image_inside(fit: Any, size: int, *, device: Any = None) -> Any:
    """(size, size) ones on the image within the model square, zeros on its padding; None without padding."""
    import torch

    rows, cols = (range(size)[c] for c in fit.crop)  # decided on the host: no device sync per batch
    if len(rows) == size and len(cols) == size:
        return None
    inside = torch.zeros((size, size), device=device)
    inside[fit.crop[0], fit.crop[1]] = 1.0
    return inside


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


def roi_mask(roi: Union[Volume, Box], volume: Volume, *, what: str = "saliency target mask") -> np.ndarray:
    """The ROI as a (z, y, x) 0/1 array on the input grid; ``what`` names a mask in messages (CLI: --target-mask).

    A mask on the same voxels stored another way round (a y-flipped NIfTI beside a DICOM series) is
    transposed and flipped onto the input grid, voxel for voxel; any other grid is refused.
    """
    if isinstance(roi, Volume):
        mask = np.asarray(mask_on_grid(roi, volume, what=what).array) > 0
    else:
        ((i0, i1), (j0, j1), (k0, k1)), warning = fit_roi(roi, volume.shape)
        if warning:
            log.warning("%s", warning)
        mask = np.zeros(volume.shape, dtype=bool)
        mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = True
    if not mask.any():  # fit_roi refuses a box outside the image, so this is a mask of zeros
        source = roi.source if isinstance(roi, Volume) else None
        raise InputError(f"{what} {source or '(in memory)'} marks no voxel (every value is 0): "
                         "nothing to explain; give a mask whose target voxels are 1 or more")
    return mask.astype(np.uint8)


def mask_labels_warning(mask: Volume, *, what: str = "saliency target mask") -> Optional[str]:
    """A warning when a target mask holds several labels: every non-zero voxel is the target, their union."""
    labels = np.unique(np.asarray(mask.array))
    labels = labels[labels != 0]
    if len(labels) < 2:
        return None
    shown = ", ".join(str(int(v)) for v in labels[:8]) + (", ..." if len(labels) > 8 else "")
    return (f"{what} {mask.source or '(in memory)'} holds {len(labels)} labels ({shown}); the target is every "
            "non-zero voxel, their union; to explain one structure, give a mask of that label alone")


def mask_on_grid(mask: Volume, volume: Volume, *, what: str = "saliency target mask") -> Volume:
    """``mask`` on ``volume``'s voxel grid: as it is, or reordered when both grids hold the same voxel centres."""
    from ..volume import reorient_to

    if mask.same_geometry(volume):
        return mask
    try:
        return reorient_to(mask, volume)
    except InputError:
        _check_same_grid(mask, volume, what=what)  # names both files and what differs
        raise


def _check_same_grid(mask: Volume, volume: Volume, *, what: str) -> None:
    """A mask on another grid would mark other voxels: name both files, both shapes and what differs."""
    if mask.same_geometry(volume):
        return
    differs = [name for name in ("spacing", "origin", "direction")
               if not np.allclose(getattr(mask, name), getattr(volume, name), atol=1e-4)]
    also = f"; {', '.join(differs)} {'differ' if len(differs) > 1 else 'differs'}" if differs else ""
    raise InputError(f"{what} {mask.source or '(in memory)'} is not on the same voxel grid as the CT "
                     f"{volume.source or '(in memory)'} (shape {mask.shape} vs {volume.shape}{also}); "
                     "resample the mask onto the CT's grid first")


def fit_roi(box: Box, shape: Sequence[int], *, what: str = "saliency ROI box") -> tuple[Box, Optional[str]]:
    """Check an inclusive (i, j, k) voxel box against a volume's (z, y, x) ``shape``; returns (box, warning or None).

    A box partly outside is clipped, with a warning to show; one with I0 > I1 (etc.) or entirely
    outside is an ``InputError`` naming the volume's size, so a mistyped box never explains some
    other region. ``what`` names the box in messages (the CLI: "--roi").
    """
    try:
        (i0, i1), (j0, j1), (k0, k1) = ((int(a), int(b)) for a, b in box)
    except (TypeError, ValueError):
        raise InputError(f"a saliency ROI box is ((i0, i1), (j0, j1), (k0, k1)) in voxels, got {box!r}") from None
    box = ((i0, i1), (j0, j1), (k0, k1))
    sizes = tuple(reversed(tuple(shape)))  # I runs along x, J along y, K along z
    extent = "volume is " + "x".join(map(str, sizes)) + " voxels (I x J x K; indices " + ", ".join(
        f"0..{size - 1}" for size in sizes) + ")"
    text = ",".join(str(v) for pair in box for v in pair)
    for axis, (lo, hi) in zip("IJK", box):
        if lo > hi:
            raise InputError(f"{what} {text}: {axis}0 {lo} is above {axis}1 {hi}; give each range low,high. The {extent}")
    clipped = tuple((max(lo, 0), min(hi, size - 1)) for (lo, hi), size in zip(box, sizes))
    if any(lo > hi for lo, hi in clipped):
        raise InputError(f"{what} {text} lies entirely outside the image; the {extent}")
    if clipped == box:
        return box, None
    inside = ",".join(str(v) for pair in clipped for v in pair)
    return clipped, f"{what} {text} reaches outside the image; clipped to {inside} (the {extent})"


def _describe_target(roi: Roi, threshold: float) -> str:
    if roi is None:
        return f"per slice, the model's predicted mask (probability >= {threshold})"
    if isinstance(roi, Volume):
        return f"per slice, the given target mask {roi.source or '(in memory)'} (every voxel above 0)"
    return f"per slice, the given voxel box (i, j, k ranges) {[list(map(int, r)) for r in roi]}"
