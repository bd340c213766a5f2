"""NIfTI (``.nii``, ``.nii.gz``) ↔ :class:`~napari_medssl.io.volume.Volume`.

Axes: a NIfTI array is stored as ``(i, j, k)``; napari gets ``(Z, Y, X) = (k, j, i)`` (axes reversed),
and the napari affine is the file affine with its first three columns reversed, so the writer undoes
exactly what the reader did and a label map written on an image's grid reads back with the same
affine and voxels.

Policies (documented for users):

- NaN/Inf voxels (common after resampling or registration: NaN marks voxels outside the source's field
  of view): ``nan_policy="minimum"`` (the default, used by the napari reader, ``medssl`` and training)
  replaces them with the image's smallest finite value, warns with a :class:`MedicalImageReadWarning`
  giving the count, and records it in ``metadata["warnings"]``. The minimum, not 0, because it is the
  image's own background (air at about -1000 HU in CT, 0 in most MR): 0 would paint water-like soft
  tissue (0 HU) over the outside of a CT, widen the display window and show a model tissue that is not
  there. An image with no finite voxel at all becomes 0. ``nan_policy="zero"`` replaces them with 0;
  ``nan_policy="raise"`` refuses the file with a :class:`MedicalImageReadError` giving the count.
- 4D and higher: trailing axes of length 1 are dropped; a real 4th axis (time points, channels,
  diffusion directions) is refused with an error naming the shape — split it first, e.g. with
  ``nibabel.funcs.four_to_three``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .volume import (
    MedicalImageReadError,
    MedicalImageReadWarning,
    MedicalImageWriteError,
    Volume,
    check_allocation,
    display_window,
    geometry_from_affine,
    label_values,
    source_name,
)
from .windows import window_presets

NAN_POLICIES = ("minimum", "zero", "raise")
GZIP_MAX_RATIO = 1032
"""Deflate's largest possible compression ratio: a ``.nii.gz`` of n bytes inflates to at most 1032 n bytes."""
_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
"""Swaps index axes 0 and 2: napari (z, y, x) ↔ NIfTI (i, j, k); it is its own inverse."""


