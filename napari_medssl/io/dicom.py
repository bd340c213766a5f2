"""DICOM series → :class:`~napari_medssl.io.volume.Volume` (one per series).

How a folder becomes volumes:

1. Every file under the folder (recursively, symlinked folders not followed, hidden files ignored) is
   read once with ``pydicom.dcmread`` (:mod:`.dicom_files`). Files that are not DICOM, are truncated
   or corrupt, hold no pixel data (RTSTRUCT, SR reports), use a compression no installed decoder
   handles, or claim an image larger than the allocation limit are *skipped* and reported, never
   fatal while another series loads.
2. Files are grouped by SeriesInstanceUID (by folder when the UID is missing or empty) and geometry
   (orientation, rows/columns, pixel spacing, samples per pixel); a multi-frame file is its own group.
3. Slices are sorted along the slice normal (``ImagePositionPatient · (row × column cosines)``);
   spacing is PixelSpacing in-plane and the distance between slice positions along z (never
   SliceThickness). RescaleSlope/Intercept is applied (integer output when the slope is 1).
4. A series whose values are a few non-negative integers (such as TCIA's MaskTumor) is a label map; a
   label series matching an image series' grid (same frame of reference, shape and geometry within
   tolerance) takes that series' geometry exactly, so both overlay voxel for voxel in napari.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from .dicom_files import DicomFile, collect_files, decode_frames, open_dicom
from .dicom_seg import is_seg, read_seg
from .volume import (
    MedicalImageReadError,
    MedicalImageReadWarning,
    Volume,
    as_label_array,
    display_window,
    label_values,
    source_name,
)
from .windows import window_presets

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_HEADER_KEYS = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "StudyDate",
    "Manufacturer",
    "BodyPartExamined",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "SliceThickness",
    "SpacingBetweenSlices",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
)


def _get(ds: Any, keyword: str) -> Any:
    """``ds.get(keyword)``, or ``None`` when the element is empty or too corrupt to convert."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom converts lazily; a corrupt element (bad VR, bad value) fails here
        return None
    return None if value in (None, "") else value


def _positive(value: Any, default: float) -> float:
    """A finite positive number from a header value, else ``default``."""
    try:
        number = float(_first_value(value))
    except (TypeError, ValueError):
        return default
    return number if np.isfinite(number) and number > 0 else default


def _first_value(value: Any) -> Any:
    return value[0] if isinstance(value, pydicom.multival.MultiValue | list | tuple) else value


