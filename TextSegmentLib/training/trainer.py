"""The training loop: the papers' recipe with checkpoints, resume, validation per level and curves.

AdamW with two parameter groups (the model's ``parameter_groups()``: ``new`` modules at ``lr_new``,
unfrozen CLIP blocks at ``lr_backbone``), linear warm-up then cosine decay, Dice + BCE (+ SWAP for
FreqMedCLIP), AMP on CUDA only. Everything a run needs to continue lives in ``out_dir/last.pt``
(loaded with ``weights_only=True``: tensors and plain containers, never arbitrary pickles), so
``resume=True`` continues the very same schedule. Rank 0 of a torchrun job validates, plots and saves.

Files in ``out_dir``: ``last.pt`` (resume state, the loss, learning-rate and validation history
included: ``TrainResult.history``), ``best.safetensors`` (best validation mean Dice over L1–L3,
fp32), ``config.json`` (the run's settings, checked on resume) and ``curves.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError, TextSegmentError, WeightsError
from ..io.writers import replace_whole
from ..semantibench import dice
from . import distributed
from .data import (
    LEVEL_WEIGHTS, SlicePool, augment, build_pool, check_level_weights, check_real_fraction, check_sources, load_source,
)
from .losses import per_image_dice_loss, segmentation_loss, swap_term
from .run_lock import run_lock

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass
class TrainConfig:
    """One training run; saved beside the checkpoints and inside the exported weights' metadata."""

    model: str = "freqmedclip-tiny"
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields of the model preset
    init_weights: Optional[str] = None  # start from these weights (an id or a checkpoint file): fine-tuning
    sources: tuple[str, ...] = ("phantoms:0-47",)  # see data.load_source
    val_sources: tuple[str, ...] = ("phantoms:1000-1003",)
    real_fraction: Optional[float] = 0.2
    steps: int = 2000
    batch_size: int = 8
    lr_new: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    presence_weight: float = 0.0  # see losses.presence_loss; 0 reproduces the weights trained before it
    swap_weight: float = 0.1  # FreqMedCLIP only
    level_weights: dict[str, float] = field(default_factory=lambda: dict(LEVEL_WEIGHTS))
    present_fraction: float = 0.8
    hard_mining: float = 0.0  # share of the prompt choice led by each prompt's running difficulty (SlicePool.sample)
    export_mix: float = 1.0  # share of the trained weights in the export; the rest is init_weights' (export_weights)
    augment: bool = True
    flip_prob: float = 0.0
    seed: int = 0
    val_every: int = 200
    val_pairs_per_level: int = 48
    checkpoint_every: int = 100
    max_minutes: Optional[float] = None  # wall-clock budget of this run; then save and stop
    stop_after: Optional[int] = None  # stop (and save) after this many steps in this run
    threads: Optional[int] = None
    device: str = "auto"
    amp: bool = True  # CUDA only
    out_dir: str = "runs/train"


# fields a resumed run may change: how long and where it runs, not what it trains
# (config.json records the new values, which this part of the run does use)
RESUMABLE_CHANGES = frozenset({"max_minutes", "stop_after", "threads", "device", "out_dir", "checkpoint_every"})


@dataclass
class TrainResult:
    step: int
    finished: bool  # reached config.steps
    history: dict[str, list]
    best_path: Optional[Path]
    out_dir: Path
    model: Any = None  # the trained model, in memory (last step, not necessarily the best)
    is_main: bool = True  # rank 0 of a torchrun job (or a plain run): the one process that reports and exports


class _Step(nn.Module):
    """Text encoding + forward in one ``forward``, so DDP sees every parameter the loss touches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, prompts: Sequence[str]):
        out = self.model(images, self.model.encode_text(list(prompts)))
        return out.logits, out.extras.get("swap_embedding"), out.text_embedding


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = model.parameter_groups() if hasattr(model, "parameter_groups") else {"new": [p for p in model.parameters() if p.requires_grad]}
    lrs = {"new": config.lr_new, "backbone": config.lr_backbone}
    # fused: one kernel for all parameters. PyTorch's default on the CPU is a loop over tensors,
    # which took 40–70 ms a step for the tiny models (fused: 8–17 ms; bench/cpu_kernels.py)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lrs[name], "name": name} for name, ps in groups.items() if ps],
        weight_decay=config.weight_decay,
        fused=True,
    )


def train(
    config: TrainConfig, *, resume: bool = False, pools: Optional[tuple[SlicePool, SlicePool]] = None,
    progress: Optional[Progress] = None,
) -> TrainResult:
    """Run (or continue) training; returns where it stopped. ``pools`` (train, val) skip loading sources.

    One run at a time per ``out_dir`` (``run_lock``): under torchrun, rank 0 holds the lock for all.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return _train(config, resume=resume, pools=pools, progress=progress)
    with run_lock(Path(config.out_dir)):
        return _train(config, resume=resume, pools=pools, progress=progress)


