"""What weights are known and where they live: the manifest's entries, the cache's places, offline mode.

The manifest (``data/weights_manifest.json``, or ``$TEXTSEGMENT_MANIFEST``) is data: adding
trained weights is adding an entry. Files a user imports are recorded beside the cache in
``$TEXTSEGMENT_HOME/weights/imported.json`` in the same format. Nothing here writes or downloads:
``weights_cache`` fills the cache, ``weights`` resolves and loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .errors import WeightsError
from .progress import check_cancel

log = logging.getLogger(__name__)

ENV_HOME = "TEXTSEGMENT_HOME"
ENV_MANIFEST = "TEXTSEGMENT_MANIFEST"
OFFLINE_VARIABLES = ("TEXTSEGMENT_OFFLINE", "HF_HUB_OFFLINE")
KINDS = ("checkpoint", "backbone")

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
MANIFEST_FORMAT_VERSION = 1
CHUNK = 1 << 20  # bytes read at a time when hashing or copying a weights file
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
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
    # weights made by running another id's recipe chain again (with newer code): `reproduce` follows that chain
    recipes_of: Optional[str] = None
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
                recipes_of=str(values["recipes_of"]) if "recipes_of" in values else None,
                origin=origin,
            )
        except KeyError as exc:
            raise WeightsError(f"{label} lacks the required key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{label} has a malformed value: {exc}") from None
        entry._validate(label)
        return entry

    def _validate(self, label: str) -> None:
        if not PLAIN_NAME.match(self.id):
            raise WeightsError(f"{label}: id must be letters, digits, '.', '_' or '-'")
        if self.kind not in KINDS:
            raise WeightsError(f"{label}: kind must be one of {list(KINDS)}, not {self.kind!r}")
        if self.kind == "checkpoint":
            if not PLAIN_NAME.match(self.file):
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
    entries = read_entries(path, origin="manifest", kind_of_file="weights manifest")
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


def read_entries(path: Path, *, origin: str, kind_of_file: str) -> list[WeightsEntry]:
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


def as_manifest(manifest: Union[Manifest, PathLike, None]) -> Manifest:
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
            while chunk := stream.read(CHUNK):
                check_cancel(cancel)
                digest.update(chunk)
    except OSError as exc:
        raise unreadable_error(Path(path), exc) from None
    return digest.hexdigest()
