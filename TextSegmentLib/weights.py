"""Known weights, the local cache, and ``load_model``: the one door to a trained model.

Where weights come from, in order: a file bundled in the package (``data/weights/``), the cache
(``$TEXTSEGMENT_HOME/weights/<id>/<file>``), then a download from the manifest's URLs (never
in offline mode). Every file is checked against the manifest's sha256 before it is used or
cached; a file that does not match is refused, never "fixed" silently. Missing weights are an
error that says what to do: there is no silent fall-back to a random model, which would produce
confident nonsense. Random weights exist only when asked for by name (``weights="random"``).

The manifest (``data/weights_manifest.json``, or ``$TEXTSEGMENT_MANIFEST``) is data: adding
trained weights is adding an entry. Files a user imports are recorded beside the cache in
``$TEXTSEGMENT_HOME/weights/imported.json`` and resolved by id like manifest entries.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from .errors import InputError, WeightsError
from .progress import MonotonicProgress, ProgressCallback, check_cancel

log = logging.getLogger(__name__)

ENV_HOME = "TEXTSEGMENT_HOME"
ENV_MANIFEST = "TEXTSEGMENT_MANIFEST"
OFFLINE_VARIABLES = ("TEXTSEGMENT_OFFLINE", "HF_HUB_OFFLINE")
KINDS = ("checkpoint", "backbone")
RANDOM = "random"

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
MANIFEST_FORMAT_VERSION = 1
DOWNLOAD_TIMEOUT_S = 60.0
STALE_PART_S = 24 * 3600.0  # a temp file untouched this long is no download in progress: a killed one's leftover
_CHUNK = 1 << 20
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

PathLike = Union[str, os.PathLike]
CancelLike = Union[Callable[[], bool], Any, None]


# --------------------------------------------------------------------------- manifest entries


@dataclass(frozen=True)
class WeightsEntry:
    """One set of known weights: a TextSegment checkpoint, or a backbone used by the models."""

    id: str
    model: str  # the preset name (for a backbone: its open_clip id)
    kind: str = "checkpoint"
    version: str = ""
    file: str = ""
    urls: tuple[str, ...] = ()
    sha256: Optional[str] = None  # of the whole file
    size: Optional[int] = None  # bytes
    licence: str = "unknown"
    description: str = ""
    bundled: bool = False  # shipped in the package at data/weights/<file>
    default: bool = False  # the model's default weights
    revision: Optional[str] = None  # hub revision to pin (backbones)
    origin: str = "manifest"  # "manifest" or "imported"

    @classmethod
    def from_dict(cls, data: Any, *, where: str, origin: str = "manifest") -> "WeightsEntry":
        """Validate one manifest/registry entry; any problem names the file and the entry."""
        if not isinstance(data, dict):
            raise WeightsError(f"{where}: each weights entry must be a JSON object")
        label = f"{where}: entry {data.get('id', '?')!r}"
        known = {f.name for f in dataclasses.fields(cls)} - {"origin"}
        for key in sorted(set(data) - known):
            log.debug("%s: ignoring unknown key %r", label, key)
        values = {key: data[key] for key in known if key in data and data[key] is not None}
        if not isinstance(values.get("urls", []), list):
            raise WeightsError(f"{label}: 'urls' must be a list of URLs, e.g. [\"https://...\"]")
        for key in ("bundled", "default"):  # bool("false") is True: a quoted flag would flip its meaning
            if not isinstance(values.get(key, False), bool):
                raise WeightsError(f"{label}: {key!r} must be true or false (a JSON boolean), not {values[key]!r}")
        try:
            entry = cls(
                id=str(values["id"]),
                model=str(values["model"]),
                kind=str(values.get("kind", "checkpoint")),
                version=str(values.get("version", "")),
                file=str(values.get("file", "")),
                urls=tuple(str(url) for url in values.get("urls", ())),
                sha256=str(values["sha256"]).lower() if "sha256" in values else None,
                size=int(values["size"]) if "size" in values else None,
                licence=str(values.get("licence", "unknown")),
                description=str(values.get("description", "")),
                bundled=values.get("bundled", False),
                default=values.get("default", False),
                revision=str(values["revision"]) if "revision" in values else None,
                origin=origin,
            )
        except KeyError as exc:
            raise WeightsError(f"{label} lacks the required key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{label} has a malformed value: {exc}") from None
        entry._validate(label)
        return entry

    def _validate(self, label: str) -> None:
        if not _PLAIN_NAME.match(self.id):
            raise WeightsError(f"{label}: id must be letters, digits, '.', '_' or '-'")
        if self.kind not in KINDS:
            raise WeightsError(f"{label}: kind must be one of {list(KINDS)}, not {self.kind!r}")
        if self.kind == "checkpoint":
            if not _PLAIN_NAME.match(self.file):
                raise WeightsError(f"{label}: 'file' must be a plain file name")
            if self.sha256 is None or not _SHA256.match(self.sha256):
                raise WeightsError(f"{label}: a checkpoint needs its sha256 (64 hex digits)")
        elif self.default or self.bundled:
            raise WeightsError(f"{label}: a backbone cannot be a model's default or bundled weights")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["urls"] = list(self.urls)
        return data


@dataclass(frozen=True)
class Manifest:
    entries: tuple[WeightsEntry, ...]
    path: Optional[Path] = None

    def get(self, weights_id: str) -> Optional[WeightsEntry]:
        return next((e for e in self.entries if e.id == weights_id), None)

    def default_for(self, model_name: str) -> Optional[WeightsEntry]:
        return next((e for e in self.entries if e.default and e.kind == "checkpoint" and e.model == model_name), None)


def load_manifest(path: Optional[PathLike] = None) -> Manifest:
    """The manifest at ``path``, else ``$TEXTSEGMENT_MANIFEST``, else the one shipped in the package."""
    path = Path(path or os.environ.get(ENV_MANIFEST) or PACKAGE_DATA / "weights_manifest.json")
    entries = _read_entries(path, origin="manifest", kind_of_file="weights manifest")
    seen: set[str] = set()
    defaults: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise WeightsError(f"weights manifest {path}: the id {entry.id!r} appears twice")
        seen.add(entry.id)
        if entry.default:
            if entry.model in defaults:
                raise WeightsError(f"weights manifest {path}: model {entry.model!r} has more than one default entry")
            defaults.add(entry.model)
    return Manifest(entries=tuple(entries), path=path)


def _read_entries(path: Path, *, origin: str, kind_of_file: str) -> list[WeightsEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{kind_of_file} {path} not found; check {ENV_MANIFEST} or reinstall TextSegment") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{kind_of_file} {path} cannot be read ({exc}); fix or delete it") from None
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        raise WeightsError(f"{kind_of_file} {path} must be a JSON object with a 'weights' list; fix or delete it")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeightsError(f"{kind_of_file} {path}: 'format_version' must be a whole number, not {version!r}; fix or delete it")
    if version > MANIFEST_FORMAT_VERSION:
        raise WeightsError(f"{kind_of_file} {path} is of a newer format than this TextSegment reads; update TextSegment")
    return [WeightsEntry.from_dict(item, where=f"{kind_of_file} {path}", origin=origin) for item in data["weights"]]


def _as_manifest(manifest: Union[Manifest, PathLike, None]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


# --------------------------------------------------------------------------- places and modes


def textsegment_home(home: Optional[PathLike] = None) -> Path:
    """``home``, else ``$TEXTSEGMENT_HOME``, else the user's cache folder (``~/.cache/textsegment`` on Linux)."""
    chosen = home or os.environ.get(ENV_HOME)
    if chosen:
        return Path(chosen).expanduser().resolve()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
        return base / "textsegment" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "textsegment"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textsegment"


