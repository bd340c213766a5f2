"""npe2 sample data: the catalogue's samples as napari layers (thin adapter over ``io.samples``)."""

from __future__ import annotations

from napari_medssl.io import layer_data, load_sample


def _layers(key: str) -> list[tuple]:
    return [layer_data(v) for v in load_sample(key)]


def ct_dicom() -> list[tuple]:
    """CT DICOM JPEG 2000 series (TotalSegmentator); fallback pydicom's CT_small.dcm."""
    return _layers("ct_dicom")


def mr_glioblastoma() -> list[tuple]:
    """Brain MR T1post + tumour mask (TCIA PGBM-001); fallback pydicom's MR_small.dcm."""
    return _layers("mr_glioblastoma")


def hippocampus() -> list[tuple]:
    """Hippocampus MRI + labels (MSD Task04); fallback nibabel's anatomical.nii."""
    return _layers("hippocampus")


def ct_nifti() -> list[tuple]:
    """CT volume in NIfTI (TotalSegmentator); fallback pydicom's CT_small.dcm."""
    return _layers("ct_nifti")


def mammogram() -> list[tuple]:
    """A mini-MIAS mammogram (local copy only: the archive has no published checksum)."""
    return _layers("mammogram")