def _train(
    config: TrainConfig, *, resume: bool, pools: Optional[tuple[SlicePool, SlicePool]], progress: Optional[Progress],
) -> TrainResult:
    from ..devices import select_device

    began = time.monotonic()  # --max-minutes counts the loading too: a job's time limit does
    check_config(config)
    if pools is None and not config.sources:  # torch.cat of no slices, a traceback, at the start of the run
        raise InputError("no training data: sources is empty; give a source (CLI: --data), e.g. phantoms:0-47")
    check_mix(config.export_mix, mix_with=config.init_weights)  # fail now, not after the training
    check_level_weights(config.level_weights)
    check_real_fraction(config.real_fraction)
    check_sources(config.sources, config.val_sources)
    out_dir = Path(config.out_dir)
    state_path = out_dir / "last.pt"
    if resume and state_path.is_file():
        check_resume_config(config, out_dir / "config.json")
    elif resume:
        log.warning("%s holds no run to resume (no last.pt): training from step 0", out_dir)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    device = select_device(config.device)
    info = distributed.init_distributed(device=device)
    torch.manual_seed(config.seed + info.rank)
    rng = np.random.default_rng([config.seed, info.rank])

    model = _initial_model(config)
    state = _read_resume_state(state_path, model, config, processes=info.world_size) if resume and state_path.is_file() else None
    train_pool, val_pool = pools or (None, None)
    if train_pool is None:
        train_pool = build_pool([c for s in config.sources for c in load_source(s)], size=model.image_size,
                                real_fraction=config.real_fraction)
    if val_pool is None and info.is_main and config.val_sources:
        val_pool = build_pool([c for s in config.val_sources for c in load_source(s)], size=model.image_size)
    # fine-tuning keeps the model's own, and a resumed run its saved ones
    if hasattr(model, "set_band_statistics") and not config.init_weights and state is None:
        from ..models.layers import band_statistics

        model.set_band_statistics(*band_statistics(train_pool.images[::4].float()))
    train_pool.level_chances(config.level_weights)  # a weighting that leaves nothing to sample fails before step 1

    optimizer = build_optimizer(model, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=config.steps, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio)
    )
    step, history, best = 0, {"step": [], "loss": [], "lr": [], "val_step": [], "val": []}, -1.0
    train_pool.difficulty = {}  # a run's own: a pool handed in may have been used by another run
    scaler_state: dict = {}
    if state is not None:  # the model's weights are in already (_read_resume_state)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, history, best = int(state["step"]), json.loads(state["history"]), float(state["best"])
        # each rank continues its own sampler (older checkpoints hold rank 0's alone)
        rngs = json.loads(state.get("rank_rng", "[]")) or [json.loads(state["rng"])]
        difficulties = json.loads(state.get("rank_difficulty", "[]")) or [json.loads(state.get("difficulty", "{}"))]
        if info.rank < len(rngs):
            rng.bit_generator.state = rngs[info.rank]
            train_pool.difficulty = difficulties[info.rank]
        else:
            log.warning("rank %d: %s holds no sampler state for this rank; it continues with a fresh one",
                        info.rank, state_path)
        # torch's own generators (dropout and the like); older checkpoints have none and continue from the seed
        torch_rngs = state.get("rank_torch_rng", [])
        if info.rank < len(torch_rngs):
            torch.set_rng_state(torch_rngs[info.rank]["cpu"])
            if torch.cuda.is_available() and torch_rngs[info.rank].get("cuda"):
                torch.cuda.set_rng_state_all(torch_rngs[info.rank]["cuda"])
        scaler_state = state.get("scaler", {})
        log.info("resumed %s at step %d", state_path, step)
    model.to(device).train()
    runner = distributed.wrap(_Step(model), info, device=device)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    if scaler_state and scaler.is_enabled():  # the loss scale it had found, not a fresh 2^16
        scaler.load_state_dict(scaler_state)
    use_swap = config.swap_weight > 0 and hasattr(model, "set_band_statistics")
    val_pairs = _validation_pairs(val_pool, config) if val_pool is not None else None

    started, run_steps, finished = time.monotonic(), 0, step >= config.steps  # a resumed run may be done already
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_text(out_dir / "config.json", json.dumps(dataclasses.asdict(config), indent=1) + "\n")
    while step < config.steps:
        picks = train_pool.sample(rng, config.batch_size, level_weights=config.level_weights,
                                  present_fraction=config.present_fraction, hard_mining=config.hard_mining)
        batch = train_pool.batch(picks)
        if config.augment:
            batch = augment(batch, rng, flip_prob=config.flip_prob)
        images, masks = batch.images.to(device), batch.masks.to(device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            logits, swap_embedding, text_embedding = runner(images, batch.prompts)
        parts = segmentation_loss(logits, masks, dice_weight=config.dice_weight, bce_weight=config.bce_weight,
                                  presence_weight=config.presence_weight)
        loss = parts.total
        if config.hard_mining > 0:
            train_pool.record(picks, per_image_dice_loss(logits.detach(), masks).cpu().tolist())
        if use_swap and swap_embedding is not None:
            term = swap_term(swap_embedding.float(), text_embedding.float(), batch.prompts, masks)
            # a zero-weighted use keeps every rank's graph identical when no row has a target (DDP)
            loss = loss + (config.swap_weight * term if term is not None else 0.0 * swap_embedding.sum())
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]  # this step's; schedule.step() below sets the next one
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        step += 1
        run_steps += 1
        loss_value = distributed.mean_across(float(loss.detach()), info)
        history["step"].append(step)
        history["loss"].append(loss_value)
        history["lr"].append(lr)

        finished = step >= config.steps
        out_of_time = config.max_minutes is not None and time.monotonic() - began > 60 * config.max_minutes
        if config.max_minutes is not None:  # every rank stops at the same step, or the others wait forever
            out_of_time = distributed.any_across(out_of_time, info)
        stopping = finished or out_of_time or (config.stop_after is not None and run_steps >= config.stop_after)
        saving = step % config.checkpoint_every == 0 or stopping
        if saving:  # every rank's sampler, so that a resume continues each rank's own batches
            ranks = distributed.gather_objects(
                {"rng": rng.bit_generator.state, "difficulty": train_pool.difficulty, "torch_rng": _torch_rng_state()},
                info,
            )
        if info.is_main:
            # not at a stop (--max-minutes, Ctrl-C's last checkpoint): a validation there could become the
            # best checkpoint, so a run stopped and resumed would export other weights than one run straight through
            if val_pairs is not None and (step % config.val_every == 0 or finished):
                scores = validate(model, val_pool, val_pairs, device=device)
                model.train()
                history["val_step"].append(step)
                history["val"].append(scores)
                log.info("step %d: loss %.4f, validation %s", step, loss_value, scores)
                if scores["mean"] > best:
                    best = scores["mean"]
                    _save_weights(model, out_dir / "best.safetensors", config, step=step, scores=scores)
            if saving:
                _save_state(state_path, model, optimizer, schedule, step, history, best, ranks, scaler=scaler)
                _written(out_dir / "curves.png", lambda: plot_curves(history, out_dir / "curves.png"))
            if progress is not None:
                left = _time_left((time.monotonic() - started) / run_steps * (config.steps - step))
                progress(step / config.steps, f"step {step}/{config.steps} loss {loss_value:.3f}{left}")
        if stopping:
            break
    distributed.barrier(info)
    distributed.shutdown(info)
    best_path = out_dir / "best.safetensors"
    # a run that never validated has no best of its own: one there is an earlier run's
    best_path = best_path if best_path.is_file() and history["val"] else None
    return TrainResult(step, finished, history, best_path, out_dir, model, is_main=info.is_main)


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a text",
          "tuple[str, ...]": "a list of texts", "dict[str, float]": "an object of numbers", "dict[str, Any]": "an object"}
