"""Filling the weights cache: downloads and imports.

Each file goes into a temp file beside its place, is hashed as it is written, and is renamed into
place only once its sha256 matches: a killed or failed transfer never leaves a file that looks
good. The user's own file is only read. Imported files are recorded in the cache's registry.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import InputError, WeightsError
from .progress import MonotonicProgress, ProgressCallback, check_cancel
from .weights_manifest import (
    CHUNK,
    ENV_HOME,
    MANIFEST_FORMAT_VERSION,
    PLAIN_NAME,
    CancelLike,
    Manifest,
    PathLike,
    WeightsEntry,
    as_manifest,
    read_entries,
    cache_path,
    imported_registry_path,
    sha256_file,
)

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0
STALE_PART_S = 24 * 3600.0  # a temp file untouched this long is no download in progress: a killed one's leftover


# --------------------------------------------------------------------------- downloading a manifest entry


def download_entry(entry: WeightsEntry, dest: Path, *, progress: Optional[ProgressCallback], cancel: CancelLike) -> Path:
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
                while chunk := response.read(CHUNK):
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


def part_files(dest: Path) -> list[Path]:
    """The temp files (``_cache_temp_file``) of downloads and imports into ``dest``, finished or not."""
    return sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*.part")) if dest.parent.is_dir() else []


def _remove_stale_parts(dest: Path) -> None:
    """Delete temp files a killed download left; one touched within ``STALE_PART_S`` may be another process's, and stays."""
    for part in part_files(dest):
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


# --------------------------------------------------------------------------- importing a file the user has


def import_weights(
    path: PathLike,
    *,
    weights_id: Optional[str] = None,
    manifest: Union[Manifest, PathLike, None] = None,
    home: Optional[PathLike] = None,
    replace: bool = False,
) -> WeightsEntry:
    """Copy a checkpoint into the cache (the user's file is only read) and make it resolvable by id.

    ``replace``: an id imported before with other contents is refused unless asked, as the cache's copy
    of those weights is then overwritten (a manifest id is never replaced).

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
    known_manifest = as_manifest(manifest)
    for entry in known_manifest.entries:
        if entry.kind == "checkpoint" and entry.sha256 == digest:
            _copy_verified(source, cache_path(entry, home=home), digest)
            if weights_id is not None and weights_id != entry.id:
                log.warning("%s is the known weights %s: imported as %s, not as %r", source, entry.id, entry.id, weights_id)
            log.info("imported %s as the known weights %s", source, entry.id)
            return entry

    imported = read_imported(home)
    if weights_id is None:  # a file imported before (under any name) fills that entry's cache slot, as above
        same = next((e for e in imported if e.sha256 == digest and known_manifest.get(e.id) is None), None)
        if same is not None:
            _copy_verified(source, cache_path(same, home=home), digest)
            log.info("imported %s as the weights %s imported before", source, same.id)
            return same

    weights_id = weights_id or (re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-._") or "weights")
    if not PLAIN_NAME.match(weights_id):
        raise InputError(f"weights id {weights_id!r} must be letters, digits, '.', '_' or '-'")
    if weights_id == "random":  # `--weights random` builds a meaningless random model: this id could never be used
        raise InputError("the weights id 'random' is reserved for a meaningless random model; choose another id (--id NAME)")
    if known_manifest.get(weights_id) is not None:
        raise InputError(f"the id {weights_id!r} belongs to known weights with other contents; choose another id (--id NAME)")
    previous = next((e for e in imported if e.id == weights_id), None)
    replacing = previous is not None and previous.sha256 != digest
    if replacing and not replace:
        raise InputError(
            f"weights with id {weights_id!r} were imported before with other contents ({previous.description}, "
            f"sha256 {previous.sha256}); choose another id (--id NAME), or pass --replace to replace them "
            "(their copy in the cache is overwritten; your own files are never touched)"
        )
    entry = WeightsEntry(
        id=weights_id,
        model=info.model_name,
        version=str(info.metadata.get("version", "local")),
        file=previous.file if previous else _plain_file_name(source.name),
        sha256=digest,
        size=source.stat().st_size,
        licence=str(info.metadata.get("licence", "unknown")),
        description=str(info.metadata.get("description", f"imported from {source.resolve()}")),
        origin="imported",
    )
    _copy_verified(source, cache_path(entry, home=home), digest)
    if previous is None:
        _write_imported(home, imported + [entry])
    elif replacing:
        _write_imported(home, [entry if e.id == weights_id else e for e in imported])
        log.warning("replaced the weights imported before as %s (sha256 %s)", weights_id, previous.sha256)
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
    failure = f"cannot copy {source} into the weights cache at {dest}", "nothing was imported"
    with _replacing(dest, failure=failure) as fd:
        check = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(source, "rb") as stream:
            while chunk := stream.read(CHUNK):
                check.update(chunk)
                out.write(chunk)
        if check.hexdigest() != digest:
            raise WeightsError(f"{source} changed while it was being imported; try again")


@contextlib.contextmanager
def _replacing(dest: Path, *, failure: tuple[str, str]) -> Iterator[int]:
    """A temp file beside ``dest`` (its descriptor) that replaces ``dest`` only when the block succeeds.

    On any failure the temp file is removed and ``dest`` is as it was; an ``OSError`` becomes a
    ``WeightsError`` reading "WHAT (the error); WHAT TO DO" from ``failure``.
    """
    fd, tmp_name = _cache_temp_file(dest)
    try:
        yield fd
        os.replace(tmp_name, dest)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise WeightsError(f"{failure[0]} ({exc}); {failure[1]}") from None
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


def read_imported(home: Optional[PathLike]) -> list[WeightsEntry]:
    path = imported_registry_path(home=home)
    if not path.is_file():
        return []
    try:
        return read_entries(path, origin="imported", kind_of_file="imported-weights registry")
    except WeightsError as exc:  # "delete it" alone would not say what deleting it costs
        raise WeightsError(
            f"{exc} (deleting it forgets the imported ids, not their files in {path.parent}: "
            "`textsegment weights import FILE --id ID` brings each back)"
        ) from None


def _write_imported(home: Optional[PathLike], entries: list[WeightsEntry]) -> None:
    path = imported_registry_path(home=home)
    _make_cache_folder(path.parent)
    records = [{k: v for k, v in e.to_dict().items() if k != "origin"} for e in entries]
    text = json.dumps({"format_version": MANIFEST_FORMAT_VERSION, "weights": records}, indent=2) + "\n"
    with _replacing(path, failure=(f"cannot write the imported-weights registry {path}", "make it writable")) as fd:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
