"""DICOM SEG in and out (highdicom): labels on a DICOM series' grid ↔ a Segmentation object.

Writing (:func:`build_seg`, :func:`write_seg`): a ``(Z, Y, X)`` label map on the grid of a single-frame
source series (the files in z order, as ``Volume.metadata["files"]`` lists them) becomes one SEG that
references the source study, series and instances, with its frames on the source slices (empty slices
omitted), one segment per class (name, SNOMED CT coded category and type: see :func:`segment_code`), and the
provenance of the prediction (:func:`provenance_fields`). The SEG is a LABELMAP SEG when the installed
highdicom supports that type, a BINARY SEG otherwise (or when asked).

Reading (:func:`read_seg`): a SEG becomes a labels :class:`~napari_medssl.io.volume.Volume` on its
referenced series' grid (voxel value = segment number), the series being found among volumes already read,
a given file/folder, the SEG's own folder and its sub-folders, or its sibling folders.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from .volume import MedicalImageReadError, MedicalImageWriteError, Volume

SEG_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
)
GENERIC_CODE = ("SCT", "85756007", "Tissue")
"""Category and type of a segment whose class has no code on the model card."""
SEARCH_LIMIT = 20_000
"""Files whose headers are scanned at most when looking for a SEG's source series."""


def labelmap_supported() -> bool:
    """Whether the installed highdicom writes LABELMAP SEG (Label Map Segmentation Storage, highdicom ≥ 0.24)."""
    import highdicom as hd

    return hasattr(hd.seg.SegmentationTypeValues, "LABELMAP")


def is_seg(ds: pydicom.Dataset) -> bool:
    """Whether a dataset is a DICOM Segmentation (binary, fractional or label map)."""
    return str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES


def segment_code(spec: Any) -> Any:
    """A coded concept from a card entry: a pydicom SNOMED CT keyword (``"Hippocampus"``) or
    ``[scheme, value, meaning]`` (``["SCT", "5366008", "Hippocampus"]``); ``None`` gives the generic code.

    Raises:
        ValueError: An unknown keyword or a malformed triple.
    """
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if spec is None:
        return Code(GENERIC_CODE[1], GENERIC_CODE[0], GENERIC_CODE[2])
    if isinstance(spec, str):
        try:
            return getattr(codes.SCT, spec)
        except AttributeError:
            raise ValueError(
                f"segment code {spec!r} is not a SNOMED CT keyword pydicom knows (e.g. 'Hippocampus', "
                "'Neoplasm', 'Tissue'); give [scheme, value, meaning] instead"
            ) from None
    if isinstance(spec, list | tuple) and len(spec) == 3 and all(isinstance(s, str | int) for s in spec):
        scheme, value, meaning = (str(s) for s in spec)
        return Code(value, scheme, meaning)
    raise ValueError(f"segment code {spec!r}: expected a SNOMED CT keyword or [scheme, value, meaning]")


