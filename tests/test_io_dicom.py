"""DICOM series reading on the real TCIA and TotalSegmentator series in ../shared/data."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from napari_medssl.io import MedicalImageReadWarning, read_dicom
from napari_medssl.io.dicom_files import open_dicom, value

STUDY = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"
T1POST = f"{STUDY}/11-T1post-03326"
MASK = f"{STUDY}/5364-MaskTumor-94345"
CT_J2K = "dicom/ct_jpeg2000_no_uids"


def _independent_geometry(folder: Path) -> tuple[tuple[int, int, int], float, list[Path]]:
    """Shape, slice spacing and slice order computed from the raw tags, without the plugin's code."""
    headers = [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in sorted(folder.iterdir())]
    iop = np.array(headers[0][1].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    proj = {f: float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)) for f, ds in headers}
    order = sorted(proj, key=proj.get)
    gaps = np.diff([proj[f] for f in order])
    ds0 = headers[0][1]
    return (len(headers), int(ds0.Rows), int(ds0.Columns)), float(np.median(gaps)), order


@pytest.mark.parametrize("series", [T1POST, MASK, "dicom/tcia_btp_PGBM-005_T1post", CT_J2K])
def test_series_shape_spacing_and_order_match_the_raw_tags(data_dir: Path, series: str) -> None:
    folder = data_dir / series
    (vol,) = read_dicom(folder)
    shape, dz, order = _independent_geometry(folder)
    ds0 = pydicom.dcmread(order[0])
    assert vol.data.shape == shape
    assert vol.spacing == pytest.approx((dz, *map(float, ds0.PixelSpacing)), rel=1e-6)
    assert vol.spacing[0] != pytest.approx(float(ds0.SliceThickness))  # spacing is not SliceThickness
    slope, intercept = float(ds0.get("RescaleSlope", 1) or 1), float(ds0.get("RescaleIntercept", 0) or 0)
    for z in (0, len(order) // 2, len(order) - 1):  # slices in position order, rescaled
        expected = pydicom.dcmread(order[z]).pixel_array * slope + intercept
        np.testing.assert_array_equal(vol.data[z], expected)
    assert vol.metadata["files"] == [str(f) for f in order]


def test_tcia_geometry_and_window(data_dir: Path) -> None:
    (vol,) = read_dicom(data_dir / T1POST)
    ds0 = pydicom.dcmread(vol.metadata["files"][0])
    iop = np.array(ds0.ImageOrientationPatient, dtype=float)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(vol.origin, lps_to_ras @ np.array(ds0.ImagePositionPatient, dtype=float))
    np.testing.assert_allclose(vol.direction[:, 2], lps_to_ras @ iop[:3])  # x axis: along a row
    np.testing.assert_allclose(vol.direction[:, 1], lps_to_ras @ iop[3:])  # y axis: down a column
    last = pydicom.dcmread(vol.metadata["files"][-1])
    world_last = vol.affine @ np.array([vol.data.shape[0] - 1, 0, 0, 1.0])
    np.testing.assert_allclose(
        world_last[:3], lps_to_ras @ np.array(last.ImagePositionPatient, dtype=float), atol=1e-4
    )
    assert vol.modality == "MR" and not vol.is_label and vol.name == "T1post"
    lo, hi = vol.window
    assert vol.metadata["window"]["name"] == "percentile"
    assert np.mean(vol.data <= lo) < 0.7 and np.mean(vol.data >= hi) == pytest.approx(0.005, abs=0.005)


def test_mask_tumor_is_labels_on_its_image_grid(data_dir: Path) -> None:
    volumes = read_dicom([data_dir / T1POST, data_dir / MASK])
    image = next(v for v in volumes if not v.is_label)
    mask = next(v for v in volumes if v.is_label)
    assert mask.name == "Mask_Tumor" and mask.metadata["reference_series"] == image.name
    assert mask.data.dtype == np.uint8 and mask.metadata["label_values"] == [0, 1]
    assert mask.data.shape == image.data.shape
    np.testing.assert_array_equal(mask.affine, image.affine)
    assert mask.scale == image.scale and mask.translate == image.translate
    assert 1000 < int(mask.data.sum()) < mask.data.size // 10  # a tumour, not an empty or full mask
    # the mask's own positions agree with the image's to the precision it was written with
    raw = open_dicom(Path(mask.metadata["files"][0]))
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ raw.positions[0], image.origin, atol=1e-4)


def test_whole_patient_folder_gives_one_layer_per_series(data_dir: Path) -> None:
    volumes = read_dicom(data_dir / "dicom/tcia_btp_PGBM-001")
    assert len(volumes) == 10 and sum(v.is_label for v in volumes) == 2
    assert len({v.name for v in volumes}) == 10  # repeated descriptions get the study date
    assert all(v.metadata["skipped"] == [] for v in volumes)
    for mask in (v for v in volumes if v.is_label):
        ref = next(v for v in volumes if v.name == mask.metadata["reference_series"])
        assert ref.metadata["header"]["StudyDate"] == mask.metadata["header"]["StudyDate"]


def test_jpeg2000_ct_without_uids_groups_by_folder_and_gives_hounsfield(data_dir: Path) -> None:
    folder = data_dir / CT_J2K
    first = pydicom.dcmread(next(folder.iterdir()))
    assert first.SeriesInstanceUID == "" and first.file_meta.TransferSyntaxUID.name.startswith("JPEG 2000")
    (vol,) = read_dicom(folder)
    assert vol.modality == "CT" and vol.data.dtype == np.int16
    assert vol.metadata["window"] == {"name": "soft_tissue", "range": [-160.0, 240.0]}
    assert set(vol.metadata["window_presets"]) >= {"soft_tissue", "lung", "bone", "dicom"}
    assert vol.data.min() == pytest.approx(-1024, abs=1)  # air outside the body, in HU
    assert 20 < float(np.median(vol.data[vol.data > -200])) < 100  # soft tissue


