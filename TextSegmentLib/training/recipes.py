"""Recipes: a ``TrainConfig`` as JSON, and the chain of them that makes a shipped model from scratch.

Every shipped model has its recipe in ``recipes/<weights id>.json``. A later phase names the
weights it starts from in ``init_weights`` (``tgcnet-tiny-v9`` starts from ``tgcnet-tiny-v8``),
so following those names back leads to the one phase that starts from random weights.
``reproduce`` trains that chain in order, each phase from the previous phase's own export (never
from the shipped file), so the last export is the shipped model made again from nothing.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..errors import InputError
from .data import read_json
from .trainer import TrainConfig, check_field_type, saved_step

PathLike = Union[str, Path]


def load_recipe(path: PathLike, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` a recipe file describes, with ``overrides`` (fields not None) on top.

    The ``comment`` field is documentation; any other unknown field is a clear error, so a
    misspelt option cannot be silently ignored.
    """
    path = Path(path)
    values = read_json(path, "recipe")  # a binary file (a checkpoint, a CT) is not a recipe: a one-line error
    if not isinstance(values, dict):
        raise InputError(f"recipe {path} must hold a JSON object of TrainConfig fields")
    values.pop("comment", None)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        from difflib import get_close_matches

        meant = {u: get_close_matches(u, names, n=1) for u in unknown}  # "learning_rate" for "lr", "step" for "steps"
        hints = "; ".join(f"{u!r}: did you mean {m[0]!r}?" for u, m in meant.items() if m)
        raise InputError(f"recipe {path} has unknown field(s) {unknown}" + (f" ({hints})" if hints else "")
                         + f"; the fields are those of TrainConfig: {', '.join(sorted(names))}")
    for key, value in values.items():  # the file's own values: a wrong type is the recipe's mistake
        try:
            check_field_type(key, value)
        except InputError as error:
            raise InputError(f"recipe {path}: {error}") from None
    values.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("sources", "val_sources"):
        if key in values:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


@dataclass(frozen=True)
class Phase:
    """One training run of a chain: the weights it makes, its recipe, and that recipe's config."""

    weights_id: str
    recipe: Path
    config: TrainConfig

    @property
    def starts_from(self) -> Optional[str]:
        """The weights id of the phase before; None: random weights."""
        return self.config.init_weights


def recipe_chain(weights_id: str, *, recipes_dir: PathLike = "recipes") -> list[Phase]:
    """The phases that make ``weights_id``, first (from scratch) to last."""
    recipes_dir = Path(recipes_dir)
    chain: list[Phase] = []
    current: Optional[str] = weights_id
    while current is not None:
        if any(phase.weights_id == current for phase in chain):
            raise InputError(f"the recipes starting from {weights_id} loop back to {current}")
        path = recipes_dir / f"{current}.json"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in recipes_dir.glob("*.json"))) or "none"
            needed = f" (the recipe of {chain[-1].weights_id} starts from it)" if chain else ""
            raise InputError(f"no recipe for {current}{needed}: expected {path}; recipes there: {known}")
        phase = Phase(current, path, load_recipe(path))
        if phase.starts_from is not None and Path(phase.starts_from).suffix:
            raise InputError(f"{path} starts from the file {phase.starts_from}, not from a weights id with a recipe")
        chain.append(phase)
        current = phase.starts_from
    return chain[::-1]


