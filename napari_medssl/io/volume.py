"""The one image type every reader returns, its geometry, and the read errors and limits.

Geometry convention (used by every reader and writer in ``napari_medssl.io``):

- ``data`` is in napari order: ``(Z, Y, X)`` for volumes, ``(Y, X)`` for 2D images, with a trailing
  channel axis ``C`` for RGB (``(Z, Y, X, C)`` / ``(Y, X, C)``).
- ``affine`` (4x4) maps a napari index ``(z, y, x, 1)`` to world coordinates in millimetres in the
  **RAS+** frame (nibabel's convention; DICOM's LPS is converted by flipping the first two axes).
  For 2D data the index is ``(0, y, x, 1)``.
- ``direction`` (3x3) holds the unit vectors of the napari axes ``z, y, x`` as columns (RAS),
  ``spacing`` their lengths in mm (one per spatial axis of ``data``), ``origin`` the RAS position of
  voxel 0, so ``affine[:3, :3] == direction @ diag(spacing_zyx)`` and ``affine[:3, 3] == origin``.
- In napari a layer gets ``scale = spacing`` and ``translate = direction.T @ origin`` (the origin in the
  volume's own rotated frame), so series on the same grid overlay exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_VOXELS_DEFAULT = 2**30
"""Largest image (voxels x channels) a reader allocates; override with ``$MEDSSL_MAX_VOXELS``."""

MAX_LABEL_VALUES = 32
"""An integer image with at most this many distinct non-negative values is read as labels."""


class MedicalImageReadError(ValueError):
    """A file or folder that cannot be read as a medical image.

    Attributes:
        path: The offending file or folder.
        reason: What is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read {self.path}: {reason}")


class MedicalImageWriteError(ValueError):
    """Data that cannot be written in the requested format (the message says what is accepted)."""


class MedicalImageReadWarning(UserWarning):
    """Something in the input was skipped or repaired; the image was still read."""


def max_voxels() -> int:
    """The allocation limit in voxels (``$MEDSSL_MAX_VOXELS`` or :data:`MAX_VOXELS_DEFAULT`)."""
    env = os.environ.get("MEDSSL_MAX_VOXELS")
    if env:
        try:
            return int(env)
        except ValueError as err:
            raise ValueError(f"MEDSSL_MAX_VOXELS must be an integer number of voxels, got {env!r}") from err
    return MAX_VOXELS_DEFAULT


