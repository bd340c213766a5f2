"""File reading for the engine: one place that turns a path into ``(array, geometry)``.

It calls the package's readers in :mod:`napari_medssl.io` (the ones the viewer uses, so a model sees the same
axis order in training, in the CLI and in napari) and falls back to nibabel / pydicom / Pillow when a reader is
not available. Arrays come back in napari order: ``(Z, Y, X)`` volumes, ``(Y, X)`` or ``(Y, X, C)`` images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class Loaded:
    """An array read from disk and the facts needed to write a result back on its grid.

    Attributes:
        data: ``(Z, Y, X)``, ``(Y, X)`` or ``(Y, X, C)``.
        affine: 4×4 voxel-to-world matrix of the file (NIfTI/DICOM) or ``None`` for plain images.
        kind: ``"nifti"``, ``"dicom"`` or ``"image"``.
        meta: anything else the reader reported (the ``Volume`` object itself under ``"volume"``).
    """

    data: np.ndarray
    affine: np.ndarray | None = None
    kind: str = "image"
    meta: dict[str, Any] = field(default_factory=dict)


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file by its suffix."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_image(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a PNG/TIFF/JPEG/BMP file by its suffix."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def _io_reader(name: str) -> Any:
    try:
        from napari_medssl import io
    except ImportError:  # pragma: no cover - io is part of the package
        return None
    return getattr(io, name, None)


def _from_volume(vol: Any, kind: str) -> Loaded:
    data = np.asarray(vol.data)
    affine = getattr(vol, "affine", None)
    return Loaded(data, None if affine is None else np.asarray(affine, dtype=float), kind, {"volume": vol})


def read_nifti(path: str | os.PathLike) -> Loaded:
    """A NIfTI volume as ``(Z, Y, X)`` (the file's ``X, Y, Z`` axes reversed), with the file's affine."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    reader = _io_reader("read_nifti")
    if reader is not None:
        return _from_volume(reader(path), "nifti")
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2D or 3D NIfTI image, got shape {data.shape}")
    return Loaded(np.ascontiguousarray(data.T), np.asarray(img.affine, dtype=float), "nifti", {})


def read_image(path: str | os.PathLike) -> Loaded:
    """A PNG/TIFF/JPEG image as ``(Y, X)`` or ``(Y, X, C)`` (8 or 16 bit kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    reader = _io_reader("read_image")
    if reader is not None:
        return _from_volume(reader(path), "image")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        data = tifffile.imread(str(path))
    else:
        from PIL import Image

        with Image.open(path) as im:
            data = np.asarray(im)
    if data.ndim == 3 and data.shape[-1] == 4:
        data = data[..., :3]
    return Loaded(np.asarray(data), None, "image", {})


def read_dicom_series(folder: str | os.PathLike) -> list[Loaded]:
    """Every DICOM series under ``folder``, each as ``(Z, Y, X)`` (rescaled, sorted along the slice normal)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"DICOM folder not found: {folder}")
    reader = _io_reader("read_dicom")
    if reader is not None:
        out = reader(folder)
        vols = out if isinstance(out, list | tuple) else [out]
        return [_from_volume(v, "dicom") for v in vols]
    return [_read_dicom_folder(d) for d in dicom_leaf_folders(folder)]


def dicom_leaf_folders(folder: Path) -> list[Path]:
    """Folders under ``folder`` (itself included) that directly hold ``.dcm`` files, sorted."""
    folder = Path(folder)
    dirs = sorted({p.parent for p in folder.rglob("*.dcm")})
    if not dirs:
        raise ValueError(f"no DICOM (.dcm) files under {folder}")
    return dirs


def _read_dicom_folder(folder: Path) -> Loaded:
    import pydicom

    slices = [pydicom.dcmread(str(p)) for p in sorted(folder.glob("*.dcm"))]
    slices = [s for s in slices if "PixelData" in s]
    if not slices:
        raise ValueError(f"{folder}: no DICOM images with pixel data")

    def position(ds: Any) -> float:
        ipp = getattr(ds, "ImagePositionPatient", None)
        iop = getattr(ds, "ImageOrientationPatient", None)
        if ipp is None or iop is None:
            return float(getattr(ds, "InstanceNumber", 0) or 0)
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return float(np.dot(normal, np.asarray(ipp, float)))

    slices.sort(key=position)
    frames = []
    for s in slices:
        arr = s.pixel_array.astype(np.float32)
        arr = arr * float(getattr(s, "RescaleSlope", 1) or 1) + float(getattr(s, "RescaleIntercept", 0) or 0)
        frames.append(arr)
    return Loaded(np.stack(frames), None, "dicom", {"folder": str(folder)})


def read_any(path: str | os.PathLike) -> Loaded:
    """Read a NIfTI file, a PNG/TIFF image or a DICOM series folder (its first series).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: a file type the engine cannot read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir() or path.suffix.lower() == ".dcm":
        series = read_dicom_series(path if path.is_dir() else path.parent)
        return series[0]
    if is_nifti(path):
        return read_nifti(path)
    if is_image(path):
        return read_image(path)
    raise ValueError(
        f"cannot read {path}: expected a NIfTI (.nii, .nii.gz), PNG/TIFF/JPEG image or a DICOM folder/.dcm file"
    )


def write_labels(labels: np.ndarray, like: Loaded, path: str | os.PathLike) -> Path:
    """Write a label array on the grid of ``like`` (the image it was predicted from).

    ``.nii``/``.nii.gz`` get the source's affine (identity for plain images); ``.png``/``.tif`` write a 2D label
    image. Labels are ``uint8`` when they fit, else ``uint16``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(labels)
    labels = labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    if is_nifti(path):
        writer = _io_reader("write_nifti")
        vol = like.meta.get("volume")
        if writer is not None and vol is not None and like.kind == "nifti":
            writer(labels, path, like=vol)
            return path
        import nibabel as nib

        affine = like.affine if like.affine is not None else np.eye(4)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.T), affine), str(path))
        return path
    if is_image(path):
        if labels.ndim != 2:
            raise ValueError(f"{path}: a {labels.ndim}D label volume needs a .nii/.nii.gz output, not an image file")
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(str(path), labels)
        else:
            from PIL import Image

            Image.fromarray(labels).save(path)
        return path
    raise ValueError(f"cannot write labels to {path}: use a .nii.gz, .nii, .png or .tif file name")
