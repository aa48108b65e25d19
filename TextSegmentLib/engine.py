"""Slice-by-slice inference: volume → preprocess → model → probability maps and masks over the source extent.

The engine owns everything that is not the network: slicing in canonical orientation, windowing,
aspect-preserving fitting and its inverse, batching, text caching, device and AMP choice, CUDA
out-of-memory back-off, cancel and progress. It writes nothing: results come back as ``Volume`` s
on the input grid (the probability maps, on request, on the compact grid over the same extent:
``grid.py``) and the adapters (CLI, Slicer) decide where they go.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import InputError, TextSegmentError
from .grid import GRIDS, compact_plan, on_grid_of, over_extent
from .preprocess import fit_to_square, get_window, inverse_fit, slice_plan, window_composite
from .preprocess.windows import window_specs
from .progress import CancelToken, MonotonicProgress, ProgressCallback, check_cancel
from .volume import Volume

log = logging.getLogger(__name__)

DEFAULT_WINDOWS = ("abdomen", "lung", "bone")
AIR_HU = -500.0  # a slice with no voxel above this holds no body: nothing to segment there
CPU_BATCH = 4
CUDA_BATCH = 32
# float16 keeps a probability to within 2.5e-4 at half float32's memory (the outputs are the engine's
# largest arrays: 150 MB per prompt for a 300-slice 512² CT); the masks come from float32 either way
PROBABILITY_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class SegmentationResult:
    """One prompt's output on the input grid (the probability map on the compact grid when asked for)."""

    prompt: str
    probability: Volume  # in [0, 1]; float16 unless ``segment(probability_dtype="float32")``
    mask: Volume  # uint8, 1 inside
    aux_prompt: Optional[str] = None

    def probability_values(self) -> np.ndarray:
        """The probabilities on the mask's (the input's) grid as float32, resampled if stored compact."""
        return on_grid_of(self.probability.array.astype(np.float32), self.mask.shape)

    @property
    def voxels(self) -> int:
        return int(self.mask.array.sum())

    @property
    def volume_ml(self) -> float:
        return self.voxels * float(np.prod(self.mask.spacing)) / 1000.0


@dataclass
class SegmentationRun:
    """Everything one call produced, plus how it ran (for logs, reports and benchmarks)."""

    results: list[SegmentationResult]
    device: str
    batch_size: int
    seconds: float
    slices: int
    skipped_slices: int
    warnings: list[str] = field(default_factory=list)
    features: Any = None  # what a ``features_sink`` collected (saliency), if one was given
    # what made the masks, so ``export.write_segmentation`` records it as the CLI does without being told
    model_name: Optional[str] = None  # the preset that ran (``model_label``)
    weights_record: dict[str, Any] = field(default_factory=dict)  # ``weights.weights_record`` of the model that ran
    settings: dict[str, Any] = field(default_factory=dict)  # axis, threshold, clean-up, ...

    def __getitem__(self, index: int) -> SegmentationResult:
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)


