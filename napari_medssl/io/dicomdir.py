"""DICOMDIR: the index file of a DICOM file-set (a CD, a USB export) → the image files it lists.

A DICOMDIR holds no pixels; its ``DirectoryRecordSequence`` lists patients, studies, series and
instances, each instance record naming its file by ``ReferencedFileID`` (path components relative to the
DICOMDIR's folder). :func:`dicomdir_files` returns those files; :func:`~napari_medssl.io.dicom.read_dicom`
then reads them exactly as it reads a folder: one volume per series, series without pixels skipped and
reported. Opening a DICOMDIR therefore shows *every* series it lists (one napari layer each), as opening
its folder does.

The records are read as a flat list rather than through :class:`pydicom.fileset.FileSet`: the file names
are all the reader needs, and ``FileSet`` refuses file-sets with an incomplete record hierarchy (pydicom's
``DICOMDIR-nopatient``) and stages a temporary directory on each load.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pydicom

from .volume import MedicalImageReadError

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
"""Media Storage Directory Storage: the SOP class of a DICOMDIR."""


def is_dicomdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOMDIR: a DICOM file whose file meta names the Media Storage Directory class.

    Reads only the first 1 KiB (the file meta group holds MediaStorageSOPClassUID).
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        return False
    return head[128:132] == b"DICM" and DICOMDIR_SOP_CLASS.encode() in head


def _resolve(root: Path, components: list[str]) -> Path | None:
    """``root / components``, matching each component case-insensitively when the exact name is absent.

    File-sets are written in upper case (ISO 9660) and are often copied to case-sensitive disks with
    their names lowered. ``None`` when a component is missing or would leave ``root`` (``..``).
    """
    path = root
    for part in components:
        if part in ("", ".", "..") or "/" in part or "\\" in part:
            return None
        exact = path / part
        if exact.exists():
            path = exact
            continue
        try:
            match = next((c for c in path.iterdir() if c.name.lower() == part.lower()), None)
        except OSError:
            return None
        if match is None:
            return None
        path = match
    return path if path.is_file() else None


def dicomdir_files(path: str | os.PathLike) -> tuple[list[Path], list[dict[str, str]]]:
    """The files a DICOMDIR lists, in record order, and the listed files that are missing.

    Returns:
        ``(files, missing)``: existing files (each once), and ``[{"path", "reason"}]`` for records whose
        file is absent or whose name would leave the DICOMDIR's folder.

    Raises:
        MedicalImageReadError: The DICOMDIR cannot be parsed or lists no file at all.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about non-conformant but readable DICOMDIRs
            ds = pydicom.dcmread(path, force=True)
            records = list(ds.get("DirectoryRecordSequence") or [])
            ids = [r.get("ReferencedFileID") for r in records]
    except Exception as err:  # pydicom raises many types on a corrupt file
        raise MedicalImageReadError(path, f"corrupt DICOMDIR ({type(err).__name__}: {err})") from None
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for file_id in ids:
        if not file_id:
            continue
        components = [str(c).strip() for c in ([file_id] if isinstance(file_id, str) else list(file_id))]
        if len(components) == 1 and "\\" in components[0]:
            components = components[0].split("\\")
        found = _resolve(path.parent, components)
        if found is None:
            missing.append(
                {
                    "path": str(path.parent.joinpath(*components)),
                    "reason": "listed in the DICOMDIR but missing",
                }
            )
        elif found not in files:
            files.append(found)
    if not files:
        detail = f"; {len(missing)} listed file(s) are missing" if missing else " (no instance records)"
        raise MedicalImageReadError(path, f"the DICOMDIR lists no file to read{detail}")
    return files, missing
