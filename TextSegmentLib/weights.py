"""Resolving a ``--weights`` option and ``load_model``: the one door to a trained model.

Where weights come from, in order: a file bundled in the package (``data/weights/``), the cache
(``$TEXTSEGMENT_HOME/weights/<id>/<file>``), then a download from the manifest's URLs (never
in offline mode). Every file is checked against the manifest's sha256 before it is used or
cached; a file that does not match is refused, never "fixed" silently. Missing weights are an
error that says what to do: there is no silent fall-back to a random model, which would produce
confident nonsense. Random weights exist only when asked for by name (``weights="random"``).

What is known and where it lives is ``weights_manifest``; filling the cache is ``weights_cache``.
Their public names are re-exported here, so ``TextSegmentLib.weights`` stays the one module to import.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .errors import WeightsError
from .progress import ProgressCallback
from .weights_cache import STALE_PART_S, download_entry, import_weights, part_files, read_imported
from .weights_manifest import (
    ENV_HOME,
    ENV_MANIFEST,
    OFFLINE_VARIABLES,
    PACKAGE_DATA,
    CancelLike,
    Manifest,
    PathLike,
    WeightsEntry,
    as_manifest,
    bundled_path,
    cache_path,
    imported_registry_path,
    is_offline,
    load_manifest,
    offline_reason,
    sha256_file,
    textsegment_home,
)

log = logging.getLogger(__name__)

RANDOM = "random"


# --------------------------------------------------------------------------- what is known, what is here


def known_weights(*, manifest: Union[Manifest, PathLike, None] = None, home: Optional[PathLike] = None) -> list[WeightsEntry]:
    """Manifest entries, then the ones imported on this machine."""
    entries = list(as_manifest(manifest).entries)
    ids = {e.id for e in entries}
    for entry in read_imported(home):
        if entry.id in ids:
            log.warning(
                "imported weights %r are shadowed by the manifest entry of the same id and cannot be used by it; "
                "import their file (in the cache: %s) again under another id: `textsegment weights import FILE --id NEW`",
                entry.id, cache_path(entry, home=home),
            )
            continue
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class WeightsStatus:
    """``status``: bundled | cached | remote (downloadable) | missing; ``path`` where it lies, if anywhere.

    ``default``: these are the weights its model loads when none are named (``Manifest.default_for``).
    """

    entry: WeightsEntry
    status: str
    path: Optional[Path] = None
    default: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**self.entry.to_dict(), "default": self.default, "status": self.status,
                "path": None if self.path is None else str(self.path)}


def list_weights(*, manifest: Union[Manifest, PathLike, None] = None, home: Optional[PathLike] = None) -> list[WeightsStatus]:
    """Every known entry with where it is; touches only the local disk."""
    manifest = as_manifest(manifest)
    # only the manifest names defaults (an imported entry's own "default" flag is never used: see resolve_weights)
    defaults = {entry.id for entry in manifest.entries if manifest.default_for(entry.model) is entry}
    return [
        dataclasses.replace(_status(entry, home=home), default=entry.origin == "manifest" and entry.id in defaults)
        for entry in known_weights(manifest=manifest, home=home)
    ]


def _status(entry: WeightsEntry, *, home: Optional[PathLike]) -> WeightsStatus:
    if entry.kind == "backbone":
        path = _hub_cached_file(entry)
        return WeightsStatus(entry, "cached", path) if path else WeightsStatus(entry, "remote" if entry.urls else "missing")
    if entry.bundled and bundled_path(entry).is_file():
        return WeightsStatus(entry, "bundled", bundled_path(entry))
    cached = cache_path(entry, home=home)
    if cached.is_file():
        return WeightsStatus(entry, "cached", cached)
    return WeightsStatus(entry, "remote" if entry.urls else "missing")


def _hub_cached_file(entry: WeightsEntry) -> Optional[Path]:
    """A backbone already in the Hugging Face cache (looked up on disk only, never on the network)."""
    hub = next((u[len("hf-hub:") :] for u in entry.urls if u.startswith("hf-hub:")), None)
    if not hub or not entry.file:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub, entry.file, revision=entry.revision)
    except Exception as exc:  # a broken HF cache must not break `weights list`
        log.debug("cannot look up %s in the Hugging Face cache: %s", hub, exc)
        return None
    return Path(found) if isinstance(found, str) else None


@dataclass(frozen=True)
class VerifyResult:
    """``status``: ok | tampered | unreadable | missing (not on this machine) | unverified (no checksum known)
    | leftover (a partial download left by a killed process; ``path`` is that temp file)."""

    entry: WeightsEntry
    status: str
    path: Optional[Path] = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.entry.id, "model": self.entry.model, "status": self.status,
                "path": None if self.path is None else str(self.path), "message": self.message}


def verify_weights(
    *, manifest: Union[Manifest, PathLike, None] = None, home: Optional[PathLike] = None, cancel: CancelLike = None
) -> list[VerifyResult]:
    """Re-hash every known file on this machine against its recorded sha256."""
    results = []
    states = list_weights(manifest=manifest, home=home)
    for state in states:
        entry = state.entry
        if state.path is None:
            note = "not on this machine"
            if entry.kind == "backbone":  # nothing to import: open_clip reads it from the Hugging Face cache
                note = ("not in the Hugging Face cache; only models built on it need it: loading one online downloads "
                        "it, offline copy its files into a folder and point the model's clip_source at 'local-dir:FOLDER'")
            elif entry.origin == "imported":  # nothing can download it: only importing the file again brings it back
                note = (f"imported before, but its file is gone from the cache ({cache_path(entry, home=home)}); "
                        f"import it again with `textsegment weights import FILE --id {entry.id}`")
            results.append(VerifyResult(entry, "missing", None, note))
            continue
        paths = [state.path]
        if state.status == "bundled" and cache_path(entry, home=home).is_file():
            paths.append(cache_path(entry, home=home))
        for path in paths:
            if not entry.sha256:
                results.append(VerifyResult(entry, "unverified", path, "no sha256 recorded for it"))
                continue
            try:
                actual = sha256_file(path, cancel=cancel)
            except WeightsError as exc:  # one unreadable file must not hide the state of the others
                results.append(VerifyResult(entry, "unreadable", path, str(exc)))
                continue
            if actual == entry.sha256:
                results.append(VerifyResult(entry, "ok", path))
            else:
                results.append(VerifyResult(entry, "tampered", path, _tampered_message(path, entry, actual)))
    for state in states:
        if state.entry.kind == "checkpoint":
            for part in part_files(cache_path(state.entry, home=home)):
                results.append(VerifyResult(state.entry, "leftover", part, (
                    f"{part}: a partial download or import, killed (or still running); unless in progress, delete it, "
                    f"or the next download of {state.entry.id} removes it once it is {STALE_PART_S / 3600:.0f} hours old")))
    return results


# --------------------------------------------------------------------------- resolving a --weights option


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from. ``verified``: the whole file matched a known sha256."""

    kind: str  # "random" or "file"
    path: Optional[Path] = None
    entry: Optional[WeightsEntry] = None
    origin: str = ""  # random | bundled | cache | download | path
    verified: bool = False
    info: Any = None  # the CheckpointInfo, once loaded

    @property
    def is_random(self) -> bool:
        return self.kind == RANDOM

    @property
    def label(self) -> str:
        """A short human name for reports: the manifest id, else the file name, else 'random'."""
        if self.entry is not None:
            return self.entry.id
        return "random" if self.is_random else (self.path.name if self.path else "unknown")

    @property
    def licence(self) -> str:
        if self.info is not None and self.info.metadata.get("licence"):
            return str(self.info.metadata["licence"])
        return self.entry.licence if self.entry is not None else "unknown"


