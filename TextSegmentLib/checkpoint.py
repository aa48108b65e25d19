"""Our checkpoint format: one ``.safetensors`` file that carries its own model config.

Why one file: it is the easiest thing to ship, download, checksum and import. The tensors are
the model's ``state_dict`` (parameters and persistent buffers); the safetensors header's
``__metadata__`` holds JSON-encoded strings:

* ``format`` = ``"textsegment-checkpoint"``, ``format_version``, ``textsegment_version``, ``created``;
* ``model`` (the preset name) and ``config`` (the config dataclass as a dict), so loading builds
  the model through the registry and needs nothing but the file;
* ``data_sha256``: the sha256 of the tensor bytes, so a checkpoint given by path is checked for
  corruption even when no manifest knows it (the manifest's sha256 covers the whole file);
* anything from ``metadata=`` (training data, metrics, licence, description, ...).

safetensors cannot execute code, so a file from anywhere is safe to open; we never unpickle.
Whether a parameter is frozen (``requires_grad``) belongs to the architecture, not the file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import InputError, ModelError, OutputExistsError, WeightsError

log = logging.getLogger(__name__)

FORMAT = "textsegment-checkpoint"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "textsegment_version", "created", "model", "config", "data_sha256")
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read from the header without loading any tensor."""

    path: Path
    model_name: str
    config: dict[str, Any]
    format_version: int
    textsegment_version: str
    created: str
    data_sha256: str
    metadata: dict[str, Any] = field(default_factory=dict)  # training data, metrics, licence, ...


