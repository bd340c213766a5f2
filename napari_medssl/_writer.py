"""npe2 writers: a Labels layer → NIfTI on its source image's grid, or PNG/TIFF (thin adapter over ``io``)."""

from __future__ import annotations

from typing import Any

from napari_medssl.io import write_labels


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write labels as ``.nii``/``.nii.gz`` on the grid in the layer's ``metadata["affine"]``.

    Labels painted on an image opened by this plugin carry that grid (see ``io.grid_metadata``); other
    layers fall back to their ``scale`` and ``translate``.
    """
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    return write_labels(
        path,
        data,
        attributes.get("metadata"),
        scale=attributes.get("scale"),
        translate=attributes.get("translate"),
    )


def write_labels_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write 2D labels as ``.png`` (or ``.tif``/``.tiff``, which also take 3D stacks)."""
    if not str(path).lower().endswith((".png", ".tif", ".tiff")):
        path = f"{path}.png"
    return write_labels(path, data, attributes.get("metadata"))