def resolve_weights(
    spec: Union[str, os.PathLike, None],
    *,
    model_name: str,
    offline: Optional[bool] = None,
    manifest: Union[Manifest, PathLike, None] = None,
    home: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelLike = None,
) -> WeightsSource:
    """Turn ``--weights`` (None = the model's default, "random", an id, or a file path) into a usable file.

    ``offline`` None follows the environment (``TEXTSEGMENT_OFFLINE`` / ``HF_HUB_OFFLINE``).
    """
    if spec == RANDOM:
        return WeightsSource(kind=RANDOM, origin=RANDOM)
    if isinstance(spec, str) and not spec.strip():  # `--weights "$UNSET"`: Path("") is the current folder
        raise WeightsError(
            f"weights for {model_name}: the weights option is empty; leave it out for the model's default weights, "
            "or give an id (see `textsegment weights list`), a checkpoint file, or 'random'"
        )
    manifest = as_manifest(manifest)
    # the imported-weights registry is read only when the manifest does not answer: a broken one must not
    # stop a run on shipped weights
    if spec is None:
        entry = manifest.default_for(model_name)
        if entry is None:
            raise WeightsError(
                f"no trained weights are known for {model_name}; pass --weights PATH (a TextSegment checkpoint) "
                "or an imported id, or --weights random for a meaningless random model (tests/benchmarks)"
                + _known_ids_hint(manifest, home, model_name)
            )
        return _resolve_entry(entry, home=home, offline=offline, manifest=manifest, progress=progress, cancel=cancel)
    if not isinstance(spec, os.PathLike):
        entry = manifest.get(spec) or _imported_entry(str(spec), manifest=manifest, home=home)
        if entry is not None:
            if entry.kind != "checkpoint":
                raise WeightsError(f"{entry.id!r} is a {entry.kind}, not weights for {model_name}; pass a TextSegment checkpoint")
            if entry.model != model_name:
                raise WeightsError(f"weights {entry.id!r} are for model {entry.model!r}, not {model_name!r}; choose weights for {model_name!r}")
            return _resolve_entry(entry, home=home, offline=offline, manifest=manifest, progress=progress, cancel=cancel)
    path = Path(spec).expanduser()
    if path.is_file():
        return WeightsSource(kind="file", path=path, origin="path")
    if path.is_dir():
        raise WeightsError(
            f"weights {str(spec)!r} for {model_name}: is a folder; pass the checkpoint file itself (a .safetensors file)"
        )
    raise WeightsError(
        f"weights {str(spec)!r} for {model_name}: no such file, and not a known weights id; check the path, "
        "or see `textsegment weights list`" + _known_ids_hint(manifest, home, model_name)
    )


