"""DICOM series → :class:`~napari_medssl.io.volume.Volume` (one per series).

How a folder becomes volumes:

1. Every file under the folder (recursively, symlinked folders not followed, hidden files ignored) is
   read once with ``pydicom.dcmread``. Files that are not DICOM, are truncated or corrupt, hold no
   pixel data (RTSTRUCT, SR reports), use a compression no installed decoder handles, or claim an
   image larger than the allocation limit are *skipped* and reported, never fatal while another
   series loads.
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
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .volume import (
    MedicalImageReadError,
    MedicalImageReadWarning,
    Volume,
    as_label_array,
    check_allocation,
    label_values,
)
from .windows import window_presets

MAX_FILES = 50_000
"""A folder with more files than this is refused (open a sub-folder) so a stray click never hangs."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
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


def collect_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[Path], Path]:
    """The files to read: a file, a list of files/folders, or a folder searched recursively.

    Returns:
        ``(files, root)`` with ``root`` the path to name in errors.

    Raises:
        FileNotFoundError: A path does not exist.
        MedicalImageReadError: An empty folder or one with more than :data:`MAX_FILES` files.
    """
    paths = [Path(p) for p in path] if isinstance(path, list | tuple) else [Path(path)]
    if not paths:
        raise MedicalImageReadError("<no path>", "no file or folder was given")
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; give a DICOM file or a folder of DICOM files")
        if p.is_file():
            files.append(p)
            continue
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
            if len(files) > MAX_FILES:
                raise MedicalImageReadError(
                    p, f"the folder holds more than {MAX_FILES:,} files; open the sub-folder of one study"
                )
    root = paths[0]
    if not files:
        raise MedicalImageReadError(root, "the folder is empty (no files in it or its sub-folders)")
    return files, root


def _transfer_syntax(ds: Dataset) -> pydicom.uid.UID:
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid:
        return uid
    implicit, little = getattr(ds, "original_encoding", (False, True))
    uid = (
        pydicom.uid.ImplicitVRLittleEndian
        if implicit
        else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    )
    ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def open_dicom(path: Path) -> Dataset:
    """Read one file and check, before decoding anything, that its pixels can be decoded.

    Raises:
        MedicalImageReadError: Not DICOM, corrupt, truncated, no pixel data, unsupported compression, or
            a header claiming more pixels than the file holds or the allocation limit allows.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            raise MedicalImageReadError(
                path, "not a DICOM file (no 'DICM' marker after the preamble)"
            ) from None
        except Exception as err:  # pydicom raises many types on corrupt input
            raise MedicalImageReadError(path, f"corrupt DICOM file ({type(err).__name__}: {err})") from None
    truncated = any("end of file" in str(w.message).lower() for w in caught)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        if truncated or "Rows" in ds:
            raise MedicalImageReadError(path, "the file is truncated: it ends before its pixel data")
        sop = ds.get("SOPClassUID")
        kind = f"a {sop.name} object" if sop is not None else "an object"
        raise MedicalImageReadError(
            path, f"no pixel data: {kind} (Modality {ds.get('Modality', '?')}) holds no image to display"
        )
    for tag in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(tag) in (None, ""):
            raise MedicalImageReadError(path, f"the pixel description is incomplete: no {tag}")
    frames = int(ds.get("NumberOfFrames") or 1)
    spp = int(ds.get("SamplesPerPixel") or 1)
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    check_allocation(path, (frames, rows, cols, spp), max(1, bits // 8))
    tsuid = _transfer_syntax(ds)
    if not tsuid.is_compressed:
        expected = (frames * rows * cols * spp * bits + 7) // 8
        held = len(ds[next(t for t in _PIXEL_TAGS if t in ds)].value or b"")
        if held < expected:
            raise MedicalImageReadError(
                path,
                f"the header claims {frames} frame(s) of {rows}x{cols}x{spp} at {bits} bits ({expected:,} bytes) "
                f"but the file holds {held:,} bytes of pixel data (truncated file or wrong header)",
            )
    else:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(tsuid)
        except NotImplementedError:
            raise MedicalImageReadError(path, f"unsupported compression: transfer syntax {tsuid}") from None
        if not decoder.is_available:
            raise MedicalImageReadError(
                path,
                f"unsupported compression {tsuid.name}: no decoder installed; install one of: "
                + "; ".join(decoder.missing_dependencies),
            )
    return ds


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as err:  # decoder plugins raise RuntimeError/ValueError/...
        tsname = _transfer_syntax(ds).name
        raise MedicalImageReadError(path, f"cannot decode the pixel data ({tsname}): {err}") from None


def _functional(ds: Dataset, frame: int, seq: str, attr: str) -> Any:
    """An attribute from an enhanced multi-frame functional group (per-frame first, then shared)."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > idx and seq in items[idx] and len(items[idx][seq].value):
            value = items[idx][seq].value[0].get(attr)
            if value is not None:
                return value
    return None


