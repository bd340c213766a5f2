"""Volumes ↔ napari layer data, without importing napari.

A napari ``LayerData`` tuple is ``(data, kwargs, layer_type)``. Image layers get ``scale``, ``translate``,
``contrast_limits``, ``colormap``, ``rgb``, ``name`` and ``metadata``; labels get the same minus the
display keys. ``metadata`` carries the grid (``affine``, ``spacing``, ``origin``, ``direction``,
``shape``) so the writers put painted labels back on the source image's grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .volume import MedicalImageWriteError, Volume, affine_from_geometry

GRID_KEYS = (
    "affine",
    "spacing",
    "origin",
    "direction",
    "shape",
    "nifti_affine",
    "header",
    "source",
    "format",
    "files",
    "reference_files",
)
"""Metadata keys that describe where an array lies; copied onto labels painted on an image."""

LayerData = tuple[np.ndarray, dict[str, Any], str]


def layer_data(volume: Volume) -> LayerData:
    """The napari ``LayerData`` tuple of a volume (``"labels"`` or ``"image"``)."""
    metadata = {**volume.metadata, "modality": volume.modality, "name": volume.name}
    kwargs: dict[str, Any] = {
        "name": volume.name,
        "scale": volume.scale,
        "translate": volume.translate,
        "metadata": metadata,
    }
    if volume.is_label:
        return volume.data, kwargs, "labels"
    kwargs["rgb"] = volume.rgb
    if not volume.rgb or volume.data.dtype != np.uint8:
        kwargs["contrast_limits"] = [float(v) for v in volume.window]
    if not volume.rgb:
        kwargs["colormap"] = "gray"
    return volume.data, kwargs, "image"


def grid_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The geometry part of an image layer's metadata, to give a Labels layer painted on that image."""
    return {k: metadata[k] for k in GRID_KEYS if k in metadata}


def affine_from_layer(
    metadata: dict[str, Any] | None,
    spatial_shape: tuple[int, ...],
    scale: tuple[float, ...] | None = None,
    translate: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The ``(4, 4)`` napari index → RAS affine for an array of ``spatial_shape`` in a layer.

    Uses ``metadata["affine"]`` (set by this plugin's readers) when present; otherwise builds an
    axis-aligned affine from the layer's ``scale`` and ``translate`` (1 mm at 0 when absent).

    Raises:
        MedicalImageWriteError: The metadata's grid has a different shape than the array.
    """
    metadata = metadata or {}
    ndim = len(spatial_shape)
    if "affine" in metadata:
        grid_shape = tuple(metadata.get("shape", spatial_shape))[:ndim]
        if tuple(grid_shape) != tuple(spatial_shape):
            raise MedicalImageWriteError(
                f"the layer's grid (from its metadata) has shape {tuple(grid_shape)} but the data has shape "
                f"{tuple(spatial_shape)}; paint labels on the image's own grid (same shape) to export them"
            )
        return np.asarray(metadata["affine"], float)
    pad = 3 - ndim
    scale_zyx = (1.0,) * pad + tuple(float(s) for s in (scale if scale is not None else (1.0,) * ndim))[
        -ndim:
    ]
    shift_zyx = (0.0,) * pad + tuple(
        float(t) for t in (translate if translate is not None else (0.0,) * ndim)
    )[-ndim:]
    return affine_from_geometry(np.asarray(scale_zyx), np.eye(3), np.asarray(shift_zyx))


def volume_from_layer(
    data: np.ndarray,
    metadata: dict[str, Any] | None = None,
    *,
    scale: tuple[float, ...] | None = None,
    translate: tuple[float, ...] | None = None,
    name: str = "layer",
    is_label: bool = False,
) -> Volume:
    """A :class:`Volume` from a napari layer's data and attributes (the inverse of :func:`layer_data`)."""
    metadata = dict(metadata or {})
    rgb = bool(metadata.get("rgb", False))
    spatial_shape = data.shape[:-1] if rgb else data.shape
    affine = affine_from_layer(metadata, spatial_shape, scale, translate)
    spacing_cols = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / np.where(spacing_cols > 0, spacing_cols, 1.0)
    spacing = tuple(float(s) for s in spacing_cols[3 - len(spatial_shape) :])
    window = tuple(metadata.get("window", {}).get("range", (0.0, 1.0)))
    return Volume(
        data=np.asarray(data),
        spacing=spacing,
        origin=affine[:3, 3],
        direction=direction,
        modality=str(metadata.get("modality", "OT")),
        window=(float(window[0]), float(window[1])),
        name=str(metadata.get("name", name)),
        is_label=is_label,
        metadata=metadata,
        affine=affine,
    )