def _plain(value: Any) -> Any:
    """A pydicom value (DSfloat, IS, UID, PersonName, MultiValue ...) as a JSON-safe Python value."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _group_key(f: DicomFile) -> tuple:
    source = (
        ("file", str(f.path))
        if f.frames > 1
        else ("uid", f.series_uid)
        if f.series_uid
        else ("folder", str(f.path.parent))
    )
    orient = None if f.orientation is None else tuple(np.round(f.orientation, 3).tolist())
    return (source, orient, f.rows, f.cols, f.samples, tuple(np.round(f.pixel_spacing, 3).tolist()))


def _sort_along_normal(
    slices: list[tuple[DicomFile, int]], normal: np.ndarray, notes: list[str]
) -> list[tuple[DicomFile, int]]:
    """Slices ``(file, frame)`` ordered along ``normal``; the first of several at one position kept."""
    order = sorted(slices, key=lambda s: float(s[0].positions[s[1]] @ normal))
    unique: list[tuple[DicomFile, int]] = []
    for s in order:
        if (
            unique
            and abs(float((s[0].positions[s[1]] - unique[-1][0].positions[unique[-1][1]]) @ normal)) < 1e-3
        ):
            continue
        unique.append(s)
    if len(unique) < len(order):
        notes.append(
            f"{len(order) - len(unique)} slice(s) share a position with another slice (several echoes or "
            "time points?); only the first at each position was kept"
        )
    return unique


def _stack(
    slices: list[tuple[DicomFile, int]], skipped: list[dict[str, str]]
) -> tuple[np.ndarray, list[tuple[DicomFile, int]], np.ndarray, np.ndarray]:
    """Decode each file once and stack the slices in order: ``(Z, Y, X[, C])``, kept slices, slopes, intercepts."""
    decoded: dict[int, tuple[np.ndarray, int] | None] = {}
    kept: list[tuple[DicomFile, int]] = []
    for f, frame in slices:
        if id(f) not in decoded:
            try:
                decoded[id(f)] = decode_frames(f)
            except MedicalImageReadError as err:
                skipped.append({"path": str(f.path), "reason": err.reason})
                decoded[id(f)] = None
        if decoded[id(f)] is not None:
            kept.append((f, frame))
    if not kept:
        f0 = slices[0][0]
        reason = next(s["reason"] for s in skipped if s["path"] == str(f0.path))
        raise MedicalImageReadError(f0.path, reason)
    dtype = np.result_type(*{decoded[id(f)][0].dtype for f, _ in kept})
    out = np.empty((len(kept), *decoded[id(kept[0][0])][0].shape[1:]), dtype=dtype)
    # as pydicom does: mask (unsigned) or sign-extend (signed) the unused high bits of native pixel data;
    # in place on the whole stack when every slice shares its dtype and shift (the usual case)
    shifts = {(decoded[id(f)][0].dtype, decoded[id(f)][1]) for f, _ in kept}
    shift_all = next(iter(shifts))[1] if len(shifts) == 1 and next(iter(shifts))[0] == dtype else 0
    for z, (f, frame) in enumerate(kept):
        frames, unused_bits = decoded[id(f)]
        pixels = frames[frame]
        if unused_bits and not shift_all:
            pixels = np.right_shift(np.left_shift(pixels, unused_bits), unused_bits)
        out[z] = pixels
    if shift_all:
        np.left_shift(out, shift_all, out=out)
        np.right_shift(out, shift_all, out=out)
    slopes = np.asarray([f.slopes[frame] for f, frame in kept])
    inters = np.asarray([f.intercepts[frame] for f, frame in kept])
    return out, kept, slopes, inters


def _apply_rescale(stack: np.ndarray, slopes: np.ndarray, inters: np.ndarray) -> np.ndarray:
    """Modality LUT on ``(Z, Y, X[, C])``: integer output when every slope is 1 and the intercept integral."""
    if np.all(slopes == 1.0) and np.all(inters == 0.0):
        return stack
    if np.all(slopes == 1.0) and np.all(inters == inters[0]) and float(inters[0]).is_integer():
        b = int(inters[0])
        lo, hi = int(stack.min()), int(stack.max())
        lo, hi = min(lo, lo + b), max(hi, hi + b)
        if lo >= -(2**31) and hi < 2**31:
            dtype = np.int16 if lo >= -(2**15) and hi < 2**15 else np.int32
            out = stack.astype(dtype)
            out += dtype(b)
            return out
    shape = (-1,) + (1,) * (stack.ndim - 1)
    out = stack.astype(np.float32)
    out *= slopes.astype(np.float32).reshape(shape)
    out += inters.astype(np.float32).reshape(shape)
    if not np.all(np.isfinite(out)):
        raise ValueError("RescaleSlope/RescaleIntercept push values beyond the float32 range")
    return out


def _geometry(
    kept: list[tuple[DicomFile, int]], orientation: np.ndarray | None, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(direction (3, 3) RAS columns z y x, origin (3,) RAS, dz)`` from the sorted slices' positions."""
    row_cos, col_cos = (
        (orientation[:3], orientation[3:]) if orientation is not None else (np.eye(3)[0], np.eye(3)[1])
    )
    normal = np.cross(row_cos, col_cos)
    positions = [f.positions[i] for f, i in kept] if all(f.positions is not None for f, _ in kept) else None
    origin, z_axis, dz = np.zeros(3), normal, 1.0
    if positions is not None and orientation is not None:
        origin = positions[0]
        if len(positions) > 1:
            step = (positions[-1] - positions[0]) / (len(positions) - 1)
            dz = float(np.linalg.norm(step))
            z_axis = step / dz
            gaps = np.diff([float(p @ normal) for p in positions])
            if gaps.max() - gaps.min() > 0.01 * abs(float(np.median(gaps))) + 1e-3:
                notes.append(
                    f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm (missing slices?)"
                )
    elif len(kept) > 1:
        notes.append("the frames carry no positions: frame spacing set to 1 (they may be time points)")
    direction = _LPS_TO_RAS @ np.stack([z_axis, col_cos, row_cos], axis=1)
    return direction, _LPS_TO_RAS @ origin, dz