def _plane(ds: Dataset) -> tuple[np.ndarray | None, np.ndarray | None, list[str]]:
    """``(orientation (6,), pixel spacing (dy, dx), notes)`` of a file."""
    notes: list[str] = []
    iop = ds.get("ImageOrientationPatient") or _functional(
        ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"
    )
    spacing = (
        ds.get("PixelSpacing")
        or _functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
        or ds.get("ImagerPixelSpacing")
        or ds.get("NominalScannedPixelSpacing")
    )
    if not spacing:
        notes.append("no PixelSpacing: 1 mm pixels assumed")
        spacing = (1.0, 1.0)
    iop_arr = np.asarray([float(v) for v in iop], float) if iop and len(iop) == 6 else None
    return iop_arr, np.asarray([float(v) for v in spacing], float), notes


def _frame_positions(ds: Dataset, iop: np.ndarray | None, frames: int) -> np.ndarray | None:
    """``(F, 3)`` LPS positions of each frame of a file, or ``None`` when the file gives none."""
    if frames == 1:
        ipp = ds.get("ImagePositionPatient") or _functional(
            ds, 0, "PlanePositionSequence", "ImagePositionPatient"
        )
        return np.asarray([[float(v) for v in ipp]]) if ipp and len(ipp) == 3 else None
    per_frame = [_functional(ds, i, "PlanePositionSequence", "ImagePositionPatient") for i in range(frames)]
    if all(p is not None and len(p) == 3 for p in per_frame):
        return np.asarray([[float(v) for v in p] for p in per_frame])
    offsets = ds.get("GridFrameOffsetVector")
    ipp = ds.get("ImagePositionPatient")
    if offsets is not None and len(offsets) == frames and ipp and iop is not None:
        normal = np.cross(iop[:3], iop[3:])
        offs = np.asarray([float(v) for v in offsets])
        start = np.asarray([float(v) for v in ipp])
        return start[None, :] + (offs - offs[0])[:, None] * normal[None, :]
    return None