AT_LEAST_ONE = ("steps", "batch_size", "val_every", "val_pairs_per_level", "checkpoint_every", "stop_after", "threads")


def _is_kind(value: Any, kind: str) -> bool:
    """``value`` fits the ``TrainConfig`` annotation ``kind`` (JSON's types: lists for tuples, no bool for numbers)."""
    if kind.startswith("Optional["):
        return value is None or _is_kind(value, kind[len("Optional["):-1])
    if kind in ("int", "float"):
        return isinstance(value, int if kind == "int" else (int, float)) and not isinstance(value, bool)
    if kind == "tuple[str, ...]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if kind == "dict[str, float]":
        return isinstance(value, dict) and all(_is_kind(v, "float") for v in value.values())
    return isinstance(value, {"bool": bool, "str": str, "dict[str, Any]": dict}.get(kind, object))


def check_config(config: TrainConfig) -> None:
    """Refuse a field of the wrong type (a recipe's ``"augment": "false"`` is true) or a count below 1.

    Why: they failed deep in the run with a traceback (``steps: "2"``, ``val_every: 0``, ``threads: -1``) or,
    worse, ran with something else than written (``steps: 2.5`` ran 3 steps, ``threads: 0`` on every core).
    """
    for f in dataclasses.fields(TrainConfig):
        check_field_type(f.name, getattr(config, f.name))
    for name in AT_LEAST_ONE:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.warmup_steps < 0:
        raise InputError(f"warmup_steps must be 0 or more, got {config.warmup_steps}")
    if config.max_minutes is not None and config.max_minutes <= 0:  # it stopped after one step, as if out of time
        raise InputError(f"max_minutes must be more than 0, got {config.max_minutes}")


