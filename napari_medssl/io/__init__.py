"""Readers and writers for medical images: DICOM series, NIfTI, PNG/TIFF → one :class:`Volume` type.

Pure functions (no napari, no Qt, no torch): usable from notebooks, the engine and the CLI. See
``README.md`` in this folder for the module map and the geometry convention.
"""

from .api import detect_format, read, write_labels
from .dicom import read_dicom
from .image2d import read_image, write_image_labels
from .layers import affine_from_layer, grid_metadata, layer_data, volume_from_layer
from .nifti import read_nifti, write_nifti
from .samples import SampleDataUnavailable, list_samples, load_catalogue, load_sample, resolve_sample
from .volume import (
    MedicalImageReadError,
    MedicalImageReadWarning,
    MedicalImageWriteError,
    Volume,
    label_values,
)
from .windows import CT_WINDOWS, default_window, window_presets

__all__ = [
    "CT_WINDOWS",
    "MedicalImageReadError",
    "MedicalImageReadWarning",
    "MedicalImageWriteError",
    "SampleDataUnavailable",
    "Volume",
    "affine_from_layer",
    "default_window",
    "detect_format",
    "grid_metadata",
    "label_values",
    "layer_data",
    "list_samples",
    "load_catalogue",
    "load_sample",
    "read",
    "read_dicom",
    "read_image",
    "read_nifti",
    "resolve_sample",
    "volume_from_layer",
    "window_presets",
    "write_image_labels",
    "write_labels",
    "write_nifti",
]
