"""Is an image file whole? Its header's data size against what the file holds, before ITK reads it.

ITK 5.4 reads a NIfTI cut short (plain or gzip) without a word, zero-filling what is missing, and
it reads a gzip NRRD whose stream lacks its end: a CT cut by an interrupted copy would be segmented
as if whole. Plain data is checked by the file size; a gzip stream by its trailer's size field and,
only when that disagrees, by inflating it, so an intact file is not read twice. A gzip stream
damaged inside but with an intact trailer passes (inflating every file twice would double the read
time); the reader catches that where it reads the data in full anyway (float NIfTI). Files whose
header and data are separate (``.nhdr``, ``.mhd``) are left to ITK.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_AT_MOST = 1 << 20  # NRRD/MetaImage headers are text; a longer one is not worth a check


def check_complete(path: Path, *, format_name: str) -> None:
    """Refuse a file whose voxel data is shorter than its header says (see the module docstring).

    Plain data is checked by file size; a gzip stream by its trailer's size field, and by inflating it
    only when that disagrees, so an intact file is not read twice.
    """
    layouts = {"NIfTI": _nifti_layout, "NRRD": _nrrd_layout, "MetaImage": _meta_layout}
    layout = layouts.get(format_name)
    try:
        found = layout(path) if layout else None
        if found is None:
            return
        offset, expected, packing = found
        if packing == "gzip":
            inflated = _gzip_size(path, offset=offset, expected=expected)
            problem = None if inflated >= expected else f"its data inflate to {inflated} of {expected} bytes"
        else:
            stored = path.stat().st_size - offset
            problem = None if stored >= expected else f"it holds {stored} of the {expected} data bytes its header announces"
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        problem = f"{exc}".rstrip(".")
    except OSError as exc:
        raise InputError(f"{path}: cannot read this file ({exc.strerror or exc})") from None
    if problem:
        raise InputError(f"{path}: truncated or corrupt: {problem}; copy or export the file again")


class NiftiHeader(NamedTuple):
    """The fields of a NIfTI-1 or -2 header that size and locate its voxel data."""

    endian: str
    size: int  # 348 (NIfTI-1) or 540 (NIfTI-2)
    magic: bytes
    dims: np.ndarray  # dim[0] is the rank
    datatype: int
    bitpix: int
    offset: float  # vox_offset


def nifti_header(head: bytes) -> Optional[NiftiHeader]:
    """The header at the start of ``head`` (raw, already inflated); None when it is not NIfTI,
    EOFError when ``head`` ends inside it."""
    for endian in "<>":
        size = int(np.frombuffer(head, f"{endian}i4", 1)[0]) if len(head) >= 4 else 0
        if size in (348, 540):
            break
    else:
        return None
    if len(head) < size:
        raise EOFError(f"it ends inside the NIfTI header ({len(head)} of {size} bytes)")

    def field(kind: str, at: int, count: int = 1) -> np.ndarray:
        return np.frombuffer(head, f"{endian}{kind}", count, at)

    if size == 348:
        return NiftiHeader(endian, size, head[344:348], field("i2", 40, 8), int(field("i2", 70)[0]),
                           int(field("i2", 72)[0]), float(field("f4", 108)[0]))
    return NiftiHeader(endian, size, head[4:8], field("i8", 16, 8), int(field("i2", 12)[0]), int(field("i2", 14)[0]),
                       float(field("i8", 168)[0]))


def _nifti_layout(path: Path) -> Optional[tuple[int, int, Optional[str]]]:
    """(0, header + data bytes, packing) of a single-file NIfTI-1/2, or None when it is not one."""
    with open(path, "rb") as handle:
        packed = handle.read(2) == _GZIP_MAGIC
    if packed:
        try:
            with gzip.open(path, "rb") as handle:
                head = handle.read(544)
        except EOFError:
            head = b""  # the header itself is cut off
    else:
        with open(path, "rb") as handle:
            head = handle.read(544)
    header = nifti_header(head)
    if header is None:
        if packed and not head:
            raise EOFError("the gzip stream ends inside the NIfTI header")
        return None
    magic, dims, bitpix, offset, size = header.magic, header.dims, header.bitpix, header.offset, header.size
    rank = int(dims[0])
    if magic not in (b"n+1\0", b"n+2\0") or not 1 <= rank <= 7 or bitpix <= 0 or min(dims[1 : rank + 1]) < 0:
        return None  # a header/image pair, or a header ITK will judge for itself
    voxels = int(np.prod(dims[1 : rank + 1].astype(np.int64)))
    return 0, max(int(offset), size) + voxels * bitpix // 8, "gzip" if packed else None


def _nrrd_layout(path: Path) -> Optional[tuple[int, int, Optional[str]]]:
    """(data offset, data bytes, packing) of a NRRD with its data attached, raw or gzip; else None."""
    head = _text_header(path, magic=r"NRRD000\d", end=lambda line: not line.strip())
    if head is None:
        return None
    fields = {}
    for line in head[0]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lower()
    if {"data file", "datafile", "line skip", "lineskip", "byte skip", "byteskip"} & set(fields):
        return None
    packing = {"raw": None, "gzip": "gzip", "gz": "gzip"}.get(fields.get("encoding", ""), "other")
    expected = _data_bytes(path)
    return None if packing == "other" or expected is None else (head[1], expected, packing)


def _meta_layout(path: Path) -> Optional[tuple[int, int, Optional[str]]]:
    """(data offset, stored data bytes, None) of a MetaImage with its data attached (LOCAL); else None.

    ITK refuses such a file when short, but names the wrong reason ("No such file or directory").
    """
    head = _text_header(path, magic=r"[A-Za-z]\w* *= *\S", end=lambda line: line.lower().startswith("elementdatafile"))
    if head is None:
        return None
    fields = {}
    for line in head[0]:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if fields.get("elementdatafile", "").upper() != "LOCAL" or "headersize" in fields:
        return None
    if fields.get("compresseddata", "false").lower() == "true":
        stored = fields.get("compresseddatasize", "")
        return (head[1], int(stored), None) if stored.isdigit() else None
    expected = _data_bytes(path)
    return None if expected is None else (head[1], expected, None)


def _text_header(path: Path, *, magic: str, end) -> Optional[tuple[list[str], int]]:
    """The lines of a text header up to the one ``end`` accepts (included), and the offset just after it.

    None when the file does not start like such a header (``magic``, a regex); EOFError when it ends
    inside one.
    """
    with open(path, "rb") as handle:
        text = handle.read(_HEADER_AT_MOST)
    if not re.match(magic.encode(), text):
        return None
    lines, offset = [], 0
    for raw in text.splitlines(keepends=True):
        offset += len(raw)
        line = raw.decode("latin-1").rstrip("\r\n")
        lines.append(line)
        if end(line):
            return lines, offset
    if len(text) < _HEADER_AT_MOST:
        raise EOFError("it ends inside its header")
    return None


def _data_bytes(path: Path) -> Optional[int]:
    """Voxels × bytes per voxel, from ITK's reading of the header alone; None when ITK cannot read it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        component = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    except RuntimeError:
        return None
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents() * component


def _gzip_size(path: Path, *, offset: int, expected: int) -> int:
    """Bytes the gzip stream at ``offset`` inflates to; EOFError/BadGzipFile when it is cut short or damaged.

    The trailer records the size (mod 2**32): when it matches ``expected`` the stream is taken as whole.
    """
    with open(path, "rb") as handle:
        if path.stat().st_size >= offset + 18:  # a gzip header and trailer at least
            handle.seek(-4, os.SEEK_END)
            if int.from_bytes(handle.read(4), "little") == expected % 2**32:
                return expected
        handle.seek(offset)
        total = 0
        with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    return total