def offline_reason() -> Optional[str]:
    """The environment variable that switches offline mode on, or None when online."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    return None


def is_offline() -> bool:
    return offline_reason() is not None


def bundled_path(entry: WeightsEntry) -> Path:
    return PACKAGE_DATA / "weights" / entry.file


def cache_path(entry: WeightsEntry, *, home: Optional[PathLike] = None) -> Path:
    return textsegment_home(home) / "weights" / entry.id / entry.file


def imported_registry_path(*, home: Optional[PathLike] = None) -> Path:
    return textsegment_home(home) / "weights" / "imported.json"


def sha256_file(path: PathLike, *, cancel: CancelLike = None) -> str:
    """The file's sha256; a file that cannot be read is a ``WeightsError`` naming it."""
    from .checkpoint import unreadable_error

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                check_cancel(cancel)
                digest.update(chunk)
    except OSError as exc:
        raise unreadable_error(Path(path), exc) from None
    return digest.hexdigest()


# --------------------------------------------------------------------------- what is known, what is here


def known_weights(*, manifest: Union[Manifest, PathLike, None] = None, home: Optional[PathLike] = None) -> list[WeightsEntry]:
    """Manifest entries, then the ones imported on this machine."""
    entries = list(_as_manifest(manifest).entries)
    ids = {e.id for e in entries}
    for entry in _read_imported(home):
        if entry.id in ids:
            log.warning("imported weights %r are shadowed by the manifest entry of the same id", entry.id)
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
    manifest = _as_manifest(manifest)
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
            if entry.origin == "imported":  # nothing can download it: only importing the file again brings it back
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
            for part in _part_files(cache_path(state.entry, home=home)):
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
    known = known_weights(manifest=manifest, home=home)
    if spec is None:
        entry = _as_manifest(manifest).default_for(model_name)
        if entry is None:
            raise WeightsError(
                f"no trained weights are known for {model_name}; pass --weights PATH (a TextSegment checkpoint) "
                "or an imported id, or --weights random for a meaningless random model (tests/benchmarks)"
                + _known_ids_hint(known, model_name)
            )
        return _resolve_entry(entry, home=home, offline=offline, known=known, progress=progress, cancel=cancel)
    if not isinstance(spec, os.PathLike):
        entry = next((e for e in known if e.id == spec), None)
        if entry is not None:
            if entry.kind != "checkpoint":
                raise WeightsError(f"{entry.id!r} is a {entry.kind}, not weights for {model_name}; pass a TextSegment checkpoint")
            if entry.model != model_name:
                raise WeightsError(f"weights {entry.id!r} are for model {entry.model!r}, not {model_name!r}; choose weights for {model_name!r}")
            return _resolve_entry(entry, home=home, offline=offline, known=known, progress=progress, cancel=cancel)
    path = Path(spec).expanduser()
    if path.is_file():
        return WeightsSource(kind="file", path=path, origin="path")
    if path.is_dir():
        raise WeightsError(
            f"weights {str(spec)!r} for {model_name}: is a folder; pass the checkpoint file itself (a .safetensors file)"
        )
    raise WeightsError(
        f"weights {str(spec)!r} for {model_name}: no such file, and not a known weights id; check the path, "
        "or see `textsegment weights list`" + _known_ids_hint(known, model_name)
    )


