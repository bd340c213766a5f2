"""One entry point for every format: :func:`read` any supported path, :func:`write_labels` by suffix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import read_dicom
from .dicom_files import looks_like_dicom
from .image2d import PNG_SUFFIXES, TIFF_SUFFIXES, read_image, write_image_labels
from .layers import affine_from_layer
from .nifti import read_nifti, write_nifti
from .volume import MedicalImageReadError, MedicalImageWriteError, Volume

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
FORMATS = ("dicom", "nifti", "image")


def _sniff(path: Path) -> str | None:
    """The format of a file from its first bytes (DICOM: 'DICM' at 128 or a bare dataset; NIfTI magic; PNG; TIFF)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return None
    if looks_like_dicom(head):
        return "dicom"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "image"
    return None


def detect_format(path: str | os.PathLike) -> str | None:
    """``"dicom"``, ``"nifti"``, ``"image"`` (PNG/TIFF) or ``None`` when the path is none of these.

    A folder is ``"dicom"``; a file is recognised by suffix, else by its first bytes.
    """
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PNG_SUFFIXES + TIFF_SUFFIXES):
        return "image"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return _sniff(path) if path.is_file() else None


def read(path: str | os.PathLike | Sequence[str | os.PathLike], **kwargs: Any) -> list[Volume]:
    """Read any supported file, folder or list of them into volumes.

    Args:
        path: A DICOM file or folder, a ``.nii``/``.nii.gz``, a ``.png``/``.tif``, or a list of these
            (DICOM files in a list are grouped into series together).
        **kwargs: Passed to :func:`read_nifti` (``nan_policy``, ``modality``) or :func:`read_image`
            (``modality``, ``spacing``).

    Raises:
        FileNotFoundError: A path does not exist.
        MedicalImageReadError: The format is not recognised or the file cannot be read.
    """
    paths = [Path(p) for p in path] if isinstance(path, list | tuple) else [Path(path)]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
    formats = [detect_format(p) for p in paths]
    for p, fmt in zip(paths, formats):
        if fmt is None:
            raise MedicalImageReadError(
                p,
                "not a recognised medical image (expected DICOM, .nii/.nii.gz, .png, .tif/.tiff or a folder)",
            )
    dicom = [p for p, f in zip(paths, formats) if f == "dicom"]
    volumes = read_dicom(dicom) if dicom else []
    for p, fmt in zip(paths, formats):
        if fmt == "nifti":
            volumes.append(read_nifti(p, **kwargs))
        elif fmt == "image":
            volumes.append(read_image(p, **kwargs))
    return volumes


def write_labels(
    path: str | os.PathLike,
    data: np.ndarray,
    metadata: dict[str, Any] | None = None,
    *,
    scale: tuple[float, ...] | None = None,
    translate: tuple[float, ...] | None = None,
) -> list[str]:
    """Write a label map by suffix: NIfTI on the source grid, or PNG/TIFF for 2D images.

    Args:
        path: ``.nii``/``.nii.gz`` (grid from ``metadata["affine"]``, else from ``scale``/``translate``),
            ``.png`` (2D) or ``.tif``/``.tiff`` (2D or a 3D stack).
        data: Integer labels in napari order.
        metadata: The labels layer's metadata (grid keys copied from the image it was painted on).
        scale: The layer's scale, used when ``metadata`` has no affine.
        translate: The layer's translate, used when ``metadata`` has no affine.

    Returns:
        The written paths.

    Raises:
        MedicalImageWriteError: Unsupported suffix, data that does not fit the format, or a grid of a
            different shape than the data.
    """
    data = np.asarray(data)
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        affine = affine_from_layer(metadata, data.shape, scale, translate)
        return [write_nifti(path, data, affine, header=(metadata or {}).get("header"))]
    if name.endswith(PNG_SUFFIXES + TIFF_SUFFIXES):
        return [write_image_labels(path, data)]
    raise MedicalImageWriteError(f"{path}: labels are written as .nii, .nii.gz, .png, .tif or .tiff")