def check_allocation(path: str | os.PathLike, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse, before allocating, an image whose header claims more voxels than the limit.

    Args:
        path: The file, for the error message.
        shape: The claimed array shape (any axes, channels included).
        itemsize: Bytes per element of the decoded array.

    Raises:
        MedicalImageReadError: When a dimension is not positive or the image is too large.
    """
    if any(int(s) <= 0 for s in shape):
        raise MedicalImageReadError(path, f"the header claims an empty image of shape {tuple(shape)}")
    n = int(np.prod([int(s) for s in shape], dtype=object))
    limit = max_voxels()
    if n > limit:
        raise MedicalImageReadError(
            path,
            f"the header claims an image of shape {tuple(int(s) for s in shape)} ({n:,} voxels, "
            f"{n * itemsize / 2**30:.1f} GiB), more than the limit of {limit:,} voxels; refusing to allocate "
            "(raise $MEDSSL_MAX_VOXELS if the file is genuine)",
        )


def affine_from_geometry(spacing_zyx: np.ndarray, direction: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """4x4 affine from napari index ``(z, y, x)`` to RAS mm.

    Args:
        spacing_zyx: ``(3,)`` voxel size along z, y, x.
        direction: ``(3, 3)`` unit axis vectors as columns (z, y, x).
        origin: ``(3,)`` RAS position of voxel 0.
    """
    aff = np.eye(4)
    aff[:3, :3] = np.asarray(direction, float) * np.asarray(spacing_zyx, float)[None, :]
    aff[:3, 3] = np.asarray(origin, float)
    return aff


def geometry_from_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a 4x4 napari-index→RAS affine into ``(spacing_zyx, direction, origin)``."""
    affine = np.asarray(affine, float)
    cols = affine[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    spacing = np.where(spacing > 0, spacing, 1.0)
    return spacing, cols / spacing[None, :], affine[:3, 3].copy()


@dataclass
class Volume:
    """An image or label map with its geometry, as read from DICOM, NIfTI, PNG or TIFF.

    Attributes:
        data: ``(Z, Y, X)``, ``(Y, X)``, or with a trailing ``C`` axis for RGB.
        spacing: Voxel size in mm per spatial axis of ``data`` (``(dz, dy, dx)`` or ``(dy, dx)``).
        origin: ``(3,)`` RAS position of voxel 0 in mm.
        direction: ``(3, 3)`` unit vectors of the napari axes z, y, x as columns (RAS).
        modality: DICOM modality code (``CT``, ``MR``, ``MG``, ``OT``, ``SEG`` ...).
        window: ``(lo, hi)`` display window (contrast limits) from :mod:`napari_medssl.io.windows`.
        name: Layer name (SeriesDescription for DICOM, file stem otherwise).
        is_label: ``True`` for segmentation-like integer maps (opened as napari Labels).
        metadata: Header facts and provenance: ``format``, ``source``, ``header``, ``window``,
            ``window_presets``, ``warnings``, ``skipped`` (files not read, with reasons) and more.
        affine: ``(4, 4)`` napari index → RAS mm; computed from the fields above when not given.
    """

    data: np.ndarray
    spacing: tuple[float, ...]
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str = "OT"
    window: tuple[float, float] = (0.0, 1.0)
    name: str = "image"
    is_label: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    affine: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.origin = np.asarray(self.origin, float).reshape(3)
        self.direction = np.asarray(self.direction, float).reshape(3, 3)
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) != self.spatial_ndim:
            raise ValueError(
                f"spacing {self.spacing} must have one entry per spatial axis of data shape {self.data.shape} "
                f"({self.spatial_ndim} spatial axes)"
            )
        if self.affine is None:
            self.affine = affine_from_geometry(self.spacing_zyx, self.direction, self.origin)
        self.affine = np.asarray(self.affine, float).reshape(4, 4)
        self.metadata.update(self.geometry_metadata())  # the one place geometry is copied into metadata

    @property
    def rgb(self) -> bool:
        """Whether the last axis holds colour channels (3 or 4 of them)."""
        return bool(self.metadata.get("rgb", False))

    @property
    def spatial_ndim(self) -> int:
        """2 or 3: the number of spatial axes in ``data``."""
        return self.data.ndim - (1 if self.rgb else 0)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing padded to three axes (a 2D image gets the slice thickness, or 1 mm, along z)."""
        if len(self.spacing) == 3:
            return self.spacing  # type: ignore[return-value]
        return (float(self.metadata.get("slice_thickness", 1.0)), *self.spacing)

    @property
    def scale(self) -> tuple[float, ...]:
        """napari ``scale`` (one per spatial axis)."""
        return self.spacing

    @property
    def translate(self) -> tuple[float, ...]:
        """napari ``translate``: the origin expressed along the volume's own axes (mm)."""
        t = self.direction.T @ self.origin
        return tuple(float(v) for v in t[3 - self.spatial_ndim :])

    def geometry_metadata(self) -> dict[str, Any]:
        """The geometry as plain lists (JSON-safe), as stored in layer metadata for the writers."""
        return {
            "affine": self.affine.tolist(),
            "spacing": list(self.spacing),
            "origin": self.origin.tolist(),
            "direction": self.direction.tolist(),
            "shape": list(self.data.shape),
        }


def label_values(data: np.ndarray) -> np.ndarray | None:
    """The distinct values of a segmentation-like array, or ``None`` when it is an ordinary image.

    Segmentation-like: integer-valued (integer dtype, or float holding only whole numbers),
    non-negative, at most :data:`MAX_LABEL_VALUES` distinct values. A ~20k-voxel sample rejects
    ordinary images at once; for a label map the sample's values are confirmed by counting them over
    the whole array (a bincount only when the sample missed a rare label).
    """
    if data.size == 0:
        return None
    if data.dtype == bool:
        return np.unique(data).astype(np.int64)
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        return None
    candidates = np.unique(data.reshape(-1)[:: max(1, data.size // 20_000)])
    if len(candidates) > MAX_LABEL_VALUES:
        return None
    if not np.all(np.isfinite(candidates)) or candidates[0] < 0 or np.any(candidates != np.round(candidates)):
        return None
    if sum(int(np.count_nonzero(data == v)) for v in candidates) == data.size:
        return candidates.astype(np.int64)
    lo, hi = data.min(), data.max()
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
        return None
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        return None
    counts = np.bincount(data.reshape(-1).astype(np.intp), minlength=1)
    values = np.flatnonzero(counts)
    return values if len(values) <= MAX_LABEL_VALUES else None


def display_window(
    data: np.ndarray,
    values: Any,
    metadata: dict[str, Any],
    image_window: Callable[[np.ndarray], tuple[str, tuple[float, float], dict[str, tuple[float, float]]]],
) -> tuple[np.ndarray, tuple[float, float]]:
    """A reader's label map or image, and its display window, recorded in ``metadata``.

    With ``values`` (a label map's values, see :func:`label_values`) the data become a label array, its values
    go to ``metadata["label_values"]`` and the window spans the labels; otherwise ``image_window(data)`` gives
    ``(name, (lo, hi), presets)``. ``metadata["window"]`` and ``metadata["window_presets"]`` record the choice.

    Returns:
        ``(data, window)``.
    """
    if values is not None:
        data = as_label_array(data)
        metadata["label_values"] = [int(v) for v in values]
        window_name, window, presets = "labels", (0.0, float(max(1, data.max()))), {}
    else:
        window_name, window, presets = image_window(data)
    metadata["window"] = {"name": window_name, "range": list(window)}
    metadata["window_presets"] = {k: list(v) for k, v in presets.items()}
    return data, window


def as_label_array(data: np.ndarray) -> np.ndarray:
    """Labels as the smallest unsigned integer dtype that holds them."""
    hi = int(data.max()) if data.size else 0
    dtype = np.uint8 if hi < 256 else np.uint16 if hi < 65536 else np.uint32
    return data.astype(dtype, copy=False)


def source_name(path: str | os.PathLike) -> str:
    """A file's name without medical-image suffixes (``case.nii.gz`` → ``case``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