def _resolve_entry(
    entry: WeightsEntry,
    *,
    home: Optional[PathLike],
    offline: Optional[bool],
    known: list[WeightsEntry],
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
            f"{todo}" + _known_ids_hint(known, entry.model)
        )
    return WeightsSource(
        kind="file", path=_download(entry, where, progress=progress, cancel=cancel), entry=entry, origin="download", verified=True
    )


def _download(entry: WeightsEntry, dest: Path, *, progress: Optional[ProgressCallback], cancel: CancelLike) -> Path:
    """Fetch into a temp file beside ``dest``, check the sha256, and only then rename it into place."""
    report = MonotonicProgress(progress)
    _make_cache_folder(dest.parent)
    _remove_stale_parts(dest)
    failures = []
    for url in entry.urls:
        if not url.lower().startswith(("https://", "http://")):
            failures.append(f"{url}: not an http(s) URL")
            continue
        fd, tmp_name = _cache_temp_file(dest)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                total = entry.size or int(response.headers.get("Content-Length") or 0)
                content_type = str(response.headers.get("Content-Type") or "")
                start = b""
                done = 0
                log.info("downloading weights %s from %s", entry.id, url)
                while chunk := response.read(_CHUNK):
                    check_cancel(cancel)
                    done += len(chunk)
                    if entry.size is not None and done > entry.size:
                        raise WeightsError(f"{url}: the download is larger than the {entry.size} bytes the manifest records")
                    digest.update(chunk)
                    out.write(chunk)
                    start = start if len(start) >= 512 else (start + chunk)[:512]
                    report(done / total if total else 0.0, f"downloading {entry.id}: {done / 1e6:.1f} MB")
            if digest.hexdigest() != entry.sha256:
                failures.append(
                    f"{url}: sha256 {digest.hexdigest()} does not match the manifest's {entry.sha256} "
                    f"({_why_mismatch(entry, done, content_type, start)}; refused and not cached)"
                )
                tmp.unlink(missing_ok=True)
                continue
            os.replace(tmp, dest)
            report(1.0, f"downloaded {entry.id}")
            log.info("weights %s verified and cached at %s", entry.id, dest)
            return dest
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, WeightsError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
            tmp.unlink(missing_ok=True)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    raise WeightsError(
        f"could not download weights {entry.id!r}: " + "; ".join(failures)
        + f". Try again later, or get {entry.file} (sha256 {entry.sha256}) another way and run `textsegment weights import FILE`"
    )