def segment(
    volume: Volume,
    prompts: Union[str, Sequence[str]],
    *,
    model: Any,
    aux_prompts: Optional[Sequence[Optional[str]]] = None,
    device: str = "auto",
    batch_size: Union[int, str] = "auto",
    axis: str = "axial",
    windows: Union[str, Sequence[str]] = DEFAULT_WINDOWS,
    threshold: float = 0.5,
    skip_empty_slices: bool = True,
    largest_component: bool = False,
    fill_holes: bool = False,
    min_component_ml: float = 0.0,
    amp: Union[bool, str] = "auto",
    probability_dtype: str = "float16",
    probability_grid: str = "source",
    progress: Optional[ProgressCallback] = None,
    cancel: Union[CancelToken, Callable[[], bool], None] = None,
    features_sink: Optional[Any] = None,
) -> SegmentationRun:
    """Segment every prompt in ``volume`` with ``model``, slice by slice along ``axis``.

    ``features_sink`` (used by saliency) receives ``sink.begin(...)``, then per batch
    ``sink.consume(slice_indices, prompt_rows, output, fit)`` with the model's feature taps from the
    *same* forward pass, then ``sink.finish(...)``; what it returns lands in ``run.features``.
    Raises ``Cancelled`` (nothing returned) when ``cancel`` fires between batches.
    ``min_component_ml`` drops islands smaller than that volume (Slicer's "remove small islands"):
    slice-wise models leave specks, and a prompt whose mask ends up empty is reported as not found.
    ``probability_dtype`` ("float16" or "float32") is how the probability maps are kept; the masks
    are thresholded from the network's float32 output before that, so they do not depend on it.
    ``probability_grid="compact"`` keeps each probability map on the compact grid over the volume's
    extent, at most the network's input size a side in-plane (``grid.py``): the network sees no finer
    detail, and a 512² CT's map takes 1/16 of the memory with a 128-pixel model (1/4 with a 256-pixel
    one). The masks stay on the source grid.
    ``windows`` are the models' three input channels; one window (e.g. ``"lung"``) fills all three.
    """
    import torch

    from .devices import select_device
    from .postprocess import clean_mask
    from .weights import weights_record

    prompt_list = validate_prompts(prompts)
    check_distinct_prompts(prompt_list)  # two identical labels otherwise, and maps named apart
    aux_list = _validate_aux(aux_prompts, len(prompt_list))
    check_aux_prompts(model, aux_list)
    windows = _validate_windows(windows)
    check_settings(threshold=threshold, min_component_ml=min_component_ml, probability_grid=probability_grid)
    if probability_dtype not in PROBABILITY_DTYPES:
        raise InputError(f"probability_dtype must be one of {', '.join(PROBABILITY_DTYPES)}, got {probability_dtype!r}")
    if volume.array.size == 0:
        raise InputError(f"{volume.source or 'volume'}: holds no voxels (shape {volume.shape}); nothing to segment")
    if not _all_finite(volume.array):
        raise InputError(f"{volume.source or 'volume'}: contains NaN or infinite values")

    started = time.perf_counter()
    report = MonotonicProgress(progress)
    warnings: list[str] = []
    target = select_device(device)
    size = int(model.image_size)
    use_amp = target.type == "cuda" and amp in ("auto", True)

    plan = slice_plan(volume, axis=axis)
    slices_hu = plan.extract_view(volume.array)  # a view: the batches window a few slices at a time
    n_slices = slices_hu.shape[0]
    wanted = np.arange(n_slices)
    if skip_empty_slices:
        wanted = wanted[slices_hu.max(axis=(1, 2)) > AIR_HU]
    skipped = n_slices - len(wanted)

    batch = _initial_batch_size(batch_size, target)
    model = model.to(target).eval()
    text = _encode_text_cached(model, prompt_list, aux_list)
    # One array per prompt, so each can be let go once it is back in the volume's own layout: the
    # peak then holds the outputs plus one prompt's slices, not every prompt twice.
    kept = PROBABILITY_DTYPES[probability_dtype]
    cut = np.float32(threshold)  # masks and stored maps compare in float32, as a reader of the written maps will
    stored = compact_plan(plan, size) if probability_grid == "compact" else plan
    probabilities: list[Optional[np.ndarray]] = [np.zeros(stored.shape, dtype=kept) for _ in prompt_list]
    masks: list[Optional[np.ndarray]] = [np.zeros(slices_hu.shape, dtype=np.uint8) for _ in prompt_list]
    if features_sink is not None:
        features_sink.begin(volume=volume, plan=plan, prompts=prompt_list, model=model)

    report(0.0, f"segmenting {len(wanted)} slices × {len(prompt_list)} prompt(s) on {target}")
    done = skipped
    position = 0
    while position < len(wanted):
        check_cancel(cancel)
        indices = wanted[position : position + batch]
        try:
            chunk = _run_batch(
                model, text, slices_hu, indices, plan=plan, size=size, windows=windows,
                device=target, use_amp=use_amp, features_sink=features_sink,
            )
        except torch.OutOfMemoryError:
            if target.type == "cuda":
                torch.cuda.empty_cache()
            batch = len(indices)  # halve what ran: a short last batch re-run as it was would fail again
            if batch > 1:
                batch = max(1, batch // 2)
                message = f"out of memory on {target}: retrying with batch size {batch}"
            elif target.type == "cuda":
                target, use_amp = torch.device("cpu"), False
                model = model.to(target)
                text = text.to(target)
                message = "CUDA out of memory even at batch size 1: continuing on the CPU (slower)"
            else:
                raise TextSegmentError(
                    "out of memory on the CPU even at batch size 1: close other programs, crop the volume, "
                    "or use a smaller model"
                ) from None
            log.warning(message)
            warnings.append(message)
            continue
        for p, values in enumerate(chunk):
            if stored is plan:
                masks[p][indices], probabilities[p][indices] = _threshold(values, cut, dtype=kept)
            else:
                masks[p][indices] = values >= cut
                probabilities[p][indices] = _shrink(values, stored.shape[1:])
            del values
        position += len(indices)
        done += len(indices)
        report(done / n_slices * 0.95, f"slice {done}/{n_slices}")

    check_cancel(cancel)
    features = None
    if features_sink is not None:
        features = features_sink.finish()
    results = []
    min_voxels = int(np.ceil(min_component_ml * 1000.0 / float(np.prod(volume.spacing))))
    for p, prompt in enumerate(prompt_list):
        prob, mask = stored.restore(probabilities[p]), plan.restore(masks[p])
        probabilities[p] = masks[p] = None  # restore made its own copies (or returned these very arrays)
        if largest_component or fill_holes or min_voxels > 1:
            mask = clean_mask(mask, largest_component=largest_component, fill_holes=fill_holes,
                              min_component_voxels=min_voxels)
        if not mask.any():
            warnings.append(f"{prompt!r}: nothing found (no region above the threshold"
                            + (f" of {min_component_ml:g} mL or more)" if min_voxels > 1 else ")"))
        results.append(
            SegmentationResult(
                prompt=prompt,
                probability=over_extent(volume, prob, metadata={"prompt": prompt}),
                mask=volume.with_array(mask, metadata={"prompt": prompt}),
                aux_prompt=aux_list[p],
            )
        )
    report(1.0, "done")
    settings = {"axis": axis, "threshold": threshold, "largest_component": largest_component, "fill_holes": fill_holes,
                "min_component_ml": min_component_ml, "skip_empty_slices": skip_empty_slices,
                "windows": [w if isinstance(w, str) else dict(vars(get_window(w))) for w in windows],
                "probability_grid": probability_grid}
    return SegmentationRun(
        results=results,
        device=str(target),
        batch_size=batch,
        seconds=time.perf_counter() - started,
        slices=n_slices,
        skipped_slices=skipped,
        warnings=warnings,
        features=features,
        model_name=model_label(model),
        weights_record=weights_record(model),
        settings=settings,
    )


def model_label(model: Any) -> str:
    """The preset a model was built from ("freqmedclip-tiny"), else its class name: what outputs call it.

    The class name alone ("FreqMedCLIP") does not tell the tiny preset from the base one.
    """
    return str(getattr(getattr(model, "config", None), "name", None) or type(model).__name__)


def _threshold(values: np.ndarray, cut: np.float32, *, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The mask ``values >= cut`` and ``values`` (float32) cast to ``dtype``, no value crossing ``cut``.

    Rounding to float16 can carry a probability just under the threshold onto it (or one on it
    just under); such values get the nearest float16 on their own side, so thresholding a written
    map gives the mask exactly, at most one float16 step (4.9e-4) from the float32 value. The
    check compares bit patterns: for values ≥ 0 they sort as the values do, and integer compares
    are fast where numpy's float16 ones are not.
    """
    mask = values >= cut
    if dtype is np.float32:
        return mask, values
    import torch

    out = torch.from_numpy(values).half().numpy()  # the same rounding as numpy's astype, 2x faster
    nearest = np.float16(cut)
    if np.float32(nearest) >= cut:
        lower, upper = np.nextafter(nearest, np.float16(-np.inf)), nearest
    else:
        lower, upper = nearest, np.nextafter(nearest, np.float16(np.inf))
    crossed = (out.view(np.int16) >= upper.view(np.int16)) != mask  # values are probabilities: ≥ 0
    if crossed.any():
        out[crossed] = np.where(mask[crossed], upper, lower)
    return mask, out


def _shrink(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(B, H, W) float32 slices averaged down to (B, *shape): each compact voxel the mean of the span it covers."""
    import torch
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(torch.from_numpy(values), shape).numpy()


def _all_finite(array: np.ndarray, *, chunk: int = 1 << 22) -> bool:
    """No NaN or infinity, checked a few MB at a time (``np.isfinite`` of a whole CT is a volume-sized temporary)."""
    if array.dtype.kind in "biu":
        return True
    step = max(1, chunk // max(1, array[:1].size))  # whole slices along the first axis: no copy of a strided volume
    return all(np.isfinite(array[i : i + step]).all() for i in range(0, len(array), step))


# images × pixels per network call (freqmedclip-base at 352²: 1 image; tgcnet-tiny at 256²: 2;
# freqmedclip-tiny at 128²: 8): the decoder's full-resolution stages, and on the CPU the encoders,
# are memory-bound past this (tgcnet-base encodes 4 images in 28 s at once, in 23 s one by one)
GROUP_PIXELS = 1 << 17


def _run_batch(model, text, slices_hu, indices, *, plan, size, windows, device, use_amp, features_sink) -> Iterator[np.ndarray]:
    """Per prompt, the probabilities (B, H, W) on the slice grid of the slices ``slices_hu[indices]``.

    Mapped back to the slice grid one prompt at a time, as the caller takes them: only one prompt's
    batch is ever held at source resolution.
    """
    import torch

    n_prompts = len(text)
    # windowed one slice at a time into one buffer: the batch's windowed channels at source
    # resolution (3 float32 copies of every slice) were its largest transient
    b = len(indices)
    window = np.empty((1, len(windows)) + slices_hu.shape[1:], dtype=np.float32)
    fitted = torch.empty((b, len(windows), size, size), dtype=torch.float32)
    for i, k in enumerate(indices):
        window_composite(slices_hu[k : k + 1], windows=windows, out=window)
        fitted[i : i + 1], fit = fit_to_square(torch.from_numpy(window), size=size, pixel_spacing=plan.pixel_spacing)
    # the backbones run once per slice, then the decoder once per prompt, a few images at a time
    # (on the CPU the encoders too; a GPU wants the whole batch): peak memory grows neither with
    # the number of prompts nor with the batch; rows of the joined output are prompt-major
    taps = features_sink.taps if features_sink else None
    step = max(1, GROUP_PIXELS // (size * size))
    encode_step = step if device.type == "cpu" else b
    decoded: list[list] = [[] for _ in range(n_prompts)]
    with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=use_amp):
        for start in range(0, b, encode_step):
            encoded = model.encode_image(fitted[start : start + encode_step].to(device))
            n = len(encoded)
            parts = [encoded] if step >= n else [encoded.index(list(range(i, min(n, i + step)))) for i in range(0, n, step)]
            for p in range(n_prompts):
                decoded[p] += [model.decode(part, text.index([p] * len(part)), taps=taps) for part in parts]
            del encoded, parts
        output = _join([out for per_prompt in decoded for out in per_prompt])
    rows = torch.arange(n_prompts, device=device).repeat_interleave(b)
    probs = torch.sigmoid(output.logits.float())[:, 0]
    if features_sink is not None:
        features_sink.consume(indices=indices, prompt_rows=rows, output=output, fit=fit)
    probs = probs.cpu().reshape(n_prompts, b, *probs.shape[1:])
    return (inverse_fit(p, fit, mode="linear").clamp_(0, 1).numpy() for p in probs)


def _join(outputs: list):
    """Per-prompt model outputs stacked along the batch, in order."""
    import torch

    from .models.base import ModelOutput

    if len(outputs) == 1:
        return outputs[0]

    def cat(values):
        return None if values[0] is None else torch.cat(values, dim=0)

    first = outputs[0]
    return ModelOutput(
        logits=cat([o.logits for o in outputs]),
        taps={k: cat([o.taps[k] for o in outputs]) for k in first.taps},
        text_embedding=cat([o.text_embedding for o in outputs]),
        image_embedding=cat([o.image_embedding for o in outputs]),
        extras={k: cat([o.extras[k] for o in outputs]) for k in first.extras},
    )


_TEXT_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def _weights_state(model) -> tuple:
    """What the cached embeddings depend on: every parameter's identity, storage, version, device and dtype.

    An in-place change (``load_state_dict``, an optimiser step, ``p.mul_``) bumps a tensor's version
    counter, and ``.to()`` or new weights give new storage, so a model whose weights changed after
    a ``segment`` call does not get its old prompts' embeddings back. ~1 µs per parameter tensor.
    """
    return tuple((id(p), p.data_ptr(), _version(p), p.device, p.dtype) for p in model.parameters())


def _version(tensor) -> Optional[int]:
    try:
        return tensor._version
    except RuntimeError:  # a model built under inference_mode: its tensors keep no version counter
        return None


def _encode_text_cached(model, prompts: list[str], aux: list[Optional[str]]):
    """Encode each (prompt, aux) pair once per model and weights, across calls (Slicer re-runs the same prompts)."""
    import torch

    state = _weights_state(model)
    kept_state, cache = _TEXT_CACHE.get(model, (None, {}))
    if kept_state != state:
        cache = {}
        _TEXT_CACHE[model] = (state, cache)
    missing = [(p, a) for p, a in zip(prompts, aux) if (p, a) not in cache]
    if missing:
        with torch.inference_mode():
            encoded = model.encode_text([p for p, _ in missing], [a for _, a in missing])
        for i, key in enumerate(missing):
            cache[key] = encoded.index([i])
    parts = [cache[(p, a)] for p, a in zip(prompts, aux)]
    from .models.base import TextFeatures

    # A tower may pad its token sequences to the longest prompt of its batch (the Hugging Face ones
    # do), so rows cached from different calls can differ in length: pad them to the longest with
    # masked-out zeros, which attention and masked means ignore. Without a mask padding would be
    # read as words, so such a call encodes its prompts together, as an uncached one would.
    lengths = {int(t.tokens.shape[1]) for t in parts if t.tokens is not None}
    if len(lengths) > 1:
        if any(t.mask is None for t in parts):
            with torch.inference_mode():
                return model.encode_text(list(prompts), list(aux)).to(model.device)
        longest = max(lengths)
        parts = [_pad_tokens(t, longest) for t in parts]

    def cat(name):
        values = [getattr(t, name) for t in parts]
        return None if values[0] is None else torch.cat(values, dim=0)

    return TextFeatures(pooled=cat("pooled"), tokens=cat("tokens"), mask=cat("mask")).to(model.device)


def _pad_tokens(text, length: int):
    """``text`` with its tokens and mask extended to ``length`` by zero tokens that the mask leaves out."""
    import torch

    from .models.base import TextFeatures

    extra = length - int(text.tokens.shape[1])
    if extra == 0:
        return text
    tokens = torch.cat([text.tokens, text.tokens.new_zeros((text.tokens.shape[0], extra) + text.tokens.shape[2:])], dim=1)
    mask = torch.cat([text.mask, text.mask.new_zeros((text.mask.shape[0], extra))], dim=1)
    return TextFeatures(pooled=text.pooled, tokens=tokens, mask=mask)


def _initial_batch_size(batch_size: Union[int, str], device) -> int:
    if batch_size == "auto":
        return CUDA_BATCH if device.type == "cuda" else CPU_BATCH
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise InputError(f"batch size must be a positive integer or 'auto', got {batch_size!r}") from None
    if value < 1:
        raise InputError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    return value


def check_settings(
    *,
    prompts: int = 1,
    aux_prompts: Optional[Sequence[Optional[str]]] = None,
    threshold: float = 0.5,
    batch_size: Union[int, str] = "auto",
    min_component_ml: float = 0.0,
    probability_grid: str = "source",
) -> None:
    """``segment``'s option checks on their own: a long job (a study batch) refuses a bad option once, up front."""
    _validate_aux(aux_prompts, prompts)
    if not 0.0 < threshold < 1.0:
        raise InputError(f"threshold must lie strictly between 0 and 1, got {threshold}")
    if not min_component_ml >= 0.0:
        raise InputError(f"min_component_ml (CLI: --min-component-ml) must be 0 or more (mL), "
                         f"got {min_component_ml:g}")
    if probability_grid not in GRIDS:
        raise InputError(f"probability_grid must be one of {', '.join(GRIDS)}, got {probability_grid!r}")
    if batch_size != "auto":
        _initial_batch_size(batch_size, None)  # a number needs no device


def check_aux_prompts(model: Any, aux_prompts: Optional[Sequence[Optional[str]]]) -> None:
    """Auxiliary prompts a model ignores would change nothing yet be recorded in the legend: refuse them."""
    texts = [aux_prompts] if isinstance(aux_prompts, str) else list(aux_prompts or ())
    if any(text and text.strip() for text in texts) and not getattr(model, "uses_aux_prompts", False):
        raise InputError(f"{type(model).__name__} does not use auxiliary prompts (CLI: --aux-prompt); they are for "
                         "TGC-Net (e.g. tgcnet-tiny): leave them out or choose a TGC-Net model")


def validate_prompts(prompts: Union[str, Sequence[str]]) -> list[str]:
    """Whitespace-normalised prompts; an empty list or an empty prompt is an ``InputError``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    cleaned = [" ".join(str(p).split()) for p in prompts]
    if not cleaned:
        raise InputError("no prompt given: type what to segment, e.g. 'liver' or 'left kidney excluding the cyst'")
    for original, prompt in zip(prompts, cleaned):
        if not prompt:
            raise InputError(f"empty prompt {original!r}: type what to segment, e.g. 'spleen'")
    return cleaned


def prompt_key(prompt: str) -> str:
    """What makes two prompts the same one: their words, whatever the case and spacing."""
    return " ".join(str(prompt).split()).casefold()


def check_distinct_prompts(prompts: Sequence[str], *, option: str = "prompt") -> None:
    """A prompt given twice would make two identical labels and a second file named apart: refuse it.

    Case and spacing do not make a prompt new ("Liver", "liver "), as in the Slicer module.
    """
    first: dict[str, int] = {}
    for number, prompt in enumerate(prompts or (), start=1):
        key = prompt_key(prompt)
        if key in first:
            raise InputError(f"{option} {prompt!r} is given twice (prompts {first[key]} and {number}); "
                             "each prompt makes one label: give it once")
        first[key] = number


def _validate_windows(windows: Union[str, Sequence[str]]) -> tuple:
    """Three windows, one per input channel (models take ``(B, 3, H, W)``); one window is a grey image in all three."""
    specs = window_specs(windows)
    if len(specs) == 1:
        specs *= 3
    if len(specs) != 3:
        raise InputError(
            f"windows must be one HU window or three (one per model input channel), got {len(specs)}: {specs!r}"
        )
    for spec in specs:
        get_window(spec)  # an unknown preset fails here, before any slice is run
    return specs


def _validate_aux(aux: Optional[Sequence[Optional[str]]], n: int) -> list[Optional[str]]:
    if aux is None:
        return [None] * n
    if isinstance(aux, str):
        aux = [aux]
    if len(aux) != n:
        raise InputError(f"got {len(aux)} auxiliary prompt(s) for {n} prompt(s): give one per prompt (or none)")
    return [(" ".join(a.split()) or None) if a is not None else None for a in aux]