def _segment_descriptions(
    n_segments: int,
    class_names: Sequence[str] | None,
    segment_codes: dict[str, Any] | None,
    provenance: dict[str, Any] | None,
) -> list[Any]:
    """One highdicom ``SegmentDescription`` per label value 1..n (names and codes from the model card)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    names = list(class_names or [])
    segment_codes = segment_codes or {}
    algorithm, kind = None, hd.seg.SegmentAlgorithmTypeValues.MANUAL
    if provenance and provenance.get("model"):
        kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        params = {k: str(v) for k, v in provenance.items() if v not in (None, "") and k != "model"}
        algorithm = hd.AlgorithmIdentificationSequence(
            name=str(provenance["model"])[:64],
            family=codes.DCM.ArtificialIntelligence,
            version=str(provenance.get("package_version", ""))[:64] or "unknown",
            source="napari-medssl",
            parameters=params,
        )
    out = []
    for number in range(1, n_segments + 1):
        label = names[number] if number < len(names) else f"label {number}"
        entry = segment_codes.get(label) or {}
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(label)[:64],
                segmented_property_category=segment_code(entry.get("category")),
                segmented_property_type=segment_code(entry.get("type")),
                algorithm_type=kind,
                algorithm_identification=algorithm,
            )
        )
    return out


def _source_datasets(files: Sequence[str | os.PathLike], shape: tuple[int, ...]) -> list[pydicom.Dataset]:
    """The source series' headers in z order, checked against the label array's shape."""
    if not files:
        raise MedicalImageWriteError(
            "DICOM SEG needs the source DICOM series (the image's files); these labels are not on a DICOM "
            "series opened by napari-medssl"
        )
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except FileNotFoundError:
            raise MedicalImageWriteError(f"DICOM SEG: the source file {f} no longer exists") from None
        except Exception as err:
            raise MedicalImageWriteError(f"DICOM SEG: cannot read the source file {f} ({err})") from None
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise MedicalImageWriteError(
                f"DICOM SEG: {f} is a multi-frame image; SEG export supports series of single-frame images"
            )
        if is_seg(ds):
            raise MedicalImageWriteError(f"DICOM SEG: {f} is itself a SEG, not an image series")
        datasets.append(ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) != 1:
        raise MedicalImageWriteError(f"DICOM SEG: the source files belong to {len(series)} series, not one")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if len(datasets) != shape[0] or (rows, cols) != tuple(shape[1:]):
        raise MedicalImageWriteError(
            f"DICOM SEG: labels of shape {tuple(shape)} do not fit the source series "
            f"({len(datasets)} slices of {rows}x{cols}); paint the labels on the series' own grid"
        )
    return datasets


def provenance_fields(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The SEG attributes that record who made it (see the io README, "DICOM SEG provenance")."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from napari_medssl import __version__

    p = dict(provenance or {})
    model = str(p.get("model") or "")
    sha = str(p.get("weights_sha256") or "")
    version = str(p.get("package_version") or __version__)
    source_uid = str(p.get("source_series_uid") or "")
    what = f"model {model} (weights sha256 {sha or 'unknown'})" if model else "labels (no model)"
    equipment = hd.ContributingEquipment(
        manufacturer="napari-medssl",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=(model or "manual labels")[:64],
        software_versions=version[:64],
        contribution_description=f"napari-medssl {version}: {what}; source series {source_uid}"[:1024],
    )
    return {
        "series_description": (f"medssl {model}" if model else "medssl labels")[:64],
        "content_creator_name": f"napari-medssl^{model or 'labels'}"[:64],
        "content_description": (f"{model} sha256:{sha[:16]}" if model else "labels painted in napari")[:64],
        "content_label": "MEDSSL",
        "manufacturer": "napari-medssl",
        "manufacturer_model_name": (model or "manual labels")[:64],
        "software_versions": version[:64],
        "device_serial_number": sha[:64] or "none",
        "contributing_equipment": [equipment],
    }


def build_seg(
    labels: np.ndarray,
    source_files: Sequence[str | os.PathLike],
    *,
    class_names: Sequence[str] | None = None,
    segment_codes: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    kind: str = "auto",
) -> pydicom.Dataset:
    """A SEG dataset (in memory, with a preamble so it can be stored or sent) for labels on a series.

    Args:
        labels: ``(Z, Y, X)`` (or ``(Y, X)`` for one slice) non-negative integer labels on the source grid.
        source_files: The source series' single-frame files, in the labels' z order.
        class_names: Name of each label value (index 0 = background); ``label N`` where missing.
        segment_codes: ``{class name: {"category": code, "type": code}}`` (see :func:`segment_code`).
        provenance: ``{"model", "weights_sha256", "package_version", "source_series_uid", ...}``; without a
            model the segments are MANUAL.
        kind: ``"labelmap"``, ``"binary"`` or ``"auto"`` (LABELMAP when supported).

    Raises:
        MedicalImageWriteError: Labels that are not integers ≥ 0 below 65536, or that do not fit the source.
    """
    import highdicom as hd

    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.ndim != 3 or labels.size == 0:
        raise MedicalImageWriteError(f"DICOM SEG: labels must be 2D or 3D, got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool) or labels.min() < 0:
        raise MedicalImageWriteError("DICOM SEG: labels must be non-negative integers")
    top = int(labels.max())
    if top > 65535:
        raise MedicalImageWriteError(f"DICOM SEG: label value {top} is above 65535")
    if kind not in ("auto", "labelmap", "binary"):
        raise ValueError(f"kind must be 'auto', 'labelmap' or 'binary', got {kind!r}")
    if kind == "labelmap" and not labelmap_supported():
        raise MedicalImageWriteError("DICOM SEG: this highdicom/pydicom cannot write LABELMAP SEG")
    labelmap = kind == "labelmap" or (kind == "auto" and labelmap_supported())
    datasets = _source_datasets(source_files, labels.shape)
    n_segments = max(top, len(class_names or []) - 1, 1)
    pixels = labels.astype(np.uint8 if n_segments < 256 else np.uint16)
    descriptions = _segment_descriptions(n_segments, class_names, segment_codes, provenance)
    fields = provenance_fields(provenance)
    with warnings.catch_warnings():
        # source headers often hold one-component patient names (TCIA: "PGBM-001"); highdicom warns on copy
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=pixels,
            segmentation_type="LABELMAP" if labelmap else "BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            omit_empty_frames=bool(pixels.any()),
            **fields,
        )
    seg.preamble = b"\0" * 128  # a dataset built in memory has none; a stored copy would not read back
    return seg


def write_seg(
    path: str | os.PathLike, labels: np.ndarray, source_files: Sequence[str | os.PathLike], **kw: Any
) -> Path:
    """Write :func:`build_seg`'s SEG to ``path`` (atomically: a failure leaves no partial file).

    Returns:
        The written path.
    """
    from napari_medssl._atomic import atomic_write

    seg = build_seg(labels, source_files, **kw)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: seg.save_as(tmp, enforce_file_format=True))
    return path


# -- reading ----------------------------------------------------------------------------------------------------
def referenced_series_uid(ds: pydicom.Dataset) -> str:
    """The SeriesInstanceUID a SEG was drawn on (its first referenced series)."""
    refs = ds.get("ReferencedSeriesSequence") or []
    return str(refs[0].get("SeriesInstanceUID", "")) if len(refs) else ""


def _uid_of(path: Path) -> tuple[str, str] | None:
    """``(SeriesInstanceUID, SOPClassUID)`` of a DICOM file from its header, or ``None`` when it is not one."""
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPClassUID"]
        )
    except Exception:
        return None
    return str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPClassUID", ""))


def _candidate_dirs(seg_path: Path) -> Iterable[Path]:
    """The SEG's folder, its sub-folders, then its sibling folders (each once)."""
    here = seg_path.parent
    yield here
    yield from sorted(d for d in here.iterdir() if d.is_dir() and not d.name.startswith("."))
    if here.parent != here:
        yield from sorted(
            d for d in here.parent.iterdir() if d.is_dir() and d != here and not d.name.startswith(".")
        )


