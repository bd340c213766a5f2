"""One DICOM file: find, open, check and decode it (series assembly lives in :mod:`.dicom`).

Every pydicom attribute a reader needs is read once per file into a :class:`DicomFile`, because
attribute conversion is most of what a series reader spends beyond ``dcmread`` itself.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from .dicomdir import DICOMDIR_SOP_CLASS, dicomdir_files, is_dicomdir
from .volume import MedicalImageReadError, max_voxels

MAX_FILES = 50_000
"""A folder with more files than this is refused (open a sub-folder) so a stray click never hangs."""

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
"""PixelData, FloatPixelData, DoubleFloatPixelData."""
_NATIVE_LITTLE_ENDIAN = (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian)


@dataclass
class DicomFile:
    """A DICOM file whose pixels are known to be decodable, with the facts the series reader needs.

    Attributes:
        path: The file.
        ds: The dataset (pixel data not decoded yet).
        rows, cols, frames, samples: Image size (``samples`` is 3 for RGB).
        bits, bits_stored: BitsAllocated and BitsStored.
        signed: PixelRepresentation is 1.
        transfer_syntax: The transfer syntax UID.
        orientation: ``(6,)`` ImageOrientationPatient (row then column direction cosines), or ``None``.
        pixel_spacing: ``(dy, dx)`` in mm (PixelSpacing, else ImagerPixelSpacing, else 1).
        spacing_known: Whether ``pixel_spacing`` came from the file.
        series_uid: SeriesInstanceUID (``""`` when missing or empty).
        positions: ``(F, 3)`` ImagePositionPatient (LPS) of each frame, or ``None``.
        slopes, intercepts: ``(F,)`` rescale of each frame.
    """

    path: Path
    ds: Dataset
    rows: int
    cols: int
    frames: int
    samples: int
    bits: int
    bits_stored: int
    signed: bool
    transfer_syntax: pydicom.uid.UID
    orientation: np.ndarray | None
    pixel_spacing: np.ndarray
    spacing_known: bool
    series_uid: str
    positions: np.ndarray | None
    slopes: np.ndarray
    intercepts: np.ndarray


def collect_files(
    path: str | os.PathLike | Sequence[str | os.PathLike], skipped: list[dict[str, str]] | None = None
) -> tuple[list[Path], Path]:
    """The files to read: a file, a list of files/folders, or a folder searched recursively.

    Symlinked folders are not followed and hidden files (``.DS_Store``) are ignored. A DICOMDIR given
    as a file stands for the files it lists (:mod:`.dicomdir`; listed files that are missing are added
    to ``skipped``); a DICOMDIR met inside a folder is passed over (the folder's files are read anyway).

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
            if is_dicomdir(p):
                listed, missing = dicomdir_files(p)
                files.extend(listed)
                if skipped is not None:
                    skipped.extend(missing)
            else:
                files.append(p)
            continue
        for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(
                Path(dirpath) / f
                for f in sorted(filenames)
                if not f.startswith(".") and f.upper() != "DICOMDIR"
            )
            if len(files) > MAX_FILES:
                raise MedicalImageReadError(
                    p, f"the folder holds more than {MAX_FILES:,} files; open the sub-folder of one study"
                )
    if not files:
        raise MedicalImageReadError(paths[0], "the folder is empty (no files in it or its sub-folders)")
    return files, paths[0]


def transfer_syntax(ds: Dataset) -> pydicom.uid.UID:
    """The dataset's transfer syntax (inferred from how it was encoded when the file meta lacks it)."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return uid
    implicit, little = getattr(ds, "original_encoding", (False, True))
    uid = (
        pydicom.uid.ImplicitVRLittleEndian
        if implicit
        else (pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    )
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file's first 132 bytes are DICOM's: the 'DICM' marker at byte 128, or a bare dataset.

    A bare dataset (no preamble, as old ACR-NEMA-style files and some exports are written) starts with
    a group 0002 or 0008 tag whose element number is below 0x0100, little- or big-endian.
    """
    if head[128:132] == b"DICM":
        return True
    if len(head) < 4:
        return False
    little = head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0
    big = head[:2] in (b"\x00\x02", b"\x00\x08") and head[2] == 0
    return little or big


def _read(path: Path) -> tuple[Dataset, list[str]]:
    """``dcmread`` from memory, with pydicom's warnings captured (they reveal truncation).

    The file is checked with :func:`looks_like_dicom` before it is read whole, and parsed from a
    ``BytesIO``: a corrupt element length then cannot make a read allocate more than the file's size
    (``FileIO.read(n)`` allocates ``n`` bytes up front).
    """
    with open(path, "rb") as fh:
        head = fh.read(132)
        preamble = head[128:132] == b"DICM"
        if not looks_like_dicom(head):
            raise MedicalImageReadError(path, "not a DICOM file (no 'DICM' marker after the preamble)")
        buffer = io.BytesIO(head + fh.read())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(buffer, force=not preamble)
        except Exception as err:  # pydicom raises many types on corrupt input
            raise MedicalImageReadError(path, f"corrupt DICOM file ({type(err).__name__}: {err})") from None
    return ds, [str(w.message) for w in caught]


def _no_pixels_reason(ds: Dataset, messages: list[str]) -> str:
    if any("end of file" in m.lower() for m in messages) or "Rows" in ds:
        return "the file is truncated: it ends before its pixel data"
    meta = getattr(ds, "file_meta", None)
    if "DirectoryRecordSequence" in ds or (
        meta is not None and meta.get("MediaStorageSOPClassUID") == DICOMDIR_SOP_CLASS
    ):
        return "a DICOMDIR (the index of a DICOM file-set): open it on its own to read the series it lists"
    sop = ds.get("SOPClassUID")
    if sop is None and "Modality" not in ds:
        if messages:
            return (
                f"corrupt DICOM header: no SOP class, modality or pixel data could be parsed ({messages[0]})"
            )
        return f"no pixel data: the dataset holds {len(ds)} element(s), none of them an image"
    kind = f"a {getattr(sop, 'name', None) or sop} object" if sop is not None else "an object"
    return f"no pixel data: {kind} (Modality {ds.get('Modality', '?')}) holds no image to display"


def functional(ds: Dataset, frame: int, seq: str, attr: str) -> Any:
    """An attribute from an enhanced multi-frame functional group (per-frame first, then shared)."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > idx and seq in items[idx] and len(items[idx][seq].value):
            value = items[idx][seq].value[0].get(attr)
            if value is not None:
                return value
    return None


def value(ds: Dataset, tag: int) -> Any:
    """An attribute's value, parsed straight from the raw bytes for US, IS, DS and UI elements.

    pydicom converts and validates each element on first access (~10 µs, most of what a series reader
    spends beyond ``dcmread``); for these simple VRs in little-endian explicit-VR files this parses the
    bytes directly (US → int, IS/DS → list of floats, UI → str). Anything else, including elements
    pydicom already converted, goes through pydicom (``ds[tag].value``). ``None`` when absent or empty.
    """
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and elem.is_little_endian and elem.VR is not None:
        raw = elem.value
        if not raw:
            return None
        if elem.VR == "US" and len(raw) == 2:
            return int.from_bytes(raw, "little")
        if elem.VR in ("IS", "DS"):
            try:
                return [float(part) for part in raw.split(b"\\")]
            except ValueError:
                pass  # let pydicom report or repair a malformed number
        if elem.VR == "UI":
            return raw.rstrip(b"\x00 ").decode("ascii", "replace")
    converted = ds[tag].value
    return None if converted in (None, "", b"") else converted


def _first(values: Any) -> Any:
    """The first of a multi-valued attribute (or the value itself)."""
    return values[0] if isinstance(values, list | tuple | pydicom.multival.MultiValue) else values


def _float_list(values: Any, n: int) -> list[float] | None:
    """``n`` finite floats, or ``None`` (absent, wrong count, or a NaN/Inf in a corrupt header).

    Plain Python on purpose: these run once per file on 2-6 numbers, where numpy's call overhead
    would cost more than the reading.
    """
    if not values or len(values) != n:
        return None
    out = [float(v) for v in values]
    return out if all(math.isfinite(v) for v in out) else None


def _floats(values: Any, n: int) -> np.ndarray | None:
    out = _float_list(values, n)
    return None if out is None else np.array(out)


def _orientation(values: Any) -> np.ndarray | None:
    """ImageOrientationPatient as two unit vectors (row, column), or ``None`` when it is not a valid one."""
    iop = _float_list(values, 6)
    if iop is None:
        return None
    r, c = iop[:3], iop[3:]
    nr, nc = math.sqrt(sum(v * v for v in r)), math.sqrt(sum(v * v for v in c))
    if not (0.5 < nr < 1.5 and 0.5 < nc < 1.5):
        return None
    r, c = [v / nr for v in r], [v / nc for v in c]
    cross = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    if math.sqrt(sum(v * v for v in cross)) < 0.5:  # row and column directions (nearly) parallel
        return None
    return np.array(r + c)


def _pixel_spacing(values: Any) -> np.ndarray | None:
    spacing = _float_list(values, 2)
    return np.array(spacing) if spacing is not None and min(spacing) > 0 else None


def _positions(ds: Dataset, orientation: np.ndarray | None, frames: int) -> np.ndarray | None:
    """``(F, 3)`` LPS positions of each frame, or ``None`` when the file gives none."""
    if frames == 1:
        ipp = value(ds, 0x00200032) or functional(ds, 0, "PlanePositionSequence", "ImagePositionPatient")
        pos = _floats(ipp, 3)
        return None if pos is None else pos[None, :]
    per_frame = [
        _floats(functional(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3) for i in range(frames)
    ]
    if all(p is not None for p in per_frame):
        return np.stack(per_frame)
    offsets, start = ds.get("GridFrameOffsetVector"), _floats(ds.get("ImagePositionPatient"), 3)
    if offsets is not None and len(offsets) == frames and start is not None and orientation is not None:
        normal = np.cross(orientation[:3], orientation[3:])
        offs = np.asarray([float(v) for v in offsets])
        positions = start[None, :] + (offs - offs[0])[:, None] * normal[None, :]
        return positions if np.all(np.isfinite(positions)) else None
    return None


def _rescale(ds: Dataset, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``(slopes, intercepts)``: RescaleSlope/Intercept, enhanced groups, or RT dose scaling."""
    if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        seq = "PixelValueTransformationSequence"
        slopes = [functional(ds, i, seq, "RescaleSlope") for i in range(frames)]
        inters = [functional(ds, i, seq, "RescaleIntercept") for i in range(frames)]
    else:
        slopes = [_first(value(ds, 0x00281053))] * frames
        inters = [_first(value(ds, 0x00281052))] * frames
    if 0x3004000E in ds:  # RT dose: DoseGridScaling
        slopes = [ds.DoseGridScaling] * frames
    slope = np.asarray([1.0 if s in (None, "") else float(s) for s in slopes])
    inter = np.asarray([0.0 if b in (None, "") else float(b) for b in inters])
    return slope, inter


def _check_decodable(
    path: Path, ds: Dataset, tsuid: pydicom.uid.UID, shape: tuple[int, ...], bits: int
) -> None:
    """Refuse a header that claims more than the limit, more bytes than the file holds, or no decoder."""
    n = math.prod(shape)
    if n > max_voxels():
        raise MedicalImageReadError(
            path,
            f"the header claims {shape[0]} frame(s) of {shape[1]}x{shape[2]}x{shape[3]} ({n:,} values, "
            f"{n * bits / 8 / 2**30:.1f} GiB), more than the limit of {max_voxels():,}; refusing to allocate "
            "(raise $MEDSSL_MAX_VOXELS if the file is genuine)",
        )
    try:
        compressed = tsuid.is_compressed
    except ValueError:  # not a transfer syntax UID at all
        raise MedicalImageReadError(path, f"unknown transfer syntax {tsuid!s}") from None
    if not compressed:
        expected = (n * bits + 7) // 8
        if shape[3] == 3 and ds.get("PhotometricInterpretation") == "YBR_FULL_422":
            expected = expected // 3 * 2  # chroma subsampled 2:1 horizontally: 2 values per pixel
        held = len(ds.get_item(next(t for t in PIXEL_TAGS if t in ds)).value or b"")
        if held < expected:
            raise MedicalImageReadError(
                path,
                f"the header claims {shape[0]} frame(s) of {shape[1]}x{shape[2]}x{shape[3]} at {bits} bits "
                f"({expected:,} bytes) but the file holds {held:,} bytes of pixel data (truncated file or wrong header)",
            )
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise MedicalImageReadError(
            path,
            f"unsupported compression {tsuid.name} (transfer syntax {tsuid}): pydicom has no decoder for it",
        ) from None
    if not decoder.is_available:
        raise MedicalImageReadError(
            path,
            f"unsupported compression {tsuid.name}: no decoder installed; install one of: "
            + "; ".join(decoder.missing_dependencies),
        )


def open_dicom(path: str | os.PathLike) -> DicomFile:
    """Read one file and check, before decoding anything, that its pixels can be decoded.

    Raises:
        MedicalImageReadError: Not DICOM, corrupt, truncated, no pixel data, unsupported compression, or
            a header claiming more pixels than the file holds or the allocation limit allows.
    """
    path = path if isinstance(path, Path) else Path(path)
    ds, messages = _read(path)
    try:
        return _describe(path, ds, messages)
    except (MedicalImageReadError, MemoryError):
        raise
    except Exception as err:  # pydicom converts elements lazily: a corrupt one fails on first access
        raise MedicalImageReadError(path, f"corrupt DICOM header ({type(err).__name__}: {err})") from None


def _describe(path: Path, ds: Dataset, messages: list[str]) -> DicomFile:
    """The :class:`DicomFile` of a dataset read from ``path`` (see :func:`open_dicom`)."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise MedicalImageReadError(path, _no_pixels_reason(ds, messages))
    rows, cols, bits = value(ds, 0x00280010), value(ds, 0x00280011), value(ds, 0x00280100)
    for name, v in (("Rows", rows), ("Columns", cols), ("BitsAllocated", bits)):
        if v is None or int(_first(v)) <= 0:
            raise MedicalImageReadError(path, f"the pixel description is incomplete: {name} is {v!r}")
    rows, cols, bits = int(_first(rows)), int(_first(cols)), int(_first(bits))
    frames = int(_first(value(ds, 0x00280008)) or 1)
    samples = int(_first(value(ds, 0x00280002)) or 1)
    bits_stored = int(_first(value(ds, 0x00280101)) or bits)
    if frames < 1 or samples < 1 or not 0 < bits_stored <= bits:
        raise MedicalImageReadError(
            path,
            f"the pixel description is invalid: NumberOfFrames {frames}, SamplesPerPixel {samples}, "
            f"BitsStored {bits_stored} of BitsAllocated {bits}",
        )
    tsuid = transfer_syntax(ds)
    _check_decodable(path, ds, tsuid, (frames, rows, cols, samples), bits)
    orientation = _orientation(
        value(ds, 0x00200037) or functional(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    )
    spacing = _pixel_spacing(
        value(ds, 0x00280030)
        or functional(ds, 0, "PixelMeasuresSequence", "PixelSpacing")
        or ds.get("ImagerPixelSpacing")
        or ds.get("NominalScannedPixelSpacing")
    )
    slopes, intercepts = _rescale(ds, frames)
    if not all(math.isfinite(v) for v in (*slopes.tolist(), *intercepts.tolist())) or 0.0 in slopes.tolist():
        raise MedicalImageReadError(
            path, "RescaleSlope/RescaleIntercept is not a usable number (NaN, Inf or a zero slope)"
        )
    return DicomFile(
        path=path,
        ds=ds,
        rows=rows,
        cols=cols,
        frames=frames,
        samples=samples,
        bits=bits,
        bits_stored=bits_stored,
        signed=int(_first(value(ds, 0x00280103)) or 0) == 1,
        transfer_syntax=tsuid,
        orientation=orientation,
        pixel_spacing=spacing if spacing is not None else np.ones(2),
        spacing_known=spacing is not None,
        series_uid=str(value(ds, 0x0020000E) or "").strip(),
        positions=_positions(ds, orientation, frames),
        slopes=slopes,
        intercepts=intercepts,
    )


def decode_frames(f: DicomFile) -> tuple[np.ndarray, int]:
    """``(F, Y, X[, C])`` frames of a file, and the unused high bits still to correct.

    Uncompressed little-endian grayscale pixel data is viewed directly (``np.frombuffer``, zero copy);
    it then still needs pydicom's unused-bit correction (mask or sign-extend the high
    ``bits - bits_stored`` bits, returned as the second value), which the caller applies per frame.
    Everything else goes through ``ds.pixel_array`` (pydicom's decoders: JPEG 2000 via Pillow, RLE, ...)
    and needs no correction (0).

    Raises:
        MedicalImageReadError: The decoder failed; the message names the transfer syntax.
    """
    if (
        f.transfer_syntax in _NATIVE_LITTLE_ENDIAN
        and f.samples == 1
        and f.bits in (8, 16, 32)
        and PIXEL_TAGS[0] in f.ds
    ):
        dtype = f"<{'i' if f.signed else 'u'}{f.bits // 8}"
        view = np.frombuffer(
            f.ds.get_item(PIXEL_TAGS[0]).value, dtype=dtype, count=f.frames * f.rows * f.cols
        )
        return view.reshape(f.frames, f.rows, f.cols), f.bits - f.bits_stored
    try:
        arr = f.ds.pixel_array
    except Exception as err:  # decoder plugins raise RuntimeError/ValueError/...
        raise MedicalImageReadError(
            f.path, f"cannot decode the pixel data ({f.transfer_syntax.name}): {err}"
        ) from None
    return (arr if f.frames > 1 else arr[None]), 0