def check_field_type(name: str, value: Any) -> None:
    """``value`` has the type of ``TrainConfig``'s field ``name``, or an error says which it needs."""
    kind = str(next(f.type for f in dataclasses.fields(TrainConfig) if f.name == name))
    if not _is_kind(value, kind):
        wanted = f"{_KINDS[kind[9:-1]]} or null" if kind.startswith("Optional[") else _KINDS.get(kind, kind)
        raise InputError(f"{name} must be {wanted}, got {value!r}")


def check_mix(mix: float, *, mix_with: Optional[str]) -> None:
    """The export mix (``TrainConfig.export_mix``) is a share in (0, 1]; below 1 it needs weights to mix with."""
    if not 0.0 < mix <= 1.0:
        raise InputError(f"export mix must lie in (0, 1], got {mix}")
    if mix < 1.0 and not mix_with:
        raise InputError("an export mix below 1 needs the weights to mix with (the run's init_weights): "
                         "set init_weights (CLI: --init) too")


def check_resume_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume with settings other than the saved run's, beyond ``RESUMABLE_CHANGES``.

    Why: the saved optimizer, schedule and sampler would override the new values (``lr_new``,
    ``seed``, ...) or mix two runs in one (``sources``, ``steps``, ...), while ``config.json`` would
    record settings that were never used. A field the saved run predates counts as its default.
    """
    if not saved_path.is_file():  # a last.pt copied without it would resume under any settings, unchecked
        raise InputError(f"cannot resume {saved_path.parent}: its last.pt has no {saved_path.name} beside it (the run's "
                         "settings, checked on resume); put it back, or train into another out_dir (CLI: --out)")
    try:
        saved = json.loads(saved_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot resume {saved_path.parent}: {saved_path} is not readable JSON ({exc})") from None
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
    defaults = TrainConfig()
    changed = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUMABLE_CHANGES:
            continue
        before = saved.get(f.name, json.loads(json.dumps(getattr(defaults, f.name))))
        if before != new[f.name]:
            changed.append(f"{f.name}: saved {before!r}, now {new[f.name]!r}")
    if changed:
        raise InputError(f"cannot resume {saved_path.parent} with another config ({'; '.join(changed)}); resume with "
                         f"the saved settings ({saved_path}) or train into another out_dir (CLI: --out)")


def _initial_model(config: TrainConfig) -> nn.Module:
    """A fresh model from the preset, or (``init_weights``) a trained one to fine-tune."""
    from ..models.registry import create_model
    from ..weights import load_model

    if not config.init_weights:
        return create_model(config.model, **config.overrides)
    model = load_model(config.model, weights=config.init_weights, device="cpu", **config.overrides)
    log.info("fine-tuning from %s", config.init_weights)
    return model.float().train()


def _validation_pairs(pool: SlicePool, config: TrainConfig) -> list:
    """A fixed, level-balanced set of (slice, prompt) pairs, so curves compare like with like."""
    rng = np.random.default_rng(12345)
    pairs = []
    for level in ("L1", "L2", "L3", "negative"):
        if any(p.level == level for ps in pool.prompts for p in ps):
            pairs += pool.sample(rng, config.val_pairs_per_level, level_weights={level: 1.0},
                                 present_fraction=config.present_fraction)
    return pairs


@torch.no_grad()
def validate(model: nn.Module, pool: SlicePool, pairs: list, *, device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """2D Dice per level on the validation pairs (threshold 0.5) and the negatives' false-positive rate."""
    model.eval()
    per_level: dict[str, list[float]] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = pool.batch(chunk)
        logits = model(batch.images.to(device), model.encode_text(batch.prompts)).logits
        preds = (logits.float().cpu()[:, 0] > 0).numpy()
        for pred, truth, level in zip(preds, batch.masks[:, 0].numpy() > 0.5, batch.levels):
            value = float(pred.any()) if level == "negative" else dice(pred, truth)
            per_level.setdefault(level, []).append(value)
    scores = {("fp_rate" if k == "negative" else k): float(np.mean(v)) for k, v in per_level.items()}
    scored = [scores[k] for k in ("L1", "L2", "L3") if k in scores]
    scores["mean"] = float(np.mean(scored)) if scored else 0.0
    return scores