def find_series_files(
    seg_path: str | os.PathLike, series_uid: str, where: Iterable[Path] | None = None
) -> list[Path]:
    """Files of series ``series_uid`` near a SEG: in ``where``, else :func:`_candidate_dirs` (first hit wins).

    A folder's files are scanned header-only until one belongs to the series; then only that folder's
    matching files are returned.
    """
    scanned = 0
    for folder in where if where is not None else _candidate_dirs(Path(seg_path)):
        folder = Path(folder)
        files = (
            [folder]
            if folder.is_file()
            else sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        )
        matched = []
        for p in files:
            if scanned >= SEARCH_LIMIT:
                return []
            scanned += 1
            uid = _uid_of(p)
            if uid is not None and uid[0] == series_uid and uid[1] not in SEG_SOP_CLASSES:
                matched.append(p)
        if matched:
            return matched
    return []


def _source_volume(path: Path, series_uid: str, source: Any) -> Volume:
    """The referenced series as a volume, from ``source`` (volumes or paths) or the folders near the SEG."""
    from .dicom import read_dicom

    items = [source] if isinstance(source, str | os.PathLike | Volume) else list(source or [])
    for v in items:
        if isinstance(v, Volume) and v.metadata.get("header", {}).get("SeriesInstanceUID") == series_uid:
            if not v.is_label:
                return v
    paths = [Path(p) for p in items if not isinstance(p, Volume)]
    files = find_series_files(path, series_uid, paths or None)
    if not files:
        searched = (
            ", ".join(str(p) for p in paths)
            if paths
            else f"{path.parent}, its sub-folders and sibling folders"
        )
        raise MedicalImageReadError(
            path,
            f"the SEG is drawn on series {series_uid}, which was not found in {searched}; put the SEG beside "
            "its source series folder, or open both together",
        )
    found = [
        v for v in read_dicom(files) if v.metadata.get("header", {}).get("SeriesInstanceUID") == series_uid
    ]
    if len(found) != 1:
        raise MedicalImageReadError(path, f"the referenced series {series_uid} does not read as one volume")
    return found[0]


def seg_provenance(ds: pydicom.Dataset) -> dict[str, Any]:
    """What a SEG records about its making: model, weights sha256, package version, source series UID."""
    out: dict[str, Any] = {}
    for item in ds.get("SegmentSequence") or []:
        for alg in item.get("SegmentationAlgorithmIdentificationSequence") or []:
            out["model"] = str(alg.get("AlgorithmName", ""))
            out["package_version"] = str(alg.get("AlgorithmVersion", ""))
            for pair in str(alg.get("AlgorithmParameters", "")).split(","):
                key, sep, value = pair.partition("=")
                if sep:
                    out[key.strip()] = value.strip()
        if out:
            break
    return out


