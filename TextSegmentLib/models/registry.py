"""Models are built by name from small configs, as timm and open_clip do.

A model family file registers its presets with ``@register_model("name")`` on a tiny function
that returns the family's config; ``create_model(name, **overrides)`` builds any of them.
Adding a model is adding a preset, not editing this file.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from ..errors import ModelError

_PRESETS: dict[str, Callable[[], Any]] = {}
_BUILDERS: dict[type, Callable[[Any], Any]] = {}
_FAMILY_MODULES = ("freqmedclip", "tgcnet")


def register_model(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator for a preset function returning a config dataclass."""

    def wrap(fn: Callable[[], Any]) -> Callable[[], Any]:
        _PRESETS[name] = fn
        return fn

    return wrap


def register_builder(config_type: type) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator for the function that builds a model from a config of ``config_type``."""

    def wrap(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        _BUILDERS[config_type] = fn
        return fn

    return wrap


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as exc:  # a family file not written yet is simply absent
            if exc.name != f"{__package__}.{module}":
                raise


def list_models() -> list[str]:
    _load_families()
    return sorted(_PRESETS)


def get_model_config(name: str, /, **overrides: Any) -> Any:
    """The preset's config with ``overrides`` applied (unknown keys are an error)."""
    _load_families()
    if name not in _PRESETS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(_PRESETS)) or 'none'}")
    config = _PRESETS[name]()
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ModelError(f"model {name!r} has no option(s) {unknown}; options: {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    return config


def build_model(config: Any) -> Any:
    """Build an (untrained, or backbone-initialised per the config) model from a config."""
    _load_families()
    builder = _BUILDERS.get(type(config))
    if builder is None:
        raise ModelError(f"no builder registered for config type {type(config).__name__}")
    return builder(config)


def create_model(name: str, /, **overrides: Any) -> Any:
    """Build model ``name`` with its weights untouched (see ``weights.load_model`` for trained ones)."""
    return build_model(get_model_config(name, **overrides))