def _time_left(seconds: float) -> str:
    """``, 12 min left``: from this session's own pace, since a progress bar that saw a resumed run jump to
    90 % in its first second promised the remaining hours in no time."""
    if seconds < 1:
        return ""
    if seconds < 90:
        return f", {seconds:.0f} s left"
    return f", {seconds / 60:.0f} min left" if seconds < 5400 else f", {seconds / 3600:.1f} h left"


def _torch_rng_state() -> dict:
    """torch's generator states on this process: the CPU's and, where there is CUDA, every device's."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _read_resume_state(path: Path, model: nn.Module, config: TrainConfig, *, processes: int) -> dict:
    """``last.pt`` with its weights loaded into ``model``, before any data is read.

    Why: a damaged file or another network's checkpoint failed with torch's traceback (a page of
    missing tensor names), after minutes of loading data; and a run of two torchrun processes resumed
    in one went on at half its batch, with one process's sampler, as if it were the same run.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a damaged file
        raise InputError(f"cannot resume from {path}: not a training checkpoint this run can read "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
        raise InputError(f"cannot resume from {path}: not a training checkpoint (a last.pt that train wrote)")
    saved = len(json.loads(state["rank_rng"])) if "rank_rng" in state else None  # older checkpoints: not recorded
    if saved is not None and saved != processes:
        def run_by(n: int) -> str:
            return "one process" if n == 1 else f"{n} torchrun processes (--nproc-per-node {n})"

        raise InputError(f"cannot resume {path.parent} in {run_by(processes)}: it was trained by {run_by(saved)}, and "
                         "each process samples its own batches; resume it as it ran, or train into another out_dir")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        theirs, ours = set(state["model"]), set(model.state_dict())
        raise InputError(f"cannot resume from {path}: it holds another network than {config.model} with these "
                         f"settings ({len(ours - theirs)} tensors missing, {len(theirs - ours)} unexpected, or of "
                         "other shapes); train into another out_dir (CLI: --out)") from None
    return state


def saved_step(path: "str | os.PathLike") -> Optional[int]:
    """The step a ``last.pt`` was saved at, or None when it cannot be read (then resuming says why).

    Why: ``reproduce`` said "resuming 3000 steps" whether the run stood at step 100 or 2,900.
    """
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # a damaged or foreign file: _read_resume_state names the problem when the run starts
        return None


def _written(path: Path, write: Callable[[], Any]) -> None:
    """Run ``write`` (an atomic save of ``path``); a failure (disk full, read-only folder) is one line.

    Why: it was torch's traceback (``unexpected pos 31943168``), and its half-written temporary file
    was left behind on the full disk.
    """
    try:
        write()
    except (OSError, RuntimeError) as exc:
        kept = f"; the previous {path.name} is kept intact" if path.is_file() else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TextSegmentError(f"could not write {path} (disk full or folder not writable? {reason}){kept}; "
                               "make room and continue with --resume") from None


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all. Why: a resume on a full disk left its config.json empty, and the
    run, its settings lost, could no longer be resumed at all."""
    _written(path, lambda: replace_whole(path, lambda tmp: tmp.write_text(text)))


def _save_state(path, model, optimizer, schedule, step, history, best, ranks, *, scaler) -> None:
    """``ranks``: each rank's sampler state, prompt difficulties and ``_torch_rng_state``, in rank order."""
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "step": step, "history": json.dumps(history), "best": best,
        "rng": json.dumps(ranks[0]["rng"]), "difficulty": json.dumps(ranks[0]["difficulty"]),  # as before: older code reads these
        "rank_rng": json.dumps([r["rng"] for r in ranks]),
        "rank_difficulty": json.dumps([r["difficulty"] for r in ranks]),
        "rank_torch_rng": [r["torch_rng"] for r in ranks], "scaler": scaler.state_dict(),
    }
    _written(path, lambda: replace_whole(path, lambda tmp: torch.save(state, tmp)))