def _window_metadata(
    data: np.ndarray, modality: str, rgb: bool, ds0: Any
) -> tuple[str, tuple[float, float], dict]:
    presets = window_presets(data if not rgb else data.mean(axis=-1), modality)
    name, window = next(iter(presets.items()))
    center, width = _get(ds0, "WindowCenter"), _positive(_get(ds0, "WindowWidth"), 0.0)
    if center is not None and width > 0 and np.isfinite(float(_first_value(center))):
        c, w = float(_first_value(center)), width
        presets["dicom"] = (c - w / 2, c + w / 2)
    return name, window, presets


def _build(members: list[DicomFile], skipped: list[dict[str, str]]) -> list[Volume]:
    """One group of files → one volume (or one 2D volume per file when slice positions are missing)."""
    f0 = members[0]
    has_positions = f0.orientation is not None and all(f.positions is not None for f in members)
    if not has_positions and len(members) > 1 and all(f.frames == 1 for f in members):
        return [v for f in members for v in _build([f], skipped)]
    notes: list[str] = [] if f0.spacing_known else ["no PixelSpacing: 1 mm pixels assumed"]
    slices = [(f, i) for f in members for i in range(f.frames)]
    if has_positions:
        slices = _sort_along_normal(slices, np.cross(f0.orientation[:3], f0.orientation[3:]), notes)
    stack, kept, slopes, inters = _stack(slices, skipped)
    data = _apply_rescale(stack, slopes, inters)
    direction, origin, dz = _geometry(kept, f0.orientation, notes)
    ds0, rgb = f0.ds, f0.samples > 1
    if _get(ds0, "PhotometricInterpretation") == "MONOCHROME1" and not rgb:
        data = (data.max() - data) + data.min()
        notes.append("MONOCHROME1 inverted so that bright means dense")
    dy, dx = float(f0.pixel_spacing[0]), float(f0.pixel_spacing[1])
    if data.shape[0] == 1:
        data, spacing = data[0], (dy, dx)
    else:
        spacing = (dz, dy, dx)
    modality = str(_get(ds0, "Modality") or "OT")
    values = None if rgb else label_values(data)
    is_label = modality == "SEG" or values is not None
    header = {k: _plain(v) for k in _HEADER_KEYS if (v := _get(ds0, k)) is not None}
    header["TransferSyntaxUID"] = str(f0.transfer_syntax)
    header["TransferSyntax"] = f0.transfer_syntax.name
    metadata: dict[str, Any] = {
        "format": "dicom",
        "source": str(f0.path.parent if len(members) > 1 else f0.path),
        "files": list(dict.fromkeys(str(f.path) for f, _ in kept)),
        "header": header,
        "rgb": rgb,
        "warnings": notes,
        "slice_thickness": _positive(_get(ds0, "SliceThickness"), 1.0),
    }
    if is_label and values is None:  # a SEG series whose values are not segmentation-like
        values = np.unique(as_label_array(data))
    data, window = display_window(data, values, metadata, lambda d: _window_metadata(d, modality, rgb, ds0))
    fallback_name = f0.path.parent.name if len(members) > 1 else source_name(f0.path)
    name = str(_get(ds0, "SeriesDescription") or _get(ds0, "ProtocolName") or "").strip() or fallback_name
    vol = Volume(
        data=data,
        spacing=spacing,
        origin=origin,
        direction=direction,
        modality=modality,
        window=window,
        name=name,
        is_label=is_label,
        metadata=metadata,
    )
    return [vol]