def _part_files(dest: Path) -> list[Path]:
    """The temp files (``_cache_temp_file``) of downloads and imports into ``dest``, finished or not."""
    return sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*.part")) if dest.parent.is_dir() else []


def _remove_stale_parts(dest: Path) -> None:
    """Delete temp files a killed download left; one touched within ``STALE_PART_S`` may be another process's, and stays."""
    for part in _part_files(dest):
        try:
            if time.time() - part.stat().st_mtime > STALE_PART_S:
                part.unlink()
                log.info("removed %s, left by an interrupted download", part)
        except OSError as exc:  # gone already (another process cleaned it), or not ours to delete
            log.debug("cannot remove %s: %s", part, exc)


def _why_mismatch(entry: WeightsEntry, received: int, content_type: str, start: bytes) -> str:
    """The likely cause of a download that is not the file: a web page, a cut-off transfer, or damage."""
    head = start.lstrip().lower()
    if content_type.lower().startswith(("text/html", "application/xhtml")) or head.startswith((b"<!doctype html", b"<html")):
        return ("the server sent a web page, not the weights file: a login, consent or error page? "
                "Check the URL in a browser, or download the file there and import it")
    if entry.size is not None and received < entry.size:
        return f"the download is incomplete: {received} of {entry.size} bytes; try again"
    return "corrupt or tampered"


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


def _known_ids_hint(known: Iterable[WeightsEntry], model_name: str) -> str:
    ids = [e.id for e in known if e.kind == "checkpoint" and e.model == model_name]
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


# --------------------------------------------------------------------------- importing a file the user has