def save_checkpoint(
    model: Any,
    path: PathLike,
    *,
    model_name: str,
    metadata: Optional[Mapping[str, Any]] = None,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Write ``model``'s weights and config to ``path`` atomically (temp file, then rename)."""
    import safetensors.torch

    from . import __version__
    from .models.registry import get_model_config

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists already; choose another name or pass overwrite=True")
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise ModelError(f"cannot save {type(model).__name__}: it has no config dataclass in `.config`")
    preset_type = type(get_model_config(model_name))
    if type(config) is not preset_type:
        raise ModelError(
            f"cannot save as {model_name!r}: that preset builds a {preset_type.__name__}, "
            f"but this model's config is a {type(config).__name__}"
        )
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "textsegment_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "config": dataclasses.asdict(config),
    }
    extra = dict(metadata or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise InputError(f"checkpoint metadata may not set reserved key(s) {clash}")
    header.update(extra)
    try:
        encoded = {str(key): json.dumps(value, allow_nan=False) for key, value in header.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(f"checkpoint config/metadata for {model_name!r} is not plain JSON: {exc}") from None

    blob = safetensors.torch.save(_plain_tensors(model.state_dict()), metadata=encoded)
    header_bytes, data = _split(blob)
    data_sha256 = hashlib.sha256(data).hexdigest()
    header_json = json.loads(header_bytes)
    header_json["__metadata__"]["data_sha256"] = json.dumps(data_sha256)
    new_header = json.dumps(header_json, separators=(",", ":")).encode("utf-8")
    new_header += b" " * (-len(new_header) % 8)  # safetensors keeps the tensor data 8-byte aligned

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(new_header).to_bytes(8, "little"))
            out.write(new_header)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a shared checkpoint should read like any file
        if path.exists() and not overwrite:  # appeared while we were writing
            raise OutputExistsError(f"{path} exists already; choose another name or pass overwrite=True")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved %s checkpoint to %s", model_name, path)
    return read_checkpoint_info(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_checkpoint_info(path: PathLike) -> CheckpointInfo:
    """Parse and validate the header only: cheap, and enough to tell a checkpoint from anything else."""
    path = Path(path)
    header, _ = _read_header(path)
    return _info_from_header(path, header)


def verify_checkpoint_data(path: PathLike) -> CheckpointInfo:
    """Re-hash the tensor bytes against the header's ``data_sha256``; refuse a corrupt file."""
    path = Path(path)
    header, data_start = _read_header(path)
    info = _info_from_header(path, header)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            stream.seek(data_start)
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise unreadable_error(path, exc) from None
    if digest.hexdigest() != info.data_sha256:
        raise WeightsError(
            f"{path}: the tensor data does not match the checksum in its header: the file is tampered with or "
            "corrupt and was not used; re-download it or import a good copy (textsegment weights import FILE)"
        )
    return info


def load_checkpoint(
    path: PathLike,
    *,
    device: Any = "cpu",
    expected_model: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    verify: bool = True,
) -> tuple[Any, CheckpointInfo]:
    """Build the model the checkpoint was made for and load its weights strictly.

    ``overrides`` change config fields on top of the stored ones (runtime options; an override
    that changes the architecture makes the load fail loudly). ``verify=False`` skips the data
    checksum when the caller has just checked the whole file against a manifest.
    """
    import safetensors.torch
    from safetensors import SafetensorError

    from .devices import select_device
    from .models.registry import build_model

    path = Path(path)
    target = select_device(device)
    info = verify_checkpoint_data(path) if verify else read_checkpoint_info(path)
    if expected_model is not None and info.model_name != expected_model:
        raise WeightsError(
            f"{path} holds weights for model {info.model_name!r}, not {expected_model!r}; "
            f"pass weights made for {expected_model!r}, or choose model {info.model_name!r}"
        )
    config = config_from_dict(info.model_name, info.config, overrides=overrides, source=path)
    try:
        model = build_model(config)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, RuntimeError) as exc:
        # the config came from the file's header, which its data checksum does not cover
        raise WeightsError(
            f"{path}: the model config stored in the checkpoint cannot build model {info.model_name!r} ({exc}); "
            "the file is corrupt or was edited, re-download or re-export it"
        ) from exc
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: cannot read the tensors ({exc}); the file is corrupt, re-download or re-export it") from None
    _check_state_dict(model, state, info)
    model.load_state_dict(state, strict=True)
    return model.to(target), info


def config_from_dict(
    model_name: str, stored: Mapping[str, Any], *, overrides: Optional[Mapping[str, Any]] = None, source: Any = None
) -> Any:
    """Rebuild a config dataclass from its JSON form through the registry.

    JSON has no tuples or dataclasses, so each stored value is shaped like the preset's current
    value for that field: lists become tuples (also where the preset has None), dicts become the
    nested dataclass. A field the preset no longer has is an error; a field the checkpoint lacks
    keeps the preset's default.
    """
    from .models.registry import get_model_config

    where = f"{source}: " if source is not None else ""
    try:
        preset = get_model_config(model_name)
    except ModelError as exc:
        raise WeightsError(f"{where}the checkpoint was made for model {model_name!r}, which this TextSegment cannot build ({exc})") from None
    fields = {f.name for f in dataclasses.fields(preset)}
    unknown = sorted(set(stored) - fields)
    if unknown:
        raise WeightsError(
            f"{where}checkpoint for {model_name!r} sets option(s) {unknown} that this TextSegment's "
            f"{model_name!r} does not have; it was made by another version, use a matching TextSegment"
        )
    values = {name: _shape_like(getattr(preset, name), value) for name, value in stored.items()}
    values.update(overrides or {})
    try:
        return get_model_config(model_name, **values)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{where}the stored config does not fit model {model_name!r}: {exc}") from None


def _shape_like(template: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(template) and not isinstance(template, type) and isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(template)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise WeightsError(f"stored config has option(s) {unknown} unknown to {type(template).__name__}")
        return dataclasses.replace(template, **{k: _shape_like(getattr(template, k), v) for k, v in value.items()})
    if isinstance(value, list):
        if isinstance(template, (list, tuple)) and template:
            items = [_shape_like(template[min(i, len(template) - 1)], v) for i, v in enumerate(value)]
        else:
            items = [_shape_like(None, v) for v in value]
        return items if isinstance(template, list) else tuple(items)
    if isinstance(value, dict) and isinstance(template, dict):
        return {k: _shape_like(template.get(k), v) for k, v in value.items()}
    if isinstance(template, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_state_dict(model: Any, state: Mapping[str, Any], info: CheckpointInfo) -> None:
    """Name every mismatch at once, instead of torch's first-error-wins message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = [
        f"{label} {_few(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if items
    ]
    if problems:
        raise WeightsError(
            f"{info.path} does not fit the model it names ({info.model_name!r}, made by TextSegment "
            f"{info.textsegment_version}): " + "; ".join(problems) + ". The file was made by an incompatible "
            "version or edited; use weights made for this version of the model"
        )


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... (+{len(items) - limit} more)' if len(items) > limit else ''}]"


def _plain_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        tensors[key] = tensor
    return tensors


def _split(blob: bytes) -> tuple[bytes, memoryview]:
    size = int.from_bytes(blob[:8], "little")
    view = memoryview(blob)
    return bytes(view[8 : 8 + size]), view[8 + size :]


def _info_from_header(path: Path, header: dict[str, Any]) -> CheckpointInfo:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != json.dumps(FORMAT):
        raise WeightsError(
            f"{path} is a safetensors file but not a TextSegment checkpoint (its header has no TextSegment metadata); "
            "use a checkpoint written by TextSegment (textsegment train / save_checkpoint)"
        )
    try:
        values = {key: json.loads(value) for key, value in meta.items()}
        version = int(values.get("format_version", -1))
    except (TypeError, ValueError):
        raise WeightsError(f"{path}: the checkpoint metadata is corrupt (not JSON); re-download or re-export it") from None
    missing = [key for key in _RESERVED if key not in values]
    if missing:
        raise WeightsError(f"{path}: the checkpoint header lacks {missing}; the file is corrupt or incomplete")
    if not isinstance(values["config"], dict) or not isinstance(values["model"], str):
        raise WeightsError(f"{path}: the checkpoint header's model/config entries are malformed; the file is corrupt")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{path} uses checkpoint format {version}, newer than this TextSegment understands "
            f"({FORMAT_VERSION}); update TextSegment"
        )
    return CheckpointInfo(
        path=path,
        model_name=values["model"],
        config=values["config"],
        format_version=version,
        textsegment_version=str(values["textsegment_version"]),
        created=str(values["created"]),
        data_sha256=str(values["data_sha256"]),
        metadata={key: value for key, value in values.items() if key not in _RESERVED},
    )


def unreadable_error(path: Path, exc: OSError) -> WeightsError:
    """The error for a weights file that exists but cannot be read (permissions, I/O), not a traceback."""
    return WeightsError(f"{path}: cannot read this weights file ({exc.strerror or exc}); check its permissions or copy it anew")


# What a PyTorch ``torch.save`` file starts with: a zip archive (since torch 1.6) or a bare pickle
_PICKLE_STARTS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_GET_A_GOOD_COPY = "copy or download it again in full, or re-export it with save_checkpoint"


def _pickle_message(path: Path) -> str:
    """Why a ``.pt``/``.pth`` file is refused and how to convert it: pickles can run code, so we never open them."""
    return (
        f"{path} is a PyTorch pickle file (torch.save, .pt/.pth), not a TextSegment checkpoint; TextSegment never "
        "loads pickle files, which can run code when opened. If you trust it, convert it once in Python "
        "(create_model from TextSegmentLib.models.registry, save_checkpoint from TextSegmentLib.checkpoint): "
        "model = create_model(NAME); model.load_state_dict(torch.load(FILE, weights_only=True)); "
        "save_checkpoint(model, 'out.safetensors', model_name=NAME)"
    )


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header dict and the offset where tensor data starts; any damage is a ``WeightsError``."""
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found (or not a file)")
    try:
        total = path.stat().st_size
        with open(path, "rb") as stream:
            prefix = stream.read(8)
            size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if size <= 1 or size > min(_MAX_HEADER, total - 8):
                if prefix.startswith(_PICKLE_STARTS):
                    raise WeightsError(_pickle_message(path))
                raise WeightsError(
                    f"{path} is not a safetensors checkpoint (bad header length): the file is cut off, corrupt or of "
                    f"another kind; {_GET_A_GOOD_COPY}"
                )
            raw = stream.read(size)
    except OSError as exc:
        raise unreadable_error(path, exc) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WeightsError(f"{path}: the checkpoint header is corrupt (not valid JSON); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the checkpoint header is corrupt (not a JSON object)")
    data_size = total - 8 - size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        whole = isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets
        )
        if not (whole and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise WeightsError(
                f"{path}: the header entry for tensor {name!r} is corrupt or the file is truncated "
                f"({data_size} bytes of tensor data); {_GET_A_GOOD_COPY}"
            )
    return header, 8 + size
