"""Provenance of a prediction: which model (name, weights sha256), which package version, which source.

One record, :func:`record`, goes everywhere a prediction is written: the sidecar JSON beside a NIfTI/PNG/TIFF
prediction (:func:`write_sidecar`: ``<output>.json``, e.g. ``pred.nii.gz.json``), the DICOM SEG's series
description, content creator and algorithm fields (:mod:`napari_medssl.io.dicom_seg`), and the metadata of a
predicted Labels layer in napari. Keys: ``model``, ``weights_sha256``, ``package``, ``package_version``,
``source``, ``source_series_uid`` (``None`` for a non-DICOM input), ``created`` (UTC, ISO 8601).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SIDECAR_SUFFIX = ".json"
"""A prediction ``X`` gets its provenance in ``X.json`` (``pred.nii.gz`` → ``pred.nii.gz.json``)."""


def model_facts(model: Any) -> dict[str, str | None]:
    """``{"model", "weights_sha256"}`` of a loaded model, from ``model.spec``: the zoo name or checkpoint path
    it was loaded from (the architecture's name for a fresh model) and the sha256 of its weights file."""
    spec = model.spec
    return {"model": str(spec.source or spec.name), "weights_sha256": spec.weights_sha256}


def record(
    model: Any,
    *,
    source: str | os.PathLike | None = None,
    source_series_uid: str | None = None,
) -> dict[str, Any]:
    """The provenance record of one prediction (see the module docstring for its keys)."""
    from napari_medssl import __version__

    return {
        **model_facts(model),
        "package": "napari-medssl",
        "package_version": __version__,
        "source": None if source is None else str(source),
        "source_series_uid": source_series_uid or None,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }


def series_uid(metadata: dict[str, Any] | None) -> str | None:
    """The DICOM SeriesInstanceUID of a volume or layer, from its metadata (``None`` when not DICOM)."""
    header = (metadata or {}).get("header") or {}
    uid = (
        header.get("SeriesInstanceUID")
        if str((metadata or {}).get("format", "")).startswith("dicom")
        else None
    )
    return str(uid) if uid else None


def sidecar_path(output: str | os.PathLike) -> Path:
    """Where the provenance of prediction ``output`` goes: ``<output>.json``."""
    return Path(f"{os.fspath(output)}{SIDECAR_SUFFIX}")


def write_sidecar(output: str | os.PathLike, prov: dict[str, Any]) -> Path:
    """Write ``prov`` as ``<output>.json`` (atomically) and return that path."""
    from napari_medssl._atomic import atomic_write

    path = sidecar_path(output)
    text = json.dumps(prov, indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
