"""Mutation fuzzing of the readers: real files from $MEDSSL_DATA_DIR, mutated, read in a watched worker process.

Shared by ``tests/test_fuzz_readers.py`` (a short, derandomised Hypothesis run) and
``benchmarks/fuzz_readers.py`` (the long run). Every input starts as a real DICOM, NIfTI or PNG file and gets
one mutation: byte-level (bit flips, truncation, overwritten or spliced chunks, "interesting" integers) or
structured (a header field changed through pydicom, the NIfTI header struct or the PNG IHDR, with checksums
fixed so the change reaches the decoder).

:class:`ReaderWorker` reads each file in a separate process through the napari reader adapter
(``napari_medssl._reader.read_layers``, the path the viewer takes) and classifies the outcome:

- ``ok``: layers came back; ``refused``: a documented error (``MedicalImageReadError``, ``FileNotFoundError``);
- ``bad_output``: layers came back that napari could not place (non-finite or zero scale, translate or affine,
  NaN contrast limits: see :func:`layer_problem`);
- ``unexpected``: any other exception (a bug), ``crash``: the process died (segfault, abort),
  ``hang``: no answer within the timeout (the worker is killed and restarted).

Each answer carries ``peak_mb``: the worker's peak resident memory during that read above its resident memory
before it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), so C allocations (Pillow,
openjpeg, zlib) count too. The worker's address space is capped (``RLIMIT_AS``) so a runaway allocation fails
as ``MemoryError`` (an ``unexpected`` outcome) instead of taking the machine down.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import selectors
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]

SEED_FILES = {
    "dicom_mr": "dicom/tcia_btp_PGBM-005_T1post/000000.dcm",
    "dicom_mask": "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993/5364-MaskTumor-94345",
    "dicom_ct_j2k": "dicom/ct_jpeg2000_no_uids",
    "nifti_gz": "hippocampus/imagesTr/hippocampus_001.nii.gz",
    "nifti_ct": "nifti/example_ct_sm.nii.gz",
    "nifti_raw": "hippocampus/labelsTr/hippocampus_003.nii.gz",  # written out uncompressed (.nii)
    "png": "mammography_mias/mdb005.png",
}
"""Seed name → real file (a folder means: its first file). ``nifti_raw`` is stored gunzipped as ``.nii``."""

SUFFIX = {
    "dicom_mr": ".dcm",
    "dicom_mask": ".dcm",
    "dicom_ct_j2k": "",  # the real files carry no suffix: the reader sniffs 'DICM'
    "nifti_gz": ".nii.gz",
    "nifti_ct": ".nii.gz",
    "nifti_raw": ".nii",
    "png": ".png",
}

DOCUMENTED = ("MedicalImageReadError", "FileNotFoundError")
"""Exception types the readers document (``napari_medssl.io`` and ``_reader.read_layers``)."""


def seed_bytes(data_dir: Path) -> dict[str, bytes]:
    """The bytes of every seed file (real data; ``nifti_raw`` gunzipped)."""
    out = {}
    for name, rel in SEED_FILES.items():
        path = data_dir / rel
        if path.is_dir():
            path = sorted(p for p in path.iterdir() if p.is_file())[0]
        raw = path.read_bytes()
        out[name] = gzip.decompress(raw) if name == "nifti_raw" else raw
    return out


# -- byte-level mutations -------------------------------------------------------------------------------------
INTERESTING = [
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    10**9,
    2**40,
]


def _pos(rng: np.random.Generator, n: int, header: int = 2048) -> int:
    """A position, biased to the header region where most parsing decisions are made."""
    if n <= 1:
        return 0
    if rng.random() < 0.6:
        return int(rng.integers(0, min(n, header)))
    return int(rng.integers(0, n))


def bitflip(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(raw)
    k = int(rng.integers(1, 33))
    for _ in range(k):
        i = _pos(rng, len(buf))
        buf[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(buf), f"bitflip x{k}"


def truncate(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    n = _pos(rng, len(raw), header=4096)
    return raw[:n], f"truncate at {n} of {len(raw)}"


def overwrite(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(raw)
    i, k = _pos(rng, len(buf)), int(rng.integers(1, 65))
    buf[i : i + k] = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
    return bytes(buf), f"overwrite {k} bytes at {i}"


def interesting(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(raw)
    value = int(rng.choice(INTERESTING))
    width = int(rng.choice([2, 4, 8]))
    i = _pos(rng, max(1, len(buf) - width))
    buf[i : i + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    return bytes(buf), f"int {value:#x} ({width} bytes) at {i}"


def splice(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    i = _pos(rng, len(raw))
    k = int(rng.integers(1, 257))
    if rng.random() < 0.5:
        return raw[:i] + raw[i + k :], f"delete {k} bytes at {i}"
    return raw[:i] + raw[i : i + k] + raw[i:], f"duplicate {k} bytes at {i}"


BYTE_MUTATORS: dict[str, Callable[[bytes, np.random.Generator], tuple[bytes, str]]] = {
    "bitflip": bitflip,
    "truncate": truncate,
    "overwrite": overwrite,
    "interesting": interesting,
    "splice": splice,
}


# -- structured mutations -------------------------------------------------------------------------------------
DICOM_FIELDS: dict[str, list[Any]] = {
    "Rows": [0, 1, 2, 255, 4096, 20000, 65535],
    "Columns": [0, 1, 3, 511, 4096, 20000, 65535],
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 24, 32, 64, 255],
    "BitsStored": [0, 1, 8, 12, 16, 17, 32, 64],
    "HighBit": [0, 7, 11, 15, 31, 63],
    "PixelRepresentation": [0, 1, 2],
    "SamplesPerPixel": [0, 1, 2, 3, 4, 255],
    "NumberOfFrames": ["0", "1", "2", "-1", "1000", "1000000000", "abc", ""],
    "PlanarConfiguration": [0, 1, 2],
    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "", "X"],
    "PixelSpacing": [["0", "0"], ["-1", "1"], ["nan", "1"], ["1e308", "1e308"], ["1"], ["inf", "inf"]],
    "ImagePositionPatient": [["nan", "0", "0"], ["1e308", "-1e308", "0"], ["0", "0"], ["inf", "0", "0"]],
    "ImageOrientationPatient": [["0"] * 6, ["1", "0", "0", "1", "0", "0"], ["nan"] * 6, ["1", "0", "0"]],
    "RescaleSlope": ["0", "-1", "nan", "inf", "1e308", "abc"],
    "RescaleIntercept": ["nan", "1e308", "-1e308", "0.5", "abc"],
    "WindowCenter": ["nan", "0", "1e308", "abc"],
    "WindowWidth": ["nan", "0", "-1", "1e308"],
    "SliceThickness": ["0", "-5", "nan", "abc"],
    "Modality": ["SEG", "RTSTRUCT", "", "XX"],
    "SeriesInstanceUID": ["", "1.2"],
}
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # implicit little
    "1.2.840.10008.1.2.1",  # explicit little
    "1.2.840.10008.1.2.2",  # explicit big (retired)
    "1.2.840.10008.1.2.1.99",  # deflated
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.5",  # RLE
    "1.2.3.4.5",  # unknown
]


def _set_raw(ds: Any, keyword: str, value: Any) -> None:
    """Store ``value`` as the element's raw bytes, so malformed numbers ("abc", "nan") reach the reader as is."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = pydicom.tag.Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag)
    if isinstance(value, int) and vr == "US":
        data = int(value).to_bytes(2, "little")
    else:
        text = "\\".join(value) if isinstance(value, list) else str(value)
        data = text.encode("latin-1")
        data += b"\x00" if vr == "UI" and len(data) % 2 else b" " if len(data) % 2 else b""
    implicit = bool(getattr(ds, "original_encoding", (False, True))[0])
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, implicit, True)