def import_weights(
    path: PathLike,
    *,
    weights_id: Optional[str] = None,
    manifest: Union[Manifest, PathLike, None] = None,
    home: Optional[PathLike] = None,
) -> WeightsEntry:
    """Copy a checkpoint into the cache (the user's file is only read) and make it resolvable by id.

    A file that is a known manifest entry (same sha256) fills that entry's cache slot, so the
    offline route is: download once elsewhere, ``textsegment weights import FILE`` here. Without
    ``weights_id``, a file imported before (same sha256, under any file name) fills its entry's slot too.
    """
    from .checkpoint import verify_checkpoint_data
    from .models.registry import get_model_config

    source = Path(path).expanduser()
    if source.is_dir():
        raise InputError(f"cannot import {source}: it is a folder; pass the checkpoint file itself (a .safetensors file)")
    if not source.is_file():
        raise InputError(f"cannot import {source}: no such file")
    info = verify_checkpoint_data(source)
    try:
        get_model_config(info.model_name)
    except Exception as exc:
        raise WeightsError(f"{source} holds weights for model {info.model_name!r}, which this TextSegment cannot build ({exc})") from None
    digest = sha256_file(source)
    known_manifest = _as_manifest(manifest)
    for entry in known_manifest.entries:
        if entry.kind == "checkpoint" and entry.sha256 == digest:
            _copy_verified(source, cache_path(entry, home=home), digest)
            if weights_id is not None and weights_id != entry.id:
                log.warning("%s is the known weights %s: imported as %s, not as %r", source, entry.id, entry.id, weights_id)
            log.info("imported %s as the known weights %s", source, entry.id)
            return entry

    imported = _read_imported(home)
    if weights_id is None:  # a file imported before (under any name) fills that entry's cache slot, as above
        same = next((e for e in imported if e.sha256 == digest and known_manifest.get(e.id) is None), None)
        if same is not None:
            _copy_verified(source, cache_path(same, home=home), digest)
            log.info("imported %s as the weights %s imported before", source, same.id)
            return same

    weights_id = weights_id or (re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-._") or "weights")
    if not _PLAIN_NAME.match(weights_id):
        raise InputError(f"weights id {weights_id!r} must be letters, digits, '.', '_' or '-'")
    if known_manifest.get(weights_id) is not None:
        raise InputError(f"the id {weights_id!r} belongs to known weights with other contents; choose another id (--id NAME)")
    previous = next((e for e in imported if e.id == weights_id), None)
    if previous is not None and previous.sha256 != digest:
        raise InputError(
            f"weights with id {weights_id!r} were imported before with other contents; choose another id (--id NAME)"
        )
    entry = WeightsEntry(
        id=weights_id,
        model=info.model_name,
        version=str(info.metadata.get("version", "local")),
        file=previous.file if previous else _plain_file_name(source.name),
        sha256=digest,
        size=source.stat().st_size,
        licence=str(info.metadata.get("licence", "unknown")),
        description=str(info.metadata.get("description", f"imported from {source}")),
        origin="imported",
    )
    _copy_verified(source, cache_path(entry, home=home), digest)
    if previous is None:
        _write_imported(home, imported + [entry])
    log.info("imported %s as %s", source, entry.id)
    return entry


def _plain_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip("-._") or "weights.safetensors"


def _copy_verified(source: Path, dest: Path, digest: str) -> None:
    """Copy unless a good copy is there; hash what was copied, so a file changing mid-copy is caught."""
    if dest.is_file() and sha256_file(dest) == digest:
        return
    _make_cache_folder(dest.parent)
    _remove_stale_parts(dest)  # a killed import's leftovers, as a download clears its own
    fd, tmp_name = _cache_temp_file(dest)
    try:
        check = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(source, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                check.update(chunk)
                out.write(chunk)
        if check.hexdigest() != digest:
            raise WeightsError(f"{source} changed while it was being imported; try again")
        os.replace(tmp_name, dest)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise WeightsError(f"cannot copy {source} into the weights cache at {dest} ({exc}); nothing was imported") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _make_cache_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(_unwritable(folder, exc)) from None


def _cache_temp_file(dest: Path) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise WeightsError(_unwritable(dest.parent, exc)) from None


def _unwritable(folder: Path, exc: OSError) -> str:
    return (
        f"cannot write to the weights cache folder {folder} ({exc.strerror or exc}); make it writable, "
        f"or set {ENV_HOME} to a writable folder"
    )


def _read_imported(home: Optional[PathLike]) -> list[WeightsEntry]:
    path = imported_registry_path(home=home)
    if not path.is_file():
        return []
    return _read_entries(path, origin="imported", kind_of_file="imported-weights registry")


def _write_imported(home: Optional[PathLike], entries: list[WeightsEntry]) -> None:
    path = imported_registry_path(home=home)
    _make_cache_folder(path.parent)
    records = [{k: v for k, v in e.to_dict().items() if k != "origin"} for e in entries]
    text = json.dumps({"format_version": MANIFEST_FORMAT_VERSION, "weights": records}, indent=2) + "\n"
    fd, tmp_name = _cache_temp_file(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp_name, path)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise WeightsError(f"cannot write the imported-weights registry {path} ({exc}); make it writable") from None
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


__all__ = [
    "Manifest",
    "VerifyResult",
    "WeightsEntry",
    "WeightsSource",
    "WeightsStatus",
    "cache_path",
    "import_weights",
    "is_offline",
    "known_weights",
    "list_weights",
    "load_manifest",
    "load_model",
    "resolve_weights",
    "sha256_file",
    "textsegment_home",
    "verify_weights",
    "weights_record",
]
