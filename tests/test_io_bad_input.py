"""Bad input gives a clear MedicalImageReadError naming the file and the reason, fast, without big allocations.

Every corrupted file is built in tmp_path from a real one (../shared/data or a dependency's real test file).
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from napari_medssl._reader import read_layers
from napari_medssl.io import MedicalImageReadError, MedicalImageReadWarning, read, read_dicom, read_nifti

pytestmark = pytest.mark.timeout(60)

MR_SLICE = "dicom/tcia_btp_PGBM-005_T1post/000000.dcm"
HIPPO = "hippocampus/imagesTr/hippocampus_001.nii.gz"


def _refuses(path: Path, match: str, reader: Callable = read) -> MedicalImageReadError:
    """Read ``path``: it must fail with our error naming the file, having allocated < 20 MB on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(MedicalImageReadError, match=match) as info:
            reader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, ValueError)
    assert peak < 20e6, f"{peak / 1e6:.0f} MB allocated before refusing"
    return info.value


def test_truncated_dicom(data_dir: Path, tmp_path: Path) -> None:
    raw = (data_dir / MR_SLICE).read_bytes()
    (tmp_path / "half.dcm").write_bytes(raw[: len(raw) // 2])
    _refuses(tmp_path / "half.dcm", "holds .* bytes of pixel data")
    (tmp_path / "header_only.dcm").write_bytes(raw[:700])
    _refuses(tmp_path / "header_only.dcm", "truncated")


def test_corrupt_dicom_header(data_dir: Path, tmp_path: Path) -> None:
    raw = bytearray((data_dir / MR_SLICE).read_bytes())
    raw[140:400] = np.random.default_rng(0).integers(0, 256, 260, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.dcm").write_bytes(bytes(raw))
    _refuses(tmp_path / "garbled.dcm", "corrupt|truncated|pixel")
    (tmp_path / "not_dicom.dcm").write_bytes(b"this is a text file, not an image\n" * 20)
    _refuses(tmp_path / "not_dicom.dcm", "not a DICOM file")


@pytest.mark.parametrize(("name", "kind"), [("rtstruct.dcm", "RT Structure Set"), ("test-SR.dcm", "SR")])
def test_dicom_without_pixel_data(tmp_path: Path, name: str, kind: str) -> None:
    shutil.copy(get_testdata_file(name), tmp_path / name)
    err = _refuses(tmp_path / name, "no pixel data")
    assert kind in err.reason


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    _refuses(tmp_path / "empty", "empty")


def test_folder_of_only_bad_files_lists_them(data_dir: Path, tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("rtstruct.dcm"), tmp_path / "rtstruct.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    err = _refuses(tmp_path, "no readable DICOM image among 2 file")
    assert "rtstruct.dcm" in err.reason and "notes.txt" in err.reason


def test_unsupported_compression(data_dir: Path, tmp_path: Path) -> None:
    ct = sorted((data_dir / "dicom/ct_jpeg2000_no_uids").iterdir())[0]
    ds = pydicom.dcmread(ct)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # no pydicom decoder exists for video
    ds.save_as(tmp_path / "mpeg2.dcm")
    _refuses(tmp_path / "mpeg2.dcm", "unsupported compression MPEG2")


def test_jpeg_ls_without_a_decoder_names_what_to_install(tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "jls.dcm")
    if get_decoder(pydicom.uid.JPEGLSLossless).is_available:  # a decoder was installed: then it must read
        assert read(tmp_path / "jls.dcm")[0].data.shape == (64, 64)
    else:
        err = _refuses(tmp_path / "jls.dcm", "unsupported compression JPEG-LS")
        assert "pylibjpeg" in err.reason


def test_undecodable_12bit_jpeg(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("JPGExtended.dcm"), tmp_path / "jpg12.dcm")
    _refuses(tmp_path / "jpg12.dcm", "cannot decode the pixel data")


def test_tiny_dicom_claiming_an_enormous_image(data_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_dir / MR_SLICE)
    ds.Rows, ds.Columns = 20000, 20000  # 800 MB: under the voxel limit, far over the bytes in the file
    ds.save_as(tmp_path / "claims_800mb.dcm")
    _refuses(tmp_path / "claims_800mb.dcm", "the file holds 166,400 bytes")
    ct = pydicom.dcmread(sorted((data_dir / "dicom/ct_jpeg2000_no_uids").iterdir())[0])
    ct.Rows, ct.Columns, ct.NumberOfFrames = 65535, 65535, 1000
    ct.save_as(tmp_path / "claims_8tb.dcm")
    _refuses(tmp_path / "claims_8tb.dcm", "refusing to allocate")


def _nifti_from_hippocampus(data_dir: Path, data: np.ndarray, path: Path) -> Path:
    img = nib.load(data_dir / HIPPO)
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(data.dtype)
    nib.save(out, path)
    return path


def test_nifti_with_nan_and_inf(data_dir: Path, tmp_path: Path) -> None:
    data = np.asanyarray(nib.load(data_dir / HIPPO).dataobj).astype(np.float32) + 7  # lowest is not 0
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    path = _nifti_from_hippocampus(data_dir, data, tmp_path / "nan.nii.gz")
    lowest = float(np.nanmin(np.where(np.isfinite(data), data, np.nan)))
    assert lowest > 0
    n = f"3 of {data.size:,} voxels were NaN or infinite"
    for reader in (read_nifti, read, read_layers):  # the default everywhere, the napari reader included
        with pytest.warns(MedicalImageReadWarning, match=f"{n}: replaced with {lowest:g} \\(the smallest finite"):
            reader(path)
    with pytest.warns(MedicalImageReadWarning):
        vol = read_nifti(path)
    assert np.isfinite(vol.data).all() and vol.data[:3, 0, 0].tolist() == [lowest] * 3
    assert vol.metadata["warnings"] == [f"{n}: replaced with {lowest:g} (the smallest finite value)"]
    with pytest.warns(MedicalImageReadWarning, match=f"{n}: replaced with 0$"):
        assert read_nifti(path, nan_policy="zero").data[:3, 0, 0].tolist() == [0.0] * 3
    _refuses(path, "3 of .* voxels are NaN or infinite", lambda p: read_nifti(p, nan_policy="raise"))
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        read_nifti(path, nan_policy="ignore")


def test_4d_nifti(data_dir: Path, tmp_path: Path) -> None:
    data = np.asanyarray(nib.load(data_dir / HIPPO).dataobj)
    four = _nifti_from_hippocampus(data_dir, np.stack([data, data], axis=-1), tmp_path / "two.nii.gz")
    _refuses(four, r"4D image of shape \(35, 51, 35, 2\)", read_nifti)
    single = _nifti_from_hippocampus(data_dir, data[..., None], tmp_path / "one.nii.gz")
    assert read_nifti(single).data.shape == (35, 51, 35)  # a trailing axis of 1 is just dropped


def test_nifti_claiming_more_than_it_holds(data_dir: Path, tmp_path: Path) -> None:
    img = nib.load(data_dir / HIPPO)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), tmp_path / "ok.nii")
    raw = bytearray((tmp_path / "ok.nii").read_bytes())
    raw[42:48] = struct.pack("<3h", 100, 100, 100)  # dim[1:4]: more voxels than the file holds
    (tmp_path / "short.nii").write_bytes(bytes(raw))
    _refuses(tmp_path / "short.nii", "but the file holds")
    raw[42:48] = struct.pack("<3h", 2000, 2000, 2000)  # 8 G voxels
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    _refuses(tmp_path / "huge.nii.gz", "refusing to allocate")
    (tmp_path / "cut.nii.gz").write_bytes((data_dir / HIPPO).read_bytes()[:3000])
    _refuses(tmp_path / "cut.nii.gz", "truncated or corrupt|not a readable NIfTI")


def test_png_claiming_an_enormous_image_and_truncated_png(data_dir: Path, tmp_path: Path) -> None:
    png = bytearray((data_dir / "mammography_mias/mdb005.png").read_bytes())
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", 50000, 50000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(png))
    _refuses(tmp_path / "huge.png", "enormous image|refusing to allocate")
    good = (data_dir / "mammography_mias/mdb005.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    _refuses(tmp_path / "cut.png", "truncated")


def test_unrecognised_file_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    _refuses(tmp_path / "table.csv", "not a recognised medical image")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read(tmp_path / "missing.nii.gz")


def test_napari_reader_raises_the_same_clear_error(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("rtstruct.dcm"), tmp_path / "rtstruct.dcm")
    with pytest.raises(MedicalImageReadError, match="rtstruct.dcm: no pixel data"):
        read_layers(str(tmp_path / "rtstruct.dcm"))


def test_read_dicom_on_a_single_bad_file_names_it(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "MR_truncated.dcm")
    _refuses(tmp_path / "MR_truncated.dcm", "truncated", read_dicom)