def _resolve_entry(
    entry: WeightsEntry,
    *,
    home: Optional[PathLike],
    offline: Optional[bool],
    manifest: Manifest,
    progress: Optional[ProgressCallback],
    cancel: CancelLike,
) -> WeightsSource:
    places = [(bundled_path(entry), "bundled")] if entry.bundled else []
    places.append((cache_path(entry, home=home), "cache"))
    refused: list[str] = []
    for path, origin in places:
        if path.is_file():
            actual = sha256_file(path, cancel=cancel)
            if actual != entry.sha256:
                refused.append(_tampered_message(path, entry, actual))
                continue
            for message in refused:  # a bad bundled file with a good imported copy in the cache: use the good one
                log.warning("%s; using the good copy at %s", message, path)
            return WeightsSource(kind="file", path=path, entry=entry, origin=origin, verified=True)
    if refused:
        raise WeightsError(refused[0])
    reason = offline_reason() if offline is None else ("offline=True" if offline else None)
    where = cache_path(entry, home=home)
    if reason or not entry.urls:
        why = f"offline mode is on ({reason})" if reason else "they have no download URL"
        todo = f"run `textsegment weights import FILE` with a copy of {entry.file} (sha256 {entry.sha256})"
        if reason and entry.urls:
            todo += f", or unset {' / '.join(OFFLINE_VARIABLES)} to download them"
        raise WeightsError(
            f"weights {entry.id!r} for {entry.model} are not on this machine (looked in {where}) and {why}; "
            f"{todo}" + _known_ids_hint(manifest, home, entry.model, here_only=True)
        )
    return WeightsSource(
        kind="file", path=download_entry(entry, where, progress=progress, cancel=cancel), entry=entry, origin="download", verified=True
    )


def _tampered_message(path: Path, entry: WeightsEntry, actual: str) -> str:
    return (
        f"{path} does not match the sha256 recorded for weights {entry.id!r} (expected {entry.sha256}, got {actual}): "
        f"the file is tampered with or corrupt and was not used. {_how_to_restore(path, entry)}"
    )


def _how_to_restore(path: Path, entry: WeightsEntry) -> str:
    """What brings back a good copy: only entries with a URL can be re-downloaded; a bundled file comes with the package."""
    if entry.bundled and path == bundled_path(entry):
        return (
            f"It was installed with TextSegment: reinstall TextSegment to restore it, or import a good copy of {entry.file} "
            f"(sha256 {entry.sha256}) with `textsegment weights import FILE` (a good copy in the cache is used instead)"
        )
    again = f"`textsegment weights import FILE --id {entry.id}`" if entry.origin == "imported" else "`textsegment weights import FILE`"
    good_copy = f"import a good copy of {entry.file} (sha256 {entry.sha256}) with {again}; it replaces the bad one"
    if entry.urls:
        return f"Delete it and run again to re-download, or {good_copy}"
    return good_copy[0].upper() + good_copy[1:]


