"""Volumes in and out: image files and DICOM series to ``Volume``; label and float maps back to disk.

Readers refuse what is not a usable 3D CT with one clear ``InputError``; writers are atomic and
never overwrite an input.
"""

from .dicom_series import SeriesInfo, choose_series, is_dicom_input, list_series, series_from_files
from .dicom_volume import read_series
from .readers import looks_like_hu, read_image_file, read_label_map, read_volume
from .writers import atomic_write, write_float_map, write_json, write_label_map, write_volume

__all__ = [
    "SeriesInfo",
    "atomic_write",
    "choose_series",
    "is_dicom_input",
    "list_series",
    "looks_like_hu",
    "read_image_file",
    "read_label_map",
    "read_series",
    "read_volume",
    "series_from_files",
    "write_float_map",
    "write_json",
    "write_label_map",
    "write_volume",
]