def read_seg(path: str | os.PathLike, source: Any = None) -> Volume:
    """A DICOM SEG as a labels volume on its referenced series' grid (value = segment number).

    Args:
        path: The SEG file.
        source: Where its source series is: volumes already read, a folder, or files; ``None`` searches the
            SEG's folder, its sub-folders and its sibling folders.

    Raises:
        MedicalImageReadError: Not a SEG, a corrupt SEG, no source series found, or frames that do not
            match the source.
    """
    path = Path(path)
    ds, seg = _open_seg(path)
    series_uid = referenced_series_uid(ds)
    if not series_uid:
        raise MedicalImageReadError(path, "the SEG references no source series (ReferencedSeriesSequence)")
    src = _source_volume(path, series_uid, source)
    files = src.metadata["files"]
    if len(files) != (src.data.shape[0] if src.spatial_ndim == 3 else 1):
        raise MedicalImageReadError(
            path, "the SEG's source series is multi-frame; only single-frame sources are read"
        )
    uids = [
        str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for f in files
    ]
    try:
        data = seg.get_pixels_by_source_instance(
            uids, combine_segments=True, assert_missing_frames_are_empty=True, skip_overlap_checks=True
        )
    except Exception as err:
        raise MedicalImageReadError(
            path, f"the SEG's frames do not fit series {series_uid} ({type(err).__name__}: {err})"
        ) from None
    data = data.reshape(src.data.shape[: src.spatial_ndim])
    data = data.astype(np.uint8 if data.max(initial=0) < 256 else np.uint16)
    metadata = _seg_metadata(path, ds, src, files, series_uid, data)
    name = str(ds.get("SeriesDescription", "") or path.stem)
    return Volume(
        data=data,
        spacing=src.spacing,
        origin=src.origin,
        direction=src.direction,
        modality="SEG",
        window=(0.0, float(max(1, data.max()))),
        name=name,
        is_label=True,
        metadata=metadata,
        affine=src.affine,
    )


def _open_seg(path: Path) -> tuple[Any, Any]:
    """The SEG file's dataset and its highdicom ``Segmentation``; a clear error for anything else."""
    import highdicom as hd

    try:
        ds = pydicom.dcmread(path)
        if not is_seg(ds):
            raise MedicalImageReadError(path, "not a DICOM Segmentation (SEG) object")
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except MedicalImageReadError:
        raise
    except Exception as err:
        raise MedicalImageReadError(path, f"corrupt DICOM SEG ({type(err).__name__}: {err})") from None
    return ds, seg


def _seg_metadata(
    path: Path, ds: Any, src: Volume, files: list, series_uid: str, data: np.ndarray
) -> dict[str, Any]:
    """The labels volume's metadata: the source series' own, the segments, the provenance and the header."""
    segments = [
        {
            "number": int(item.SegmentNumber),
            "label": str(item.get("SegmentLabel", "")),
            "category": str(item.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning),
            "type": str(item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning),
        }
        for item in ds.SegmentSequence
        if int(item.SegmentNumber) > 0  # a LABELMAP SEG may describe its background as segment 0
    ]
    metadata = {
        **{k: v for k, v in src.metadata.items() if k not in ("window_presets", "skipped", "warnings")},
        "format": "dicom-seg",
        "source": str(path),
        "files": [str(path)],
        "reference_files": list(files),
        "reference_series": src.name,
        "reference_series_uid": series_uid,
        "segments": segments,
        "class_names": ["background", *[s["label"] for s in sorted(segments, key=lambda s: s["number"])]],
        "label_values": [int(v) for v in np.unique(data)],
        "provenance": seg_provenance(ds),
        "seg_type": str(ds.get("SegmentationType", "")),
        "window": {"name": "labels", "range": [0.0, float(max(1, data.max()))]},
        "window_presets": {},
        "warnings": [],
    }
    metadata["header"] = {
        **src.metadata.get("header", {}),
        "Modality": "SEG",
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "SeriesDescription": str(ds.get("SeriesDescription", "")),
    }
    return metadata


def seg_inputs(metadata: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """The source files and :func:`build_seg` keywords held by a labels volume's or layer's metadata.

    Source files: ``reference_files`` (labels read from a SEG) or ``files`` of a DICOM series (labels
    painted on, or predicted from, a series opened by this plugin carry them, see ``io.grid_metadata``).
    Class names, segment codes and provenance come from ``metadata["medssl"]`` (the Model dock's
    prediction) or the top level (a SEG read back).

    Raises:
        MedicalImageWriteError: The metadata names no DICOM source series.
    """
    md = metadata or {}
    medssl = md.get("medssl") or {}
    files = md.get("reference_files") or (md.get("files") if md.get("format") == "dicom" else None)
    if not files:
        raise MedicalImageWriteError(
            "DICOM SEG needs labels on a DICOM series opened with napari-medssl (the layer's metadata names no "
            "source DICOM files); save as NIfTI instead, or open the series and paint or predict on it"
        )
    kwargs = {
        "class_names": medssl.get("class_names") or md.get("class_names"),
        "segment_codes": medssl.get("segment_codes") or md.get("segment_codes"),
        "provenance": medssl.get("provenance") or md.get("provenance"),
    }
    return [str(f) for f in files], kwargs