def test_native_fast_path_equals_pydicom_pixel_array(data_dir: Path) -> None:
    """The zero-copy view plus unused-bit correction reproduces ``pixel_array`` (signed and unsigned series)."""
    for series in (T1POST, f"{STUDY}/10008-T1prereg-91470", MASK):
        (vol,) = read_dicom(data_dir / series)
        for z, f in enumerate(vol.metadata["files"]):
            ds = pydicom.dcmread(f)
            np.testing.assert_array_equal(vol.data[z], ds.pixel_array)


def test_raw_value_parser_matches_pydicom(data_dir: Path) -> None:
    tags = (0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103, 0x00200032, 0x00200037, 0x00280030)
    for f in [*sorted((data_dir / MASK).iterdir())[:3], Path(get_testdata_file("MR_small.dcm"))]:
        fast, ref = pydicom.dcmread(f), pydicom.dcmread(f)
        for tag in tags:
            got, want = value(fast, tag), ref[tag].value
            np.testing.assert_allclose(np.ravel(got).astype(float), np.ravel(want).astype(float))


def test_single_file_is_a_2d_image_with_geometry() -> None:
    (vol,) = read_dicom(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert vol.data.shape == (ds.Rows, ds.Columns) and vol.spatial_ndim == 2
    assert vol.spacing == tuple(float(v) for v in ds.PixelSpacing)
    np.testing.assert_array_equal(
        vol.data, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    )


def test_multiframe_file_built_from_real_slices(data_dir: Path, tmp_path: Path) -> None:
    """An enhanced-style multi-frame file (frames stored out of order) reads like the series it came from."""
    (series,) = read_dicom(data_dir / "dicom/tcia_btp_PGBM-005_T1post")
    files = series.metadata["files"]
    order = [3, 0, 2, 1, 4]
    slices = [pydicom.dcmread(files[i]) for i in order]
    ds = slices[0].copy()
    ds.NumberOfFrames = len(slices)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    shared = pydicom.Dataset()
    orient, measures = pydicom.Dataset(), pydicom.Dataset()
    orient.ImageOrientationPatient = slices[0].ImageOrientationPatient
    measures.PixelSpacing = slices[0].PixelSpacing
    shared.PlaneOrientationSequence = pydicom.Sequence([orient])
    shared.PixelMeasuresSequence = pydicom.Sequence([measures])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([shared])
    per_frame = []
    for s in slices:
        item, pos = pydicom.Dataset(), pydicom.Dataset()
        pos.ImagePositionPatient = s.ImagePositionPatient
        item.PlanePositionSequence = pydicom.Sequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence(per_frame)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(tmp_path / "multiframe.dcm")
    (vol,) = read_dicom(tmp_path / "multiframe.dcm")
    assert vol.data.shape == (5, *series.data.shape[1:])
    np.testing.assert_array_equal(vol.data, series.data[:5])
    assert vol.spacing == pytest.approx(series.spacing)
    np.testing.assert_allclose(vol.affine, series.affine, atol=1e-6)


def test_rt_dose_multiframe_uses_grid_offsets_and_dose_scaling() -> None:
    path = get_testdata_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    (vol,) = read_dicom(path)
    assert vol.data.shape == (ds.NumberOfFrames, ds.Rows, ds.Columns) and vol.data.dtype == np.float32
    offsets = np.array(ds.GridFrameOffsetVector, dtype=float)
    assert vol.spacing[0] == pytest.approx(abs(offsets[1] - offsets[0]))
    np.testing.assert_allclose(vol.data, ds.pixel_array * float(ds.DoseGridScaling), rtol=1e-6)


def test_folder_with_two_series_and_stray_files(data_dir: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(data_dir / T1POST, mixed / "a")
    shutil.copytree(data_dir / CT_J2K, mixed / "b" / "ct")
    (mixed / "README.txt").write_text("notes about the study\n")
    shutil.copy(get_testdata_file("rtstruct.dcm"), mixed / "b" / "rtstruct.dcm")
    (mixed / ".DS_Store").write_bytes(b"\0" * 64)  # hidden files are ignored, not reported
    with pytest.warns(MedicalImageReadWarning, match="2 file"):
        volumes = read_dicom(mixed)
    assert sorted(v.modality for v in volumes) == ["CT", "MR"]
    reasons = {Path(s["path"]).name: s["reason"] for s in volumes[0].metadata["skipped"]}
    assert set(reasons) == {"README.txt", "rtstruct.dcm"}
    assert "not a DICOM file" in reasons["README.txt"] and "RT Structure Set" in reasons["rtstruct.dcm"]


def test_one_undecodable_slice_is_reported_and_the_rest_loads(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    shutil.copytree(data_dir / CT_J2K, folder)
    victim = sorted(folder.iterdir())[7]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 20_000])  # the JPEG 2000 stream is cut short
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (vol,) = read_dicom(folder)
    assert vol.data.shape[0] == 19
    assert [s["path"] for s in vol.metadata["skipped"]] == [str(victim)]
    assert any(isinstance(w.message, MedicalImageReadWarning) for w in caught)