def _rescale_params(ds: Dataset, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``(slopes, intercepts)`` (RescaleSlope/Intercept, enhanced groups, RT dose scaling)."""
    if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        slopes = [
            _functional(ds, i, "PixelValueTransformationSequence", "RescaleSlope") for i in range(frames)
        ]
        inters = [
            _functional(ds, i, "PixelValueTransformationSequence", "RescaleIntercept") for i in range(frames)
        ]
    else:
        slopes = [ds.get("RescaleSlope")] * frames
        inters = [ds.get("RescaleIntercept")] * frames
    if ds.get("Modality") == "RTDOSE" and ds.get("DoseGridScaling") is not None:
        slopes = [ds.DoseGridScaling] * frames
    slope = np.asarray([1.0 if s in (None, "") else float(s) for s in slopes])
    inter = np.asarray([0.0 if b in (None, "") else float(b) for b in inters])
    return slope, inter


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
    return out


def _group_key(path: Path, ds: Dataset, iop: np.ndarray | None, spacing: np.ndarray) -> tuple:
    uid = str(ds.get("SeriesInstanceUID") or "").strip()
    frames = int(ds.get("NumberOfFrames") or 1)
    source = ("file", str(path)) if frames > 1 else ("uid", uid) if uid else ("folder", str(path.parent))
    orient = tuple(np.round(iop, 3).tolist()) if iop is not None else None
    return (
        source,
        orient,
        int(ds.Rows),
        int(ds.Columns),
        int(ds.get("SamplesPerPixel") or 1),
        tuple(np.round(spacing, 3).tolist()),
    )


class _Slice:
    """One 2D frame waiting to be stacked: where it came from and where it lies."""

    __slots__ = ("path", "ds", "frame", "position")

    def __init__(self, path: Path, ds: Dataset, frame: int, position: np.ndarray | None) -> None:
        self.path, self.ds, self.frame, self.position = path, ds, frame, position


def _expand(members: list[tuple[Path, Dataset]], iop: np.ndarray | None) -> list[_Slice]:
    slices: list[_Slice] = []
    for path, ds in members:
        frames = int(ds.get("NumberOfFrames") or 1)
        positions = _frame_positions(ds, iop, frames)
        for i in range(frames):
            slices.append(_Slice(path, ds, i, None if positions is None else positions[i]))
    return slices


def _stack(
    slices: list[_Slice], skipped: list[dict[str, str]]
) -> tuple[np.ndarray, list[_Slice], np.ndarray, np.ndarray]:
    """Decode each file once and stack its frames in the given order: ``(Z, Y, X[, C])``."""
    decoded: dict[int, np.ndarray] = {}
    kept: list[_Slice] = []
    for s in slices:
        key = id(s.ds)
        if key not in decoded:
            try:
                arr = _decode(s.path, s.ds)
            except MedicalImageReadError as err:
                skipped.append({"path": str(s.path), "reason": err.reason})
                decoded[key] = None  # type: ignore[assignment]
                continue
            frames = int(s.ds.get("NumberOfFrames") or 1)
            decoded[key] = arr if frames > 1 else arr[None]
        if decoded[key] is not None:
            kept.append(s)
    if not kept:
        raise MedicalImageReadError(slices[0].path, "no slice of the series could be decoded")
    first = decoded[id(kept[0].ds)][kept[0].frame]
    dtype = np.result_type(*{decoded[id(s.ds)].dtype for s in kept})
    out = np.empty((len(kept), *first.shape), dtype=dtype)
    slopes, inters = np.ones(len(kept)), np.zeros(len(kept))
    params: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for z, s in enumerate(kept):
        out[z] = decoded[id(s.ds)][s.frame]
        if id(s.ds) not in params:
            params[id(s.ds)] = _rescale_params(s.ds, int(s.ds.get("NumberOfFrames") or 1))
        slopes[z], inters[z] = params[id(s.ds)][0][s.frame], params[id(s.ds)][1][s.frame]
    return out, kept, slopes, inters


def _sort_along_normal(slices: list[_Slice], iop: np.ndarray, notes: list[str]) -> list[_Slice]:
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(slices, key=lambda s: (float(s.position @ normal), int(s.ds.get("InstanceNumber") or 0)))
    unique: list[_Slice] = []
    for s in order:
        if unique and abs(float((s.position - unique[-1].position) @ normal)) < 1e-3:
            continue
        unique.append(s)
    if len(unique) < len(order):
        notes.append(
            f"{len(order) - len(unique)} slice(s) share a position with another slice (several echoes or "
            "time points?); only the first at each position was kept"
        )
    return unique


def _build(members: list[tuple[Path, Dataset]], skipped: list[dict[str, str]]) -> list[Volume]:
    """One group of files → one volume (or one 2D volume per file when positions are missing)."""
    ds0 = members[0][1]
    iop, pixel_spacing, notes = _plane(ds0)
    slices = _expand(members, iop)
    has_positions = iop is not None and all(s.position is not None for s in slices)
    if (
        not has_positions
        and len(members) > 1
        and all(int(ds.get("NumberOfFrames") or 1) == 1 for _, ds in members)
    ):
        return [v for m in members for v in _build([m], skipped)]
    if has_positions:
        slices = _sort_along_normal(slices, iop, notes)
    stack, slices, slopes, inters = _stack(slices, skipped)
    data = _apply_rescale(stack, slopes, inters)
    rgb = int(ds0.get("SamplesPerPixel") or 1) > 1
    row_cos, col_cos = (
        (iop[:3], iop[3:]) if iop is not None else (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]))
    )
    normal = np.cross(row_cos, col_cos)
    origin = slices[0].position if has_positions else np.zeros(3)
    dz = 1.0
    z_axis = normal
    if has_positions and len(slices) > 1:
        step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
        dz = float(np.linalg.norm(step))
        z_axis = step / dz
        gaps = np.diff([float(s.position @ normal) for s in slices])
        if gaps.max() - gaps.min() > 0.01 * abs(float(np.median(gaps))) + 1e-3:
            notes.append(
                f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm (missing slices?)"
            )
    elif len(slices) > 1:
        notes.append("the frames carry no positions: frame spacing set to 1 (they may be time points)")
    direction = _LPS_TO_RAS @ np.stack([z_axis, col_cos, row_cos], axis=1)
    origin_ras = _LPS_TO_RAS @ origin
    if ds0.get("PhotometricInterpretation") == "MONOCHROME1" and not rgb:
        lo, hi = data.min(), data.max()
        data = (hi - data) + lo
        notes.append("MONOCHROME1 inverted so that bright means dense")
    if data.shape[0] == 1:
        data = data[0]
        spacing: tuple[float, ...] = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    else:
        spacing = (dz, float(pixel_spacing[0]), float(pixel_spacing[1]))
    modality = str(ds0.get("Modality") or "OT")
    values = None if rgb else label_values(data)
    is_label = modality == "SEG" or values is not None
    header = {k: _plain(ds0.get(k)) for k in _HEADER_KEYS if ds0.get(k) not in (None, "")}
    header["TransferSyntaxUID"] = str(_transfer_syntax(ds0))
    header["TransferSyntax"] = _transfer_syntax(ds0).name
    metadata: dict[str, Any] = {
        "format": "dicom",
        "source": str(members[0][0].parent if len(members) > 1 else members[0][0]),
        "files": [str(s.path) for s in slices] if len(members) > 1 else [str(members[0][0])],
        "header": header,
        "rgb": rgb,
        "warnings": notes,
        "slice_thickness": float(ds0.get("SliceThickness") or 1.0),
    }
    if is_label:
        data = as_label_array(data)
        metadata["label_values"] = [int(v) for v in (values if values is not None else np.unique(data))]
        window_name, window, presets = "labels", (0.0, float(max(1, data.max()))), {}
    else:
        gray = data if not rgb else data.mean(axis=-1)
        presets = window_presets(gray, modality)
        window_name, window = next(iter(presets.items()))
        if ds0.get("WindowCenter") is not None and ds0.get("WindowWidth") is not None:
            c = float(np.ravel([ds0.WindowCenter])[0])
            w = float(np.ravel([ds0.WindowWidth])[0])
            presets["dicom"] = (c - w / 2, c + w / 2)
    metadata["window"] = {"name": window_name, "range": list(window)}
    metadata["window_presets"] = {k: list(v) for k, v in presets.items()}
    name = (
        str(ds0.get("SeriesDescription") or ds0.get("ProtocolName") or "").strip()
        or members[0][0].parent.name
    )
    vol = Volume(data, spacing, origin_ras, direction, modality, window, name, is_label, metadata)
    vol.metadata.update(vol.geometry_metadata())
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
            tol = 0.05 * min(img.spacing)
            if (
                np.allclose(lab.direction, img.direction, atol=1e-3)
                and np.allclose(lab.spacing, img.spacing, rtol=1e-3)
                and np.linalg.norm(lab.origin - img.origin) < tol
            ):
                lab.origin, lab.direction, lab.spacing = img.origin.copy(), img.direction.copy(), img.spacing
                lab.affine = img.affine.copy()
                lab.metadata.update(lab.geometry_metadata())
                lab.metadata["reference_series"] = img.name
                lab.metadata["reference_series_uid"] = img.metadata["header"].get("SeriesInstanceUID", "")
                break


def _name_uniquely(volumes: list[Volume]) -> None:
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
        path: A DICOM file, a folder (searched recursively), or a list of files/folders.

    Returns:
        Volumes sorted by study date, series number and name. Files that could not be read are
        listed in every volume's ``metadata["skipped"]`` (``{"path", "reason"}``) and announced with
        a :class:`MedicalImageReadWarning`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MedicalImageReadError: Nothing readable was found (empty folder, a single bad file, or a
            folder of bad files); the message names the file(s) and the reasons.
    """
    files, root = collect_files(path)
    skipped: list[dict[str, str]] = []
    groups: dict[tuple, list[tuple[Path, Dataset]]] = defaultdict(list)
    for f in files:
        try:
            ds = open_dicom(f)
        except MedicalImageReadError as err:
            if len(files) == 1:
                raise
            skipped.append({"path": str(f), "reason": err.reason})
            continue
        iop, spacing, _ = _plane(ds)
        groups[_group_key(f, ds, iop, spacing)].append((f, ds))
    volumes: list[Volume] = []
    for members in groups.values():
        try:
            volumes.extend(_build(members, skipped))
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
