"""NIfTI reading (axes, affine, labels) and the labels writer's round trip, on real volumes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medssl._reader import get_reader
from napari_medssl._writer import write_labels_image, write_labels_nifti
from napari_medssl.io import (
    MedicalImageWriteError,
    grid_metadata,
    read,
    read_dicom,
    read_nifti,
    write_labels,
    write_nifti,
)

CASE = "hippocampus/{}/hippocampus_001.nii.gz"


def test_nifti_axes_affine_and_header(data_dir: Path) -> None:
    path = data_dir / "nifti/example_ct.nii.gz"
    img = nib.load(path)
    vol = read_nifti(path)
    raw = np.asanyarray(img.dataobj)
    assert vol.data.shape == raw.shape[::-1]
    np.testing.assert_array_equal(vol.data, raw.transpose(2, 1, 0))
    # napari index (z, y, x) is file index (i, j, k) = (x, y, z)
    z, y, x = 17, 40, 61
    np.testing.assert_allclose(vol.affine @ [z, y, x, 1], img.affine @ [x, y, z, 1])
    assert vol.spacing == pytest.approx(tuple(img.header.get_zooms()[::-1]))
    assert vol.metadata["nifti_affine"] == img.affine.tolist()
    assert vol.metadata["header"]["dim"][:4] == [3, *raw.shape]
    assert vol.modality == "CT" and vol.metadata["modality_guessed"]
    assert vol.metadata["window"]["name"] == "soft_tissue"


def test_hippocampus_labels_are_labels_and_image_is_mr(data_dir: Path) -> None:
    image, labels = read([data_dir / CASE.format("imagesTr"), data_dir / CASE.format("labelsTr")])
    assert not image.is_label and image.modality == "MR" and image.metadata["window"]["name"] == "percentile"
    assert labels.is_label and labels.metadata["label_values"] == [0, 1, 2]
    np.testing.assert_array_equal(labels.affine, image.affine)


def test_hippocampus_labels_round_trip_through_the_writer(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / CASE.format("labelsTr")
    labels = read_nifti(src)
    (out,) = write_labels(tmp_path / "roundtrip.nii.gz", labels.data, labels.metadata)
    back = read_nifti(out)
    np.testing.assert_array_equal(back.data, labels.data)
    np.testing.assert_array_equal(back.affine, labels.affine)
    written, original = nib.load(out), nib.load(src)
    np.testing.assert_array_equal(written.affine, original.affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(original.dataobj))
    assert written.header.get_data_dtype() == np.uint8


def test_labels_painted_on_an_image_are_written_on_its_grid_by_the_npe2_writer(
    data_dir: Path, tmp_path: Path
) -> None:
    """What a user does: open the image, paint labels (they carry the image's grid), save via napari's writer."""
    image_path = data_dir / CASE.format("imagesTr")
    ((data, kwargs, layer_type),) = get_reader(str(image_path))(str(image_path))
    assert layer_type == "image"
    painted = np.zeros(data.shape, np.uint8)
    painted[10:20, 20:30, 5:15] = 3
    attributes = {
        "metadata": grid_metadata(kwargs["metadata"]),
        "scale": kwargs["scale"],
        "translate": kwargs["translate"],
    }
    (out,) = write_labels_nifti(str(tmp_path / "painted"), painted, attributes)
    assert out.endswith("painted.nii.gz")
    np.testing.assert_array_equal(nib.load(out).affine, nib.load(image_path).affine)
    np.testing.assert_array_equal(read_nifti(out).data, painted)


def test_dicom_labels_written_as_nifti_keep_the_dicom_geometry(data_dir: Path, tmp_path: Path) -> None:
    (mask,) = read_dicom(
        data_dir / "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993/5364-MaskTumor-94345"
    )
    (out,) = write_labels(tmp_path / "mask.nii.gz", mask.data, mask.metadata)
    back = read_nifti(out)
    np.testing.assert_array_equal(back.data, mask.data)
    np.testing.assert_allclose(back.affine, mask.affine, atol=1e-4)  # float32 in the NIfTI header


def test_writer_without_grid_metadata_uses_scale_and_translate(tmp_path: Path) -> None:
    labels = np.zeros((4, 5, 6), np.int64)
    labels[1, 2, 3] = 7
    (out,) = write_labels(
        tmp_path / "plain.nii", labels, None, scale=(2.0, 1.5, 1.0), translate=(10.0, 20.0, 30.0)
    )
    back = read_nifti(out)
    np.testing.assert_array_equal(back.data, labels)
    np.testing.assert_allclose(back.affine, [[2, 0, 0, 10], [0, 1.5, 0, 20], [0, 0, 1, 30], [0, 0, 0, 1]])


def test_writer_refuses_bad_requests(data_dir: Path, tmp_path: Path) -> None:
    labels = read_nifti(data_dir / CASE.format("labelsTr"))
    with pytest.raises(MedicalImageWriteError, match="grid .* has shape"):
        write_labels(tmp_path / "x.nii.gz", labels.data[:-1], labels.metadata)
    with pytest.raises(MedicalImageWriteError, match=r"\.nii or \.nii\.gz"):
        write_nifti(tmp_path / "x.nrrd", labels.data)
    with pytest.raises(MedicalImageWriteError, match="2D or 3D"):
        write_nifti(tmp_path / "x.nii", np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(MedicalImageWriteError, match="are written as"):
        write_labels(tmp_path / "x.mha", labels.data)
    with pytest.raises(MedicalImageWriteError, match="2D array"):
        write_labels_image(str(tmp_path / "x.png"), labels.data, {})
