"""Labels written back land on exactly the voxels they were painted on, for every real series in ../shared/data.

For each DICOM series (all TCIA series, the JPEG 2000 CT), each NIfTI file and a sample of hippocampus volumes:
a label map with a position-coded value in every voxel is written the way the viewer writes it (the npe2
writer with the grid metadata the Labels layer carries) and the way ``medssl predict`` writes it, then checked

- by our reader: same array, same affine;
- independently of our code: the written file opened with nibabel puts label voxel ``(z, y, x)`` at the world
  position of DICOM pixel (row ``y``, column ``x``) of the ``z``-th slice in position order, computed from the
  raw ImagePositionPatient/ImageOrientationPatient/PixelSpacing tags, or at the position of the same voxel in
  the source NIfTI file.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from napari_medssl._writer import write_labels_image, write_labels_nifti
from napari_medssl.engine import readers
from napari_medssl.io import grid_metadata, layer_data, read, read_dicom, read_image, read_nifti

pytestmark = pytest.mark.timeout(180)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
TOL_MM = 0.01
"""World positions must agree to 10 µm (voxels here are 0.5 mm and more)."""


def position_coded(shape: tuple[int, ...]) -> np.ndarray:
    """Labels 1..31 (a label map: at most 32 values) changing with every index step along every axis, so a
    flip, shift or swap of axes shows."""
    return (np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 31 + 1).astype(np.uint8)


def dicom_series(data_dir: Path) -> list[Path]:
    """Every folder under dicom/ that directly holds files (one series each)."""
    return sorted({p.parent for p in (data_dir / "dicom").rglob("*") if p.is_file()})


def write_both_ways(vol, labels: np.ndarray, out: Path) -> list[Path]:
    """As the viewer's writer does (Labels layer with the image's grid metadata) and as ``medssl predict`` does."""
    _, kwargs, _ = layer_data(vol)
    attributes = {
        "metadata": grid_metadata(kwargs["metadata"]),
        "scale": kwargs["scale"],
        "translate": kwargs["translate"],
    }
    viewer = Path(write_labels_nifti(str(out / "viewer.nii.gz"), labels, attributes)[0])
    cli = readers.write_labels(labels, vol, out / "cli.nii")
    return [viewer, cli]


def check_our_reader(path: Path, vol, labels: np.ndarray) -> None:
    back = read_nifti(path)
    np.testing.assert_array_equal(back.data, labels, err_msg=str(path))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-4, err_msg=str(path))
    assert back.is_label


def nibabel_world(path: Path, labels: np.ndarray, zyx: np.ndarray) -> np.ndarray:
    """World (RAS mm) of napari voxels ``zyx (P, 3)`` read by nibabel from the written file; checks its values."""
    img = nib.load(path)
    arr = np.asanyarray(img.dataobj)
    assert arr.shape == labels.shape[::-1]
    for z, y, x in zyx:
        assert arr[x, y, z] == labels[z, y, x]
    ijk = zyx[:, ::-1].astype(float)
    return (img.affine @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


def sample_voxels(shape: tuple[int, ...], rng: np.random.Generator, n: int = 20) -> np.ndarray:
    corners = np.array(
        [[a, b, c] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
    )
    return np.r_[corners, np.stack([rng.integers(0, s, n) for s in shape], axis=1)]


def test_dicom_series_labels_land_on_the_dicom_pixels(data_dir: Path, tmp_path: Path) -> None:
    series = dicom_series(data_dir)
    assert len(series) == 12  # 11 TCIA series (PGBM-001: 2 studies x 5, PGBM-005: 1) + the JPEG 2000 CT
    rng = np.random.default_rng(0)
    checked = 0
    for folder in series:
        (vol,) = read_dicom(folder)
        assert vol.data.ndim == 3, folder
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
        iop = np.asarray(headers[0].ImageOrientationPatient, float)
        row_cos, col_cos = iop[:3], iop[3:]
        normal = np.cross(row_cos, col_cos)
        headers.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
        labels = position_coded(vol.data.shape)
        out = tmp_path / folder.name
        for path in write_both_ways(vol, labels, out):
            check_our_reader(path, vol, labels)
            zyx = sample_voxels(labels.shape, rng)
            world = nibabel_world(path, labels, zyx)
            for (z, y, x), w in zip(zyx, world):
                ds = headers[z]
                dy, dx = (float(v) for v in ds.PixelSpacing)
                lps = np.asarray(ds.ImagePositionPatient, float) + x * dx * row_cos + y * dy * col_cos
                np.testing.assert_allclose(
                    w, LPS_TO_RAS @ lps, atol=TOL_MM, err_msg=f"{folder} voxel {z, y, x}"
                )
            checked += 1
    assert checked == 2 * len(series)


def test_dicom_masks_write_back_on_their_image_grid(data_dir: Path, tmp_path: Path) -> None:
    for study in sorted((data_dir / "dicom/tcia_btp_PGBM-001").iterdir()):
        vols = read_dicom(study)
        mask = next(v for v in vols if v.is_label)
        image = next(v for v in vols if v.name == mask.metadata["reference_series"])
        for path in write_both_ways(mask, mask.data, tmp_path / study.name):
            check_our_reader(path, image, mask.data)  # the mask's file sits on the image's grid
            assert nib.load(path).header.get_data_dtype() == np.uint8


def nifti_files(data_dir: Path) -> list[Path]:
    hippo = sorted((data_dir / "hippocampus/imagesTr").glob("*.nii.gz"))
    hippo_labels = sorted((data_dir / "hippocampus/labelsTr").glob("*.nii.gz"))
    return sorted((data_dir / "nifti").glob("*.nii.gz")) + hippo[::25] + hippo_labels[::40]


def test_nifti_labels_land_on_the_source_voxels(data_dir: Path, tmp_path: Path) -> None:
    files = nifti_files(data_dir)
    assert len(files) >= 3 + 8 + 5
    rng = np.random.default_rng(1)
    for src in files:
        vol = read_nifti(src)
        original = nib.load(src)
        source = np.asanyarray(original.dataobj)
        labels = position_coded(vol.data.shape)
        for path in write_both_ways(vol, labels, tmp_path / src.name.replace(".nii.gz", "")):
            check_our_reader(path, vol, labels)
            zyx = sample_voxels(labels.shape, rng)
            world = nibabel_world(path, labels, zyx)
            for (z, y, x), w in zip(zyx, world):
                np.testing.assert_allclose(
                    w, (original.affine @ [x, y, z, 1.0])[:3], atol=TOL_MM, err_msg=str(src)
                )
                # the label voxel is the image voxel our reader showed it on
                assert vol.data[z, y, x] == source[x, y, z] or vol.is_label
            assert nib.load(path).shape == original.shape


def test_hippocampus_label_file_round_trips_to_identical_bytes_of_data(
    data_dir: Path, tmp_path: Path
) -> None:
    """A real label map read and written back holds the same values on the same grid as the original."""
    for src in sorted((data_dir / "hippocampus/labelsTr").glob("*.nii.gz"))[::20]:
        vol = read_nifti(src)
        assert vol.is_label
        (path, _) = write_both_ways(vol, vol.data, tmp_path / src.name.replace(".nii.gz", ""))
        original, written = nib.load(src), nib.load(path)
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(original.dataobj))
        np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)


def test_2d_png_labels_round_trip(data_dir: Path, tmp_path: Path) -> None:
    vol = read_image(data_dir / "mammography_mias/mdb005.png")
    labels = position_coded(vol.data.shape) % 4
    (path,) = write_labels_image(str(tmp_path / "mdb005_labels"), labels, {})
    (back,) = read(path)
    np.testing.assert_array_equal(back.data, labels)
    assert back.data.shape == vol.data.shape and back.is_label