def dicom_field(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Change 1-3 pixel-description or geometry fields (or the transfer syntax, or the pixel data) with pydicom."""
    import pydicom
    from pydicom import config

    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    notes = []
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.random()
        if kind < 0.12:
            uid = str(rng.choice(TRANSFER_SYNTAXES))
            ds.file_meta.TransferSyntaxUID = uid
            notes.append(f"TransferSyntaxUID={uid}")
        elif kind < 0.22 and "PixelData" in ds:
            data = ds.PixelData
            cut = int(rng.integers(0, max(1, len(data))))
            if rng.random() < 0.3:
                del ds.PixelData
                notes.append("PixelData deleted")
            else:
                ds.PixelData = data[:cut]
                notes.append(f"PixelData cut to {cut}")
        else:
            key = str(rng.choice(list(DICOM_FIELDS)))
            choices = DICOM_FIELDS[key]
            value = choices[int(rng.integers(0, len(choices)))]
            _set_raw(ds, key, value)
            notes.append(f"{key}={value!r}")
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    finally:
        config.settings.writing_validation_mode = old
    return buf.getvalue(), "dicom " + ", ".join(notes)


NIFTI_FIELDS: dict[str, list[Any]] = {
    "dim0": [0, 1, 2, 3, 4, 5, 7, 8, 9, -1, 255],
    "dim": [0, -1, 1, 2, 32767, 10000, -32768],
    "datatype": [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 9999],
    "bitpix": [0, 8, 16, 64, 255],
    "vox_offset": [0.0, 1.0, 351.0, 352.0, 353.0, 1e9, -1.0, float("nan")],
    "pixdim": [0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30],
    "scl_slope": [0.0, float("nan"), float("inf"), -1.0, 1e30],
    "scl_inter": [float("nan"), float("inf"), 1e30],
    "qform_code": [0, 1, 2, 3, 4, 5, -1, 255],
    "sform_code": [0, 1, 2, 3, 4, 5, -1, 255],
    "quatern_b": [float("nan"), 2.0, -2.0, 1.0],
    "quatern_d": [float("nan"), 2.0, 1.0],
    "srow_x": [float("nan"), float("inf"), 0.0, 1e30],
    "srow_z": [float("nan"), 0.0, -1e30],
    "magic": [b"n+1\x00", b"ni1\x00", b"n+2\x00", b"xxxx"],
    "sizeof_hdr": [0, 348, 540, 1000000],
    "intent_code": [0, 1001, 2001, 32767],
}


def nifti_header(raw: bytes) -> tuple[np.ndarray, str]:
    """The 348-byte NIfTI-1 header of an uncompressed image as a writable structured array, and its byte order."""
    from nibabel.nifti1 import header_dtype

    order = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    hdr = np.frombuffer(raw[:348], dtype=header_dtype.newbyteorder(order)).copy()
    return hdr, order


def set_nifti_fields(raw: bytes, fields: dict[str, Any]) -> bytes:
    """``raw`` (uncompressed NIfTI-1) with header fields replaced (``dim`` takes a full 8-vector)."""
    hdr, _ = nifti_header(raw)
    for key, value in fields.items():
        hdr[key] = value
    return hdr.tobytes() + raw[348:]


def nifti_field(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Change 1-3 NIfTI header fields in the struct (uncompressed bytes)."""
    hdr, _ = nifti_header(raw)
    notes = []
    for _ in range(int(rng.integers(1, 4))):
        key = str(rng.choice(list(NIFTI_FIELDS)))
        choices = NIFTI_FIELDS[key]
        value = choices[int(rng.integers(0, len(choices)))]
        if key == "dim0":
            hdr["dim"][0][0] = value
        elif key in ("dim", "pixdim"):
            i = int(rng.integers(1, 5))
            hdr[key][0][i] = value
            key = f"{key}[{i}]"
        elif key.startswith("srow"):
            i = int(rng.integers(0, 4))
            hdr[key][0][i] = value
            key = f"{key}[{i}]"
        else:
            hdr[key] = value
        notes.append(f"{key}={value!r}")
    return hdr.tobytes() + raw[348:], "nifti " + ", ".join(notes)


def png_chunks(raw: bytes) -> list[list[Any]]:
    """``[[type, data], ...]`` of a PNG (after the 8-byte signature)."""
    chunks, i = [], 8
    while i + 8 <= len(raw):
        (n,) = struct.unpack(">I", raw[i : i + 4])
        kind = raw[i + 4 : i + 8]
        chunks.append([kind, raw[i + 8 : i + 8 + n]])
        i += 12 + n
    return chunks


def png_bytes(chunks: list[list[Any]], lengths: dict[int, int] | None = None) -> bytes:
    """A PNG from chunks, with correct CRCs (``lengths`` overrides the stored length of chunk ``i``)."""
    out = [b"\x89PNG\r\n\x1a\n"]
    for i, (kind, data) in enumerate(chunks):
        n = (lengths or {}).get(i, len(data))
        out.append(struct.pack(">I", n) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))
    return b"".join(out)