def _snap_labels(volumes: list[Volume]) -> None:
    """Put each label series exactly on the grid of the image series it matches (same FoR, shape, geometry)."""
    images = [v for v in volumes if not v.is_label]
    for lab in (v for v in volumes if v.is_label):
        for img in images:
            if img.data.shape[: img.spatial_ndim] != lab.data.shape:
                continue
            for_l = lab.metadata["header"].get("FrameOfReferenceUID")
            for_i = img.metadata["header"].get("FrameOfReferenceUID")
            if for_l and for_i and for_l != for_i:
                continue
            if (
                np.allclose(lab.direction, img.direction, atol=1e-3)
                and np.allclose(lab.spacing, img.spacing, rtol=1e-3)
                and np.linalg.norm(lab.origin - img.origin) < 0.05 * min(img.spacing)
            ):
                lab.origin, lab.direction, lab.spacing = img.origin.copy(), img.direction.copy(), img.spacing
                lab.affine = img.affine.copy()
                lab.metadata.update(lab.geometry_metadata())
                lab.metadata["reference_series"] = img.name
                lab.metadata["reference_series_uid"] = img.metadata["header"].get("SeriesInstanceUID", "")
                break


def _name_uniquely(volumes: list[Volume]) -> None:
    """Series names repeat across studies: add the study date, then a counter."""
    seen: dict[str, int] = defaultdict(int)
    for v in volumes:
        seen[v.name] += 1
    for v in volumes:
        if seen[v.name] > 1 and v.metadata["header"].get("StudyDate"):
            v.name = f"{v.name} {v.metadata['header']['StudyDate']}"
    taken: dict[str, int] = defaultdict(int)
    for v in volumes:
        taken[v.name] += 1
        if taken[v.name] > 1:
            v.name = f"{v.name} #{taken[v.name]}"


def _sort_key(v: Volume) -> tuple:
    h = v.metadata["header"]
    number = h.get("SeriesNumber")
    return (str(h.get("StudyDate", "")), int(number) if isinstance(number, int | float) else 0, v.name)


def read_dicom(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Volume]:
    """Read DICOM files or folders into one :class:`Volume` per series.

    Args:
        path: A DICOM file, a DICOMDIR (the files it lists), a folder (searched recursively), or a list
            of these.

    Returns:
        Volumes sorted by study date, series number and name. Files that could not be read are
        listed in every volume's ``metadata["skipped"]`` (``{"path", "reason"}``) and announced with
        a :class:`MedicalImageReadWarning`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MedicalImageReadError: Nothing readable was found (empty folder, a single bad file, or a
            folder of bad files); the message names the file(s) and the reasons.
    """
    skipped: list[dict[str, str]] = []
    files, root = collect_files(path, skipped)
    groups: dict[tuple, list[DicomFile]] = defaultdict(list)
    segs: list[Path] = []  # DICOM SEG objects: read on their source series' grid (io.dicom_seg)
    for p in files:
        try:
            f = open_dicom(p)
        except MedicalImageReadError as err:
            if len(files) == 1:
                raise
            skipped.append({"path": str(p), "reason": err.reason})
            continue
        if is_seg(f.ds):
            segs.append(p)
            continue
        groups[_group_key(f)].append(f)
    volumes: list[Volume] = []
    for members in groups.values():
        try:
            try:
                volumes.extend(_build(members, skipped))
            except MedicalImageReadError:
                raise
            except Exception as err:  # a corrupt header value met while assembling the series
                where = members[0].path if len(members) == 1 else members[0].path.parent
                raise MedicalImageReadError(where, f"corrupt series ({type(err).__name__}: {err})") from None
        except MedicalImageReadError as err:
            if len(files) == 1:
                raise
            if not any(s["path"] == err.path for s in skipped):
                skipped.append({"path": err.path, "reason": err.reason})
    for p in segs:
        try:
            volumes.append(read_seg(p, source=list(volumes)))
        except MedicalImageReadError as err:
            if len(files) == 1:
                raise
            skipped.append({"path": err.path, "reason": err.reason})
    if not volumes:
        if len(skipped) == 1:
            raise MedicalImageReadError(skipped[0]["path"], skipped[0]["reason"])
        listing = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise MedicalImageReadError(
            root, f"no readable DICOM image among {len(files)} file(s): {listing}{more}"
        )
    volumes.sort(key=_sort_key)
    _name_uniquely(volumes)
    _snap_labels(volumes)
    for v in volumes:
        v.metadata["skipped"] = list(skipped)
    if skipped:
        listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        warnings.warn(
            MedicalImageReadWarning(f"{len(skipped)} file(s) under {root} were skipped: {listing}"),
            stacklevel=2,
        )
    return volumes