def _is_nifti_path(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _header_facts(img: nib.Nifti1Image) -> dict[str, Any]:
    hdr = img.header
    facts: dict[str, Any] = {
        "dim": [int(v) for v in hdr["dim"]],
        "pixdim": [float(v) for v in hdr["pixdim"]],
        "datatype": str(hdr.get_data_dtype()),
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "xyzt_units": _units(hdr),
        "descrip": hdr["descrip"].item().decode("latin-1", "replace").strip("\x00 "),
        "intent_code": int(hdr["intent_code"]),
    }
    slope, inter = hdr.get_slope_inter()
    if slope is not None:
        facts["scl_slope"], facts["scl_inter"] = float(slope), float(inter or 0.0)
    return facts


def _units(hdr: Any) -> list[str]:
    """The spatial and time units, ``"unknown"`` for a code the standard does not define (a damaged header)."""
    try:
        return [str(u) for u in hdr.get_xyzt_units()]
    except KeyError:
        return ["unknown", "unknown"]


def _usable(affine: np.ndarray | None) -> bool:
    return (
        affine is not None and bool(np.all(np.isfinite(affine))) and abs(np.linalg.det(affine[:3, :3])) > 1e-9
    )


def _valid_affine(img: nib.Nifti1Image, notes: list[str]) -> np.ndarray:
    """The file's affine, as nibabel chooses it (sform, else qform, else pixdim), or the next usable one.

    A corrupt header can hold NaN/Inf or a singular matrix; then the qform, the pixdim diagonal and
    finally 1 mm voxels are tried in turn, and ``notes`` says which was used.
    """
    hdr = img.header
    candidates: list[tuple[str, Any]] = [("affine", lambda: img.affine)]
    if int(hdr["sform_code"]) > 0:
        candidates.append(("sform", hdr.get_sform))
    if int(hdr["qform_code"]) > 0:
        candidates.append(("qform", hdr.get_qform))
    candidates.append(("pixdim", hdr.get_base_affine))
    for i, (name, get) in enumerate(candidates):
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                affine = np.asarray(get(), float)
        except Exception:  # nibabel raises on some corrupt quaternions
            continue
        if _usable(affine):
            if i > 0:
                notes.append(
                    f"the header's affine is invalid (NaN/Inf or singular): the {name} was used instead"
                )
            return affine
    notes.append("no usable affine in the header (NaN/Inf or singular): 1 mm voxels at the origin assumed")
    return np.eye(4)


def _guess_modality(data: np.ndarray) -> str:
    """CT when the image holds Hounsfield-like air values (< -500), otherwise MR."""
    return "CT" if data.size and float(data.min()) < -500 else "MR"


def _replace_non_finite(path: Path, data: np.ndarray, nan_policy: str, notes: list[str]) -> np.ndarray:
    """``data`` with NaN/Inf voxels replaced as ``nan_policy`` says (see the module docstring)."""
    finite = np.isfinite(data)
    bad = int(data.size - np.count_nonzero(finite))
    if not bad:
        return data
    if nan_policy == "raise":
        raise MedicalImageReadError(path, f"{bad:,} of {data.size:,} voxels are NaN or infinite")
    use_minimum = nan_policy == "minimum" and bad < data.size
    fill = float(data[finite].min()) if use_minimum else 0.0
    data = np.where(finite, data, data.dtype.type(fill))
    what = " (the smallest finite value)" if use_minimum else ""
    notes.append(f"{bad:,} of {data.size:,} voxels were NaN or infinite: replaced with {fill:g}{what}")
    warnings.warn(MedicalImageReadWarning(f"{path}: {notes[-1]}"), stacklevel=3)
    return data


def read_nifti(
    path: str | os.PathLike, *, nan_policy: str = "minimum", modality: str | None = None
) -> Volume:
    """Read a 2D or 3D NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        nan_policy: What NaN/Inf voxels become: ``"minimum"`` (the smallest finite value, with a warning
            giving the count), ``"zero"`` (0, with the warning) or ``"raise"`` (refuse the file).
        modality: DICOM modality code for the display window; guessed when ``None`` (``CT`` when the
            image holds values below -500, else ``MR``) and marked ``metadata["modality_guessed"]``.

    Returns:
        A volume in ``(Z, Y, X)`` (or ``(Y, X)``) order; integer-valued volumes with few values are labels.
        ``metadata`` holds ``affine`` (napari index → RAS), ``nifti_affine`` (file index → RAS) and
        ``header`` facts.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MedicalImageReadError: Not NIfTI, truncated, 4D, NaN/Inf under ``nan_policy="raise"``, or a header
            claiming more voxels than the allocation limit.
    """
    path = Path(path)
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a .nii or .nii.gz file")
    img, shape, dtype = _open_checked(path)
    data = _read_voxels(path, img, shape, dtype)
    notes: list[str] = []
    if np.issubdtype(data.dtype, np.floating):
        data = _replace_non_finite(path, data, nan_policy, notes)
    data = np.ascontiguousarray(data.T)
    nifti_affine = _valid_affine(img, notes)
    affine = nifti_affine @ _REVERSE
    spacing_zyx, direction, origin = geometry_from_affine(affine)
    spacing = tuple(spacing_zyx[3 - data.ndim :])
    guessed = modality is None
    modality = modality or _guess_modality(data)
    values = label_values(data)
    metadata: dict[str, Any] = {
        "format": "nifti",
        "source": str(path),
        "header": _header_facts(img),
        "nifti_affine": nifti_affine.tolist(),
        "modality_guessed": guessed,
        "warnings": notes,
        "rgb": False,
        "slice_thickness": float(spacing_zyx[0]),
    }
    data, window = display_window(data, values, metadata, lambda d: _first_preset(d, modality))
    return Volume(
        data=data,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=modality,
        window=window,
        name=source_name(path),
        is_label=values is not None,
        metadata=metadata,
        affine=affine,
    )


def _open_checked(path: Path) -> tuple[Any, tuple[int, ...], np.dtype]:
    """The NIfTI image, its shape without trailing length-1 axes and its voxel type, after the checks that
    refuse a file before its voxels are read (not NIfTI, 4D, RGB/complex, too large, truncated)."""
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises ImageFileError, HeaderDataError, EOFError, zlib.error ...
        raise MedicalImageReadError(
            path, f"not a readable NIfTI file ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise MedicalImageReadError(path, f"a {type(img).__name__}, not a NIfTI-1/2 image")
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise MedicalImageReadError(
            path,
            f"a {len(shape)}D image of shape {shape} ({int(np.prod(shape[3:]))} volumes along the 4th+ axes); "
            "napari-medssl reads 2D and 3D images: split it first (nibabel.funcs.four_to_three)",
        )
    if len(shape) < 2:
        raise MedicalImageReadError(path, f"a {len(shape)}D image of shape {shape}; expected 2D or 3D")
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise MedicalImageReadError(
            path,
            f"voxels of type {dtype} (RGB or complex NIfTI) are not supported; expected integers or reals",
        )
    check_allocation(path, shape, max(dtype.itemsize, 4))
    needed = int(img.header["vox_offset"]) + int(np.prod(img.shape)) * dtype.itemsize
    held = path.stat().st_size
    gz = path.name.lower().endswith(".gz")
    if held * (GZIP_MAX_RATIO if gz else 1) < needed:  # refused before nibabel allocates `needed` bytes
        raise MedicalImageReadError(
            path,
            f"the header claims {img.shape} voxels of {dtype} ({needed:,} bytes with the header) but the file "
            f"holds {held:,} bytes{' of gzip data (at most 1032x that inflated)' if gz else ''} "
            "(truncated file or wrong header)",
        )
    return img, shape, dtype


def _read_voxels(path: Path, img: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The voxels in file order, float32 after scaling and in native byte order."""
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as err:
        raise MedicalImageReadError(
            path, f"truncated or corrupt image data ({type(err).__name__}: {err})"
        ) from None
    if data.dtype == np.float64 and dtype != np.float64:
        data = data.astype(np.float32)  # scl_slope scaling: float32 is what napari and the models use
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))  # big-endian files: torch takes native order only
    return data


def _first_preset(
    data: np.ndarray, modality: str
) -> tuple[str, tuple[float, float], dict[str, tuple[float, float]]]:
    """The image's window presets, the first of them chosen."""
    presets = window_presets(data, modality)
    return (*next(iter(presets.items())), presets)


def _storage_dtype(data: np.ndarray) -> np.ndarray:
    """Integers in the smallest NIfTI-friendly type (nibabel refuses int64 without being told)."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        for dtype in (np.uint8, np.int16, np.uint16, np.int32):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return data.astype(dtype, copy=False)
        raise MedicalImageWriteError(
            f"integer values from {lo} to {hi} do not fit int32, the largest NIfTI label type"
        )
    return data


def write_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    header: dict[str, Any] | None = None,
) -> str:
    """Write a ``(Z, Y, X)`` or ``(Y, X)`` array as NIfTI on the grid given by a napari affine.

    Args:
        path: Destination ending in ``.nii`` or ``.nii.gz``.
        data: The array in napari order (labels are stored as the smallest fitting integer type).
        affine: ``(4, 4)`` napari index → RAS mm (``metadata["affine"]`` of a layer opened by this
            plugin); identity (1 mm voxels at the origin) when ``None``.
        header: Header facts from the source (``metadata["header"]``); their ``qform_code`` and
            ``sform_code`` are kept (default 1, scanner coordinates).

    Returns:
        The written path.

    Raises:
        MedicalImageWriteError: Wrong suffix, not 2D/3D, or an affine that is not 4x4.
    """
    path = Path(path)
    if not _is_nifti_path(path):
        raise MedicalImageWriteError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise MedicalImageWriteError(f"{path}: NIfTI export takes a 2D or 3D array, got shape {data.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, float)
    if affine.shape != (4, 4):
        raise MedicalImageWriteError(f"{path}: the affine must be 4x4, got shape {affine.shape}")
    stored = np.ascontiguousarray(_storage_dtype(data).T)
    file_affine = affine @ _REVERSE
    img = nib.Nifti1Image(stored, file_affine)
    header = header or {}
    img.set_sform(file_affine, code=int(header.get("sform_code") or 1))
    img.set_qform(file_affine, code=int(header.get("qform_code") or 1))
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return str(path)