def png_field(raw: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Change IHDR fields, a chunk length, or the IDAT stream, with CRCs fixed so the decoder sees the change."""
    chunks = png_chunks(raw)
    kind = rng.random()
    ihdr = bytearray(chunks[0][1])
    if kind < 0.45:
        w, h, depth, color, comp, filt, lace = struct.unpack(">IIBBBBB", bytes(ihdr))
        field = str(rng.choice(["width", "height", "size", "depth", "color", "interlace", "comp"]))
        big = [0, 1, 2, 65536, 10**6, 2**31 - 1]
        if field == "width":
            w = int(rng.choice(big))
        elif field == "height":
            h = int(rng.choice(big))
        elif field == "size":
            w = h = int(rng.choice(big))
        elif field == "depth":
            depth = int(rng.choice([0, 1, 2, 3, 4, 8, 16, 255]))
        elif field == "color":
            color = int(rng.choice([0, 1, 2, 3, 4, 6, 7]))
        elif field == "interlace":
            lace = int(rng.choice([0, 1, 2]))
        else:
            comp, filt = int(rng.choice([0, 1])), int(rng.choice([0, 1]))
        chunks[0][1] = struct.pack(">IIBBBBB", w, h, depth, color, comp, filt, lace)
        return png_bytes(chunks), f"png IHDR {field}: {w}x{h} depth {depth} color {color} interlace {lace}"
    idats = [i for i, c in enumerate(chunks) if c[0] == b"IDAT"]
    if kind < 0.6:
        i = int(rng.integers(0, len(chunks)))
        n = int(rng.choice([0, 1, 2**31 - 1, 0xFFFFFFFF, len(chunks[i][1]) + 1]))
        return png_bytes(chunks, {i: n}), f"png length of chunk {i} ({chunks[i][0]!r}) = {n}"
    if kind < 0.8 and idats:
        i = idats[int(rng.integers(0, len(idats)))]
        data, note = BYTE_MUTATORS[str(rng.choice(list(BYTE_MUTATORS)))](chunks[i][1], rng)
        chunks[i][1] = data
        return png_bytes(chunks), f"png IDAT {i}: {note}"
    if kind < 0.9:
        chunks = [c for c in chunks if c[0] != b"IDAT"] if rng.random() < 0.5 else chunks[:-1]
        return png_bytes(chunks), "png without IDAT or IEND"
    bomb = zlib.compress(b"\x00" * 20_000_000, 9)  # decompresses to 20 MB: more rows than IHDR promises
    chunks = [chunks[0], [b"IDAT", bomb], [b"IEND", b""]]
    return png_bytes(chunks), "png IDAT replaced by a 20 MB zlib bomb"


def is_nifti(seed: str) -> bool:
    return seed.startswith("nifti")


def mutate(seed: str, raw: bytes, mutator: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """Apply ``mutator`` (a byte mutator, ``"field"`` or ``"inner"``) to the seed's bytes.

    ``"field"``: the format's structured mutation. ``"inner"``: for ``.nii.gz``, a byte mutation of the
    decompressed stream, recompressed (so it reaches the NIfTI parser, not only gzip); for PNG, a byte mutation
    inside the IDAT stream with CRCs fixed; otherwise the same as a byte mutation.
    """
    gz = SUFFIX[seed] == ".nii.gz"
    if mutator == "field":
        if seed.startswith("dicom"):
            return dicom_field(raw, rng)
        if seed == "png":
            return png_field(raw, rng)
        inner = gzip.decompress(raw) if gz else raw
        out, note = nifti_field(inner, rng)
        return (gzip.compress(out, 1) if gz else out), note
    if mutator == "inner" and gz:
        byte = str(rng.choice(list(BYTE_MUTATORS)))
        out, note = BYTE_MUTATORS[byte](gzip.decompress(raw), rng)
        return gzip.compress(out, 1), f"inner {note}"
    if mutator == "inner" and seed == "png":
        return png_field(raw, rng)
    if mutator == "inner":
        mutator = "bitflip"
    return BYTE_MUTATORS[mutator](raw, rng)


MUTATORS = (*BYTE_MUTATORS, "field", "field", "inner")
"""The mutator names, structured ones weighted double."""


def make_input(seeds: dict[str, bytes], seed: str, mutator: str, salt: int, folder: Path) -> tuple[Path, str]:
    """Write one mutated file into ``folder``; return its path and a description of the mutation."""
    rng = np.random.default_rng(salt)
    try:
        data, note = mutate(seed, seeds[seed], mutator, rng)
    except Exception as err:  # a structured mutation the library itself cannot write: fall back to bytes
        data, note = bitflip(seeds[seed], rng)
        note = f"{note} (structured mutation failed: {type(err).__name__})"
    path = folder / f"{seed}-{mutator}-{salt}{SUFFIX[seed]}"
    path.write_bytes(data)
    return path, f"{seed} {mutator} salt={salt}: {note}"


# -- tiny files claiming 10^12 voxels ---------------------------------------------------------------------------
def huge_claims(data_dir: Path, folder: Path) -> dict[str, Path]:
    """A DICOM, a ``.nii``, a ``.nii.gz`` and a PNG, each ~1 KB or less, each claiming 10^12 voxels; and a
    ``.nii.gz`` of 88 bytes claiming 1.07e9 voxels (2 GB), just under the voxel limit."""
    import pydicom

    seeds = seed_bytes(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    ds = pydicom.dcmread(io.BytesIO(seeds["dicom_mr"]))
    keep = {
        "SOPClassUID",
        "Modality",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PixelSpacing",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SeriesInstanceUID",
        "PixelData",
    }
    for elem in list(ds):
        if elem.keyword not in keep:
            del ds[elem.tag]
    ds.Rows, ds.Columns, ds.NumberOfFrames = 50000, 50000, "400"  # 10^12 voxels
    ds.PixelData = b"\x00" * 16
    path = folder / "claims_1e12.dcm"
    ds.save_as(path, enforce_file_format=False)
    out["dicom"] = path
    nii = set_nifti_fields(
        seeds["nifti_raw"][:352] + b"\x00" * 16, {"dim": [3, 10000, 10000, 10000, 1, 1, 1, 1]}
    )
    (folder / "claims_1e12.nii").write_bytes(nii)
    (folder / "claims_1e12.nii.gz").write_bytes(gzip.compress(nii))
    out["nifti"], out["nifti_gz"] = folder / "claims_1e12.nii", folder / "claims_1e12.nii.gz"
    # under the voxel limit (32767^2 = 1.07e9 int16 voxels, 2 GB) but far more than 88 gzip bytes can inflate to
    under = set_nifti_fields(nii, {"dim": [3, 32767, 32767, 1, 1, 1, 1, 1], "datatype": 4, "bitpix": 16})
    (folder / "claims_1e9.nii.gz").write_bytes(gzip.compress(under))
    out["nifti_gz_under_limit"] = folder / "claims_1e9.nii.gz"
    chunks = png_chunks(seeds["png"])
    ihdr = struct.pack(">IIBBBBB", 10**6, 10**6, 8, 0, 0, 0, 0)  # 10^12 gray pixels
    png = png_bytes([[b"IHDR", ihdr], [b"IDAT", zlib.compress(b"\x00" * 4096)], [b"IEND", b""]])
    assert chunks[0][0] == b"IHDR"
    (folder / "claims_1e12.png").write_bytes(png)
    out["png"] = folder / "claims_1e12.png"
    return out


# -- the watched worker --------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def layer_problem(layers: list[tuple]) -> str | None:
    """What would stop napari from showing these layers on a sane grid (``None`` when nothing)."""
    if not layers:
        return "no layers"
    for data, kwargs, kind in layers:
        if not isinstance(data, np.ndarray) or data.size == 0 or not 2 <= data.ndim <= 4:
            return f"{kind} data of shape {np.shape(data)}"
        scale = np.asarray(kwargs.get("scale", ()), float)
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            return f"scale {scale.tolist()}"
        if not np.all(np.isfinite(np.asarray(kwargs.get("translate", ()), float))):
            return f"translate {kwargs.get('translate')}"
        affine = np.asarray(kwargs.get("metadata", {}).get("affine", np.eye(4)), float)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            return f"affine {affine.tolist()}"
        limits = kwargs.get("contrast_limits")
        if limits is not None and not (np.all(np.isfinite(limits)) and limits[0] <= limits[1]):
            return f"contrast_limits {limits}"
    return None


def worker_main() -> None:
    """The worker loop: one JSON request per stdin line, one JSON answer per stdout line."""
    import resource
    import tracemalloc
    import warnings

    limit = int(os.environ.get("MEDSSL_FUZZ_AS_LIMIT", str(4 << 30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    from napari_medssl._reader import read_layers

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing a library prints may corrupt the protocol
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        trace = bool(req.get("trace"))
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        base = _status_kb("VmRSS")
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        answer: dict[str, Any] = {}
        try:
            layers = read_layers(req["path"])
            problem = layer_problem(layers)
            answer = {"outcome": "bad_output", "message": problem} if problem else {"outcome": "ok"}
            answer["shapes"] = [list(np.shape(lay[0])) for lay in layers]
            del layers
        except BaseException as err:  # classify everything; the parent decides what is acceptable
            kind = type(err).__name__
            answer = {
                "outcome": "refused" if kind in DOCUMENTED else "unexpected",
                "exc": kind,
                "message": str(err)[:500],
            }
        answer["seconds"] = time.perf_counter() - t0
        if trace:
            answer["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        answer["peak_mb"] = max(0, _status_kb("VmHWM") - base) / 1024
        out.write(json.dumps(answer) + "\n")
        out.flush()


class ReaderWorker:
    """A reader process fed one path at a time, killed and restarted when a read hangs or the process dies.

    Args:
        timeout: seconds one read may take before it counts as a hang.
        as_limit: the worker's address-space limit in bytes.
        restart_every: start a fresh worker after this many reads (keeps measurements independent of history).
    """

    def __init__(self, timeout: float = 5.0, as_limit: int = 4 << 30, restart_every: int = 200) -> None:
        self.timeout, self.as_limit, self.restart_every = timeout, as_limit, restart_every
        self.proc: subprocess.Popen | None = None
        self.reads = 0
        self.restarts = 0

    def _start(self) -> None:
        env = {
            **os.environ,
            "MEDSSL_FUZZ_AS_LIMIT": str(self.as_limit),
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from napari_medssl.testing import fuzz; fuzz.worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.reads = 0
        line = self._readline(120.0)
        if line is None or not json.loads(line).get("ready"):
            self.close()
            raise RuntimeError("the fuzz worker did not start")

    def _readline(self, timeout: float) -> str | None:
        assert self.proc is not None and self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return None
            line = self.proc.stdout.readline()
            return line or None
        finally:
            sel.close()

    def read(self, path: Path, trace: bool = False) -> dict[str, Any]:
        """Read ``path`` in the worker; the answer's ``outcome`` is ok/refused/unexpected/crash/hang."""
        if self.proc is None or self.proc.poll() is not None or self.reads >= self.restart_every:
            self.close()
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.reads += 1
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({"path": str(path), "trace": trace}) + "\n")
        self.proc.stdin.flush()
        line = self._readline(self.timeout)
        if line is not None:
            return json.loads(line)
        if self.proc.poll() is None:  # still running: a hang
            self.close()
            self.restarts += 1
            return {"outcome": "hang", "seconds": time.perf_counter() - t0}
        code = self.proc.returncode
        self.close()
        self.restarts += 1
        return {"outcome": "crash", "exitcode": code, "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        """End the worker (SIGKILL when it does not leave on closing its input)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            try:
                proc.stdin.close()  # type: ignore[union-attr]
                proc.wait(1.0)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]
            except OSError:
                pass


def acceptable(answer: dict[str, Any], max_peak_mb: float) -> bool:
    """A documented outcome within the memory bound."""
    return answer["outcome"] in ("ok", "refused") and answer.get("peak_mb", 0.0) <= max_peak_mb


def keep_failure(path: Path, answer: dict[str, Any], note: str, folder: Path) -> Path:
    """Copy a failing input and its description into ``folder`` (for the report and for reproducing it)."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / path.name
    shutil.copy(path, dest)
    dest.with_name(dest.name + ".json").write_text(json.dumps({"mutation": note, **answer}, indent=1))
    return dest