def reproduce(
    weights_id: str,
    *,
    out_dir: PathLike,
    recipes_dir: PathLike = "recipes",
    threads: Optional[int] = None,
    device: Optional[str] = None,
    steps: Optional[int] = None,
    progress: Any = None,
    report: Callable[[str], None] = print,
) -> Optional[Path]:
    """Train every phase of ``weights_id``'s chain into ``out_dir``; returns the last export, or None if stopped.

    Phase ``X`` trains in ``out_dir/X/`` and exports ``out_dir/X.safetensors``. A phase whose
    export exists is kept, and one whose run folder holds a checkpoint is resumed, so running the
    same command again continues an interrupted reproduction. Nothing outside ``out_dir`` is written.

    ``steps`` trains every phase for that many steps instead of its recipe's: a check, in minutes,
    that the whole chain runs on this machine (its data, its memory, every phase's options) before
    the hours the recipes take. Its exports record ``steps_per_phase``; they are not the shipped
    model, and a folder made with one step count is never continued with another.
    """
    from .trainer import export_weights, train

    if steps is not None and steps < 1:
        raise InputError(f"steps per phase must be at least 1, got {steps}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank exported the same file after phase 1 and the job failed; a phase's ranks cannot wait for it
        raise InputError("reproduce runs in one process, not under torchrun; to spread a phase over processes, run "
                         "`torchrun ... -m TextSegmentLib train --config RECIPE --init PREVIOUS_EXPORT` per phase")
    out_dir = Path(out_dir)
    chain = recipe_chain(weights_id, recipes_dir=recipes_dir)
    previous: Optional[Path] = None
    for number, phase in enumerate(chain, start=1):
        export = out_dir / f"{phase.weights_id}.safetensors"
        label = f"phase {number}/{len(chain)}: {phase.weights_id} ({phase.recipe})"
        kept, saved = _made_so_far(phase, out_dir=out_dir, steps=steps)
        if kept:
            report(f"{label}: kept {export}")
            previous = export
            continue
        run_dir = out_dir / phase.weights_id
        config = dataclasses.replace(
            phase.config,
            out_dir=str(run_dir),
            init_weights=str(previous) if previous is not None else None,
            threads=threads if threads is not None else phase.config.threads,
            device=device if device is not None else phase.config.device,
            steps=steps if steps is not None else phase.config.steps,
        )
        started_from = saved.get("init_weights")
        if previous is not None and started_from and Path(started_from).is_file() and previous.samefile(started_from):
            # the same export named another way (--out given as an absolute path this time): resuming was refused
            config = dataclasses.replace(config, init_weights=started_from)
        resume = (run_dir / "last.pt").is_file()
        report(f"{label}: {_resuming(run_dir / 'last.pt', config.steps) if resume else f'training {config.steps} steps'} "
               f"into {run_dir}")
        # the bar restarts at every phase: its line says which phase it is
        phase_progress = None if progress is None else (
            lambda fraction, message, label=f"{number}/{len(chain)} {phase.weights_id}": progress(fraction, f"{label}: {message}"))
        result = train(config, resume=resume, progress=phase_progress)
        if not result.finished:
            report(f"{label}: stopped at step {result.step}; run the same command again to continue")
            return None
        if result.best_path is None:
            raise InputError(f"{phase.recipe} validates on nothing (no val_sources), so it has no best weights to export")
        export_weights(
            result.best_path,
            export,
            metadata={"recipe": str(phase.recipe), "reproduces": phase.weights_id,
                      **({"steps_per_phase": steps} if steps is not None else {})},
            mix_with=config.init_weights,
            mix=config.export_mix,
        )
        report(f"{label}: exported {export}")
        previous = export
    return previous


def phase_state(phase: Phase, *, out_dir: PathLike, steps: Optional[int] = None) -> str:
    """What ``reproduce`` would do with ``phase`` in ``out_dir`` now: keep its export, resume its run, or train it;
    or refuse ``out_dir``, as ``reproduce`` does, when its export or run was made with another ``steps``."""
    from ..errors import TextSegmentError

    out_dir = Path(out_dir)
    export, state = out_dir / f"{phase.weights_id}.safetensors", out_dir / phase.weights_id / "last.pt"
    try:
        kept, _ = _made_so_far(phase, out_dir=out_dir, steps=steps)
    except InputError as error:  # the run would stop here: "kept" or "resumes" promised what it refuses
        return f"refused ({error})"
    except TextSegmentError:  # an export that is none: reproduce says so when it gets there
        kept = True
    if kept:
        return f"kept ({export})"
    if state.is_file():
        step = saved_step(state)
        return f"resumes {state}" + ("" if step is None else f" at step {step:,}")
    return "to train"


def _made_so_far(phase: Phase, *, out_dir: Path, steps: Optional[int]) -> tuple[bool, dict]:
    """Whether ``out_dir`` holds ``phase``'s export, and its run's saved config (``{}`` when none): what
    ``reproduce`` continues from and ``--dry-run`` shows. An export or a run made with another step count
    than ``steps`` (the recipe's when None) is refused: a quick check's folder is never the real run."""
    from ..checkpoint import read_checkpoint_info

    export, run_dir = out_dir / f"{phase.weights_id}.safetensors", out_dir / phase.weights_id
    if export.is_file():
        _check_same_steps(export, read_checkpoint_info(export).metadata.get("steps_per_phase"), steps)
        return True, {}
    saved = read_json(run_dir / "config.json", "run config") if (run_dir / "config.json").is_file() else {}
    ran, wanted = saved.get("steps"), steps if steps is not None else phase.config.steps
    if ran is not None and ran != wanted:
        raise InputError(f"{run_dir} holds a run of {ran} steps, not {wanted}: give another --out folder")
    return False, saved


def _resuming(state: Path, steps: int) -> str:
    """``resuming at step 2,100 of 3,000``: how much of the phase is left, not only its length."""
    step = saved_step(state)
    return f"resuming {steps:,} steps" if step is None else f"resuming at step {step:,} of {steps:,}"


def _check_same_steps(made: Path, made_with: Optional[int], asked: Optional[int]) -> None:
    """Refuse to continue a reproduction made with another step count (a quick check's folder, say)."""
    if made_with != asked:
        def said(n: Optional[int]) -> str:
            return "the recipes' steps" if n is None else f"{n} steps per phase"

        raise InputError(f"{made} was made with {said(made_with)}, not {said(asked)}: give another --out folder")