def _save_weights(model, path: Path, config: TrainConfig, *, step: int, scores: dict) -> None:
    from ..checkpoint import save_checkpoint

    metadata = {"training": {"step": step, "validation": scores, "config": dataclasses.asdict(config)}}
    _written(path, lambda: save_checkpoint(model, path, model_name=config.model, metadata=metadata, overwrite=True))


def export_weights(
    source: Path, dest: Path, *, dtype: str = "float16", metadata: Optional[dict] = None, overwrite: bool = False,
    mix_with: Optional[str] = None, mix: float = 1.0,
) -> Any:
    """Re-save a checkpoint with its floating tensors in ``dtype`` (half the size for fp16).

    Loading casts back: ``load_state_dict`` copies into the model's fp32 parameters. ``mix`` < 1
    exports ``mix`` × the trained weights + (1 − ``mix``) × those of ``mix_with`` (the weights the
    run started from): weight-space ensembling of a fine-tune with its starting point (WiSE-FT),
    which keeps what the earlier weights knew at no cost at inference.
    """
    from ..checkpoint import load_checkpoint, save_checkpoint

    check_mix(mix, mix_with=mix_with)
    model, info = load_checkpoint(source)
    merged = {**info.metadata, **(metadata or {})}
    if mix < 1.0:
        _mix_into(model, mix_with, mix=mix, model_name=info.model_name, source=source)
        merged["mixed_with"] = {"weights": str(mix_with), "share_of_trained": mix}
    small = copy.deepcopy(model).to(getattr(torch, dtype))
    merged["stored_dtype"] = dtype
    return save_checkpoint(small, dest, model_name=info.model_name, metadata=merged, overwrite=overwrite)


def _mix_into(model: nn.Module, weights: str, *, mix: float, model_name: str, source: Path) -> None:
    """model ← mix · model + (1 − mix) · ``weights``, over the floating tensors; both must be the same network."""
    from ..weights import load_model

    other = load_model(model_name, weights=weights, device="cpu").state_dict()
    state = model.state_dict()
    if set(other) != set(state) or any(other[k].shape != v.shape for k, v in state.items()):
        raise WeightsError(f"cannot mix {source} with {weights}: they are not the same {model_name} network")
    with torch.no_grad():
        for key, value in state.items():
            if value.is_floating_point():
                value.mul_(mix).add_(other[key].to(value.dtype), alpha=1.0 - mix)


def plot_curves(history: dict, path: Path) -> None:
    """Training loss (raw and smoothed) and validation Dice per level / negatives' FP rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps, loss = np.asarray(history["step"]), np.asarray(history["loss"])
    if len(loss):
        ax.plot(steps, loss, alpha=0.25, color="tab:blue")
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("Dice + BCE (+ SWAP)")
    ax.set_title("training loss")
    for key in ("L1", "L2", "L3", "fp_rate"):
        values = [v.get(key, np.nan) for v in history["val"]]
        if values:
            ax2.plot(history["val_step"], values, marker="o", label="negatives FP rate" if key == "fp_rate" else f"Dice {key}")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_title("validation")
    if history["val"]:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:
        replace_whole(path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".png")
    finally:
        plt.close(fig)