def _imported_entry(spec: str, *, manifest: Manifest, home: Optional[PathLike]) -> Optional[WeightsEntry]:
    """The imported entry of that id; a broken registry does not stop a checkpoint given by its path."""
    try:
        known = known_weights(manifest=manifest, home=home)
    except WeightsError as exc:
        if not Path(spec).expanduser().is_file():
            raise
        log.warning("%s", exc)
        return None
    return next((e for e in known if e.id == spec), None)


def _known_ids_hint(manifest: Manifest, home: Optional[PathLike], model_name: str, *, here_only: bool = False) -> str:
    """The ids to try instead; ``here_only``: those usable without a download (offline, naming others does not help)."""
    try:
        known = known_weights(manifest=manifest, home=home)
    except WeightsError as exc:  # only a hint: the error being raised matters more than a broken registry
        log.warning("%s", exc)
        known = list(manifest.entries)
    ids = [
        e.id for e in known
        if e.kind == "checkpoint" and e.model == model_name and (not here_only or _status(e, home=home).path is not None)
    ]
    if here_only:
        return f". Weights for {model_name} on this machine: {', '.join(ids)}" if ids else f". No weights for {model_name} are on this machine"
    return f". Known weights for {model_name}: {', '.join(ids)}" if ids else ""


# --------------------------------------------------------------------------- the one door to a model


def weights_label(model: Any, weights: Optional[str] = None) -> str:
    """What to call the weights ``model`` carries in a report (see ``WeightsSource.label``)."""
    source = getattr(model, "weights_source", None)
    return source.label if source is not None else str(weights or "default")


def weights_record(model: Any, weights: Optional[str] = None) -> dict[str, Any]:
    """The weights that actually ran, for a legend or report (not the ``--weights`` option, None by default).

    ``weights``: as ``weights_label``; ``weights_file``: the file loaded; ``weights_sha256``: the whole
    file's, where a manifest or import knows it; ``weights_data_sha256``: the tensor bytes', from the
    checkpoint's header.
    """
    source = getattr(model, "weights_source", None)
    info = getattr(source, "info", None)
    return {
        "weights": weights_label(model, weights),
        "weights_file": str(source.path) if source is not None and source.path is not None else None,
        "weights_sha256": source.entry.sha256 if source is not None and source.entry is not None else None,
        "weights_data_sha256": info.data_sha256 if info is not None else None,
    }


def load_model(
    model_name: str,
    *,
    weights: Union[str, os.PathLike, None] = None,
    device: Any = "auto",
    offline: Optional[bool] = None,
    manifest: Union[Manifest, PathLike, None] = None,
    home: Optional[PathLike] = None,
    progress: Optional[ProgressCallback] = None,
    cancel: CancelLike = None,
    **overrides: Any,
) -> Any:
    """A ready model (weights loaded, ``.eval()``, on ``device``): what the engine, CLI and Slicer call.

    ``model.weights_source`` tells the caller where the weights came from and under which licence.
    """
    from .checkpoint import load_checkpoint
    from .devices import select_device
    from .models.registry import create_model, get_model_config

    target = select_device(device)
    get_model_config(model_name, **overrides)  # an unknown model or option fails before any download
    source = resolve_weights(
        weights, model_name=model_name, offline=offline, manifest=manifest, home=home, progress=progress, cancel=cancel
    )
    if source.is_random:
        model = create_model(model_name, **overrides)
        log.warning(
            "model %s has RANDOM weights (asked for with weights='random'): its output is meaningless; "
            "use it only for tests and benchmarks", model_name
        )
    else:
        model, info = load_checkpoint(
            source.path, device="cpu", expected_model=model_name, overrides=overrides, verify=not source.verified
        )
        source = dataclasses.replace(source, info=info)
    model = model.eval().to(target)
    model.weights_source = source
    return model


__all__ = [
    "ENV_HOME",
    "ENV_MANIFEST",
    "OFFLINE_VARIABLES",
    "PACKAGE_DATA",
    "RANDOM",
    "Manifest",
    "VerifyResult",
    "WeightsEntry",
    "WeightsSource",
    "WeightsStatus",
    "bundled_path",
    "cache_path",
    "import_weights",
    "imported_registry_path",
    "is_offline",
    "known_weights",
    "list_weights",
    "load_manifest",
    "load_model",
    "offline_reason",
    "resolve_weights",
    "sha256_file",
    "textsegment_home",
    "verify_weights",
    "weights_label",
    "weights_record",
]
