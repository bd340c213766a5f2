"""File reading for the engine: thin adapters over :mod:`napari_medssl.io` (the readers the viewer uses).

Going through the same readers means a model sees the same axis order in training, in the CLI and in
napari: ``(Z, Y, X)`` volumes, ``(Y, X)`` or ``(Y, X, C)`` images. A :class:`~napari_medssl.io.Volume` keeps
the geometry, so predicted labels are written back on the input's grid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_medssl import io
from napari_medssl.io import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file by its suffix."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a PNG/TIFF file by its suffix."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_nifti(path: str | os.PathLike) -> Volume:
    """A NIfTI volume, ``data`` in ``(Z, Y, X)`` (NaN/Inf voxels become the smallest finite value, as in napari)."""
    return io.read_nifti(path)


def read_image(path: str | os.PathLike) -> Volume:
    """A PNG/TIFF image, ``data`` in ``(Y, X)`` or ``(Y, X, C)``."""
    return io.read_image(path)


def read_dicom_images(folder: str | os.PathLike) -> list[Volume]:
    """The image series (not segmentation-like series) under a DICOM folder."""
    return [v for v in io.read_dicom(folder) if not v.is_label]


def dicom_leaf_folders(folder: str | os.PathLike) -> list[Path]:
    """Folders under ``folder`` (itself included) that directly hold ``.dcm`` files, sorted.

    Raises:
        ValueError: no ``.dcm`` file anywhere below.
    """
    folder = Path(folder)
    dirs = sorted({p.parent for p in folder.rglob("*.dcm")})
    if not dirs:
        raise ValueError(f"no DICOM (.dcm) files under {folder}")
    return dirs


def read_any(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file, a PNG/TIFF image or a DICOM series (a folder, a file or a DICOMDIR holding one image
    series; label series beside it, such as tumour masks, are passed over).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a file the readers do not recognise, or a DICOM folder without image series.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file() and is_nifti(path):
        return read_nifti(path)
    vols = [v for v in io.read(path) if not v.is_label] or io.read(path)
    if len(vols) > 1:
        listing = "; ".join(f"{v.name} ({Path(v.metadata['source'])})" for v in vols[:8])
        raise ValueError(f"{path} holds {len(vols)} image series; give the folder or file of one: {listing}")
    return vols[0]


def write_labels(labels: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write a label array on the grid of ``like`` (the volume it was predicted from).

    ``.nii``/``.nii.gz`` get the source's affine; ``.png``/``.tif`` write a 2D label image.
    """
    meta = {**like.metadata, **like.geometry_metadata()}
    meta.pop("rgb", None)
    written = io.write_labels(path, np.asarray(labels), meta)
    return Path(written[0])


def is_dicom_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a DICOM file (``.dcm``): predictions go there as a DICOM SEG."""
    return str(path).lower().endswith(".dcm")


def write_prediction(
    labels: np.ndarray,
    like: Volume,
    path: str | os.PathLike,
    provenance: dict | None = None,
    class_names: list[str] | None = None,
    segment_codes: dict | None = None,
) -> Path:
    """Write predicted labels on the grid of ``like`` with their provenance.

    ``.dcm`` writes a DICOM SEG referencing the DICOM series ``like`` was read from (provenance in its
    header); any other suffix goes to :func:`write_labels`, with the provenance in ``<path>.json``.

    Raises:
        ValueError: ``.dcm`` asked for an input that is not a DICOM series.
    """
    from napari_medssl.provenance import write_sidecar

    if is_dicom_output(path):
        if like.metadata.get("format") != "dicom":
            raise ValueError(
                f"--output {path}: a DICOM SEG is written only for a DICOM series input; "
                f"{like.metadata.get('source', 'the input')} is {like.metadata.get('format', 'not DICOM')} "
                "(write .nii.gz instead)"
            )
        from napari_medssl.io.dicom_seg import write_seg

        return write_seg(
            path,
            labels,
            like.metadata["files"],
            class_names=class_names,
            segment_codes=segment_codes,
            provenance=provenance,
        )
    written = write_labels(labels, like, path)
    if provenance is not None:
        write_sidecar(written, provenance)
    return written
