"""Every test file pydicom and nibabel ship is read or refused cleanly, with their voxels where they decode one.

The files are those inside the installed pydicom (``pydicom/data/test_files``: what
``pydicom.data.get_testdata_files()`` lists, minus its downloads, which it would fetch from the network)
and nibabel (``nibabel/tests/data``) wheels, folders included. For each one:

- ``io.read`` returns volumes or raises :class:`MedicalImageReadError` (never another exception);
- the napari reader (``get_reader``) never raises, and for a DICOM file (one pydicom itself reads) it is
  offered: the manifest's filename patterns match it (so napari does not answer "no compatible reader")
  and ``get_reader`` returns the reader;
- where pydicom decodes pixels (``ds.pixel_array``, then the modality LUT or RT dose scaling) or nibabel
  decodes a 2D/3D NIfTI, ours holds the same values (float32 rounding allowed), and a file they decode is
  never refused, except a DICOM SEG (``io.dicom_seg`` opens a SEG on its source series' grid; pydicom's two
  come without theirs, one of them big-endian, which highdicom does not parse).

The whole sweep takes about 3 s on one core, so all of it runs in the unit suite.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from npe2 import PluginManager, PluginManifest
from pydicom.fileset import FileSet
from pydicom.pixels import apply_modality_lut

import napari_medssl
from napari_medssl import io
from napari_medssl._reader import get_reader
from napari_medssl.io import MedicalImageReadError, MedicalImageReadWarning

PYDICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"
NIBABEL_DIR = Path(nib.__file__).parent / "tests" / "data"
MANIFEST = Path(napari_medssl.__file__).parent / "napari.yaml"


def _shipped(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix != ".py" and "__pycache__" not in p.parts)


REFERENCE_FILES = [*_shipped(PYDICOM_DIR), *_shipped(NIBABEL_DIR)]


def _id(path: Path) -> str:
    root = PYDICOM_DIR if PYDICOM_DIR in path.parents else NIBABEL_DIR
    return f"{'pydicom' if root == PYDICOM_DIR else 'nibabel'}/{path.relative_to(root)}"


@pytest.fixture(scope="module")
def plugin_manager() -> PluginManager:
    pm = PluginManager()
    pm.register(PluginManifest.from_file(MANIFEST))
    return pm


def _pydicom_dataset(path: Path) -> pydicom.Dataset | None:
    """The dataset when pydicom itself reads ``path`` as DICOM (no ``force``), else ``None``."""
    if not path.is_file():
        return None
    try:
        return pydicom.dcmread(path)
    except Exception:
        return None


def _pydicom_frames(ds: pydicom.Dataset) -> np.ndarray | None:
    """``(F, Y, X[, C])`` real-world values as pydicom decodes them, or ``None`` when it cannot."""
    try:
        arr = ds.pixel_array
    except Exception:
        return None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "DoseGridScaling" in ds:
        arr = arr * float(ds.DoseGridScaling)
    elif samples == 1:
        arr = apply_modality_lut(arr, ds)
    if samples == 1 and ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = arr.max() - arr + arr.min()  # ours shows bright = dense
    return arr.reshape(frames, *arr.shape[-3 if samples > 1 else -2 :]).astype(np.float64)


def _assert_frames_match(ours: np.ndarray, ref: np.ndarray, name: str) -> None:
    """Each of our slices equals a distinct reference frame (ours are sorted along the slice normal)."""
    ours = ours.reshape(-1, *ref.shape[1:]).astype(np.float64)
    atol = 2e-6 * max(1.0, float(np.abs(ref).max()))
    unused = list(range(len(ref)))
    for z, frame in enumerate(ours):
        hit = next((i for i in unused if np.allclose(frame, ref[i], rtol=0, atol=atol)), None)
        assert hit is not None, f"{name}: our slice {z} matches no frame pydicom decodes"
        unused.remove(hit)


def _nibabel_image(path: Path) -> np.ndarray | None:
    """nibabel's voxels of a 2D/3D NIfTI-1/2 file (trailing axes of 1 dropped), else ``None``."""
    try:
        img = nib.load(path)
        if type(img) not in (nib.Nifti1Image, nib.Nifti2Image):
            return None
        data = np.asanyarray(img.dataobj)
    except Exception:
        return None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data if data.ndim in (2, 3) else None


@pytest.mark.parametrize("path", REFERENCE_FILES, ids=_id)
def test_reference_file_is_read_or_refused_cleanly(path: Path, plugin_manager: PluginManager) -> None:
    ds = _pydicom_dataset(path)
    if ds is not None:  # a DICOM file: napari must offer our reader
        offered = {r.plugin_name for r in plugin_manager.iter_compatible_readers([str(path)])}
        assert "napari-medssl" in offered, f"the manifest's patterns do not match {path.name}"
        assert get_reader(str(path)) is not None
    else:
        get_reader(str(path))  # must not raise; may return None (not ours to read)
    ref = _pydicom_frames(ds) if ds is not None else None
    nifti = _nibabel_image(path) if path.is_file() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            volumes = io.read(path)
        except MedicalImageReadError as err:
            assert err.reason, path
            if ds is not None and ds.get("Modality") == "SEG":  # io.dicom_seg's to judge: pydicom's SEGs come
                return  # without their source series (a SEG opens on its grid) or big-endian (highdicom: no)
            assert ref is None and nifti is None, f"pydicom/nibabel decode {path.name}, we refuse: {err}"
            return
    assert volumes and all(v.data.dtype.isnative for v in volumes)
    if ref is not None:
        assert len(volumes) == 1, path
        _assert_frames_match(volumes[0].data, ref, path.name)
    if nifti is not None:
        expected = nifti.T.astype(np.float64)
        bad = ~np.isfinite(expected)
        if bad.any():  # replaced by the smallest finite value, with a warning giving the count
            expected[bad] = expected[~bad].min()
            assert any(f"{int(bad.sum()):,} of" in str(w.message) for w in caught), path
        np.testing.assert_allclose(volumes[0].data, expected, rtol=1e-6, atol=1e-6)


def test_the_sweep_covers_dicomdirs_extensionless_and_nan_files() -> None:
    """The parametrised sweep above holds the cases the issue names (guards against an empty glob)."""
    names = {p.name for p in REFERENCE_FILES}
    assert len(REFERENCE_FILES) > 250
    assert {"DICOMDIR", "DICOMDIR-nopatient", "6154", "IM000000", "resampled_anat_moved.nii"} <= names
    assert {"CT_small.dcm", "rtdose.dcm", "anatomical.nii", "0.dcm", "test.mgz"} <= names


def test_dicomdir_opens_every_series_it_lists() -> None:
    """pydicom's DICOMDIR (its variants: implicit VR, big endian, reordered, no offsets, no patient record)
    opens the same series, with the same voxels, as its folder does."""
    root = PYDICOM_DIR / "dicomdirtests"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedicalImageReadWarning)
        folder = {tuple(v.metadata["files"]): v.data for v in io.read(root)}
        assert len(folder) == 24
        for name in ("DICOMDIR", "DICOMDIR-implicit", "DICOMDIR-bigEnd", "DICOMDIR-nopatient"):
            listed = {tuple(v.metadata["files"]): v.data for v in io.read(root / name)}
            assert listed.keys() == folder.keys(), name
            for key, data in listed.items():
                np.testing.assert_array_equal(data, folder[key])
    with pytest.raises(MedicalImageReadError, match="lists no file to read"):
        io.read(root / "DICOMDIR-empty.dcm")
    with pytest.raises(MedicalImageReadError, match="no pixel data"):  # pydicom's pixel-less file-set
        io.read(root / "TINY_ALPHA" / "DICOMDIR")


def _file_set(data_dir: Path, out: Path) -> Path:
    """A real DICOMDIR (pydicom FileSet) over the TCIA T1post series and its tumour mask; files renamed
    the ISO 9660 way (``PT000000/ST000000/SE000000/IM000000``, no extension)."""
    study = data_dir / "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"
    fs = FileSet()
    for series in sorted(study.iterdir()):
        if "T1post" in series.name or "MaskTumor" in series.name:
            for f in sorted(series.glob("*.dcm")):
                ds = pydicom.dcmread(f)
                ds.StudyID = (
                    ds.StudyID or "1"
                )  # emptied by TCIA's anonymiser; a DICOMDIR study record needs it
                fs.add(ds)
    fs.write(out)
    return out / "DICOMDIR"


def test_a_real_file_set_opens_like_its_series(data_dir: Path, tmp_path: Path) -> None:
    dicomdir = _file_set(data_dir, tmp_path / "cd")
    study = data_dir / "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"
    originals = [
        v for v in io.read(study) if v.name in ("T1post", "Mask_Tumor")
    ]  # the same two series read from their own folder
    listed = io.read(dicomdir)
    assert [v.name for v in listed] == [v.name for v in originals]
    for a, b in zip(listed, originals):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    assert listed[1].metadata["reference_series"] == "T1post"  # the mask still snaps onto its image
    one = next((tmp_path / "cd").rglob("IM000000"))  # an extension-less file of the set
    assert io.detect_format(one) == "dicom" and get_reader(str(one)) is not None
    shutil.rmtree(one.parent.parent.parent)  # a file-set whose listed files are missing
    with pytest.raises(MedicalImageReadError, match="missing"):
        io.read(dicomdir)


def test_non_dicom_files_are_left_to_other_readers(tmp_path: Path, plugin_manager: PluginManager) -> None:
    """Files that are not ours: get_reader returns None (never raises), and common extensions are not even
    matched by the manifest, so napari does not ask the user to choose between readers."""
    for name, content in {
        "notes": b"plain text, not DICOM",
        "IM000001": b"\x00" * 10,
        "1.2.840.113619.2.55": b"",
        "table.csv": b"a,b\n1,2\n",
    }.items():
        (tmp_path / name).write_bytes(content)
        assert get_reader(str(tmp_path / name)) is None, name
    for name in ("table.csv", "array.npy", "image.jpg", "store.zarr", "data.h5", "meta.json"):
        offered = {r.plugin_name for r in plugin_manager.iter_compatible_readers([str(tmp_path / name)])}
        assert "napari-medssl" not in offered, name
    assert get_reader(str(tmp_path / "does-not-exist")) is None


def test_nan_nifti_opens_with_a_warning(tmp_path: Path) -> None:
    """nibabel's resampled image (NaN outside the moved field of view) through the napari reader."""
    from napari_medssl._reader import read_layers

    path = NIBABEL_DIR / "resampled_anat_moved.nii"
    raw = np.asanyarray(nib.load(path).dataobj)
    n_bad = int((~np.isfinite(raw)).sum())
    with pytest.warns(MedicalImageReadWarning, match=f"{n_bad} of {raw.size:,} voxels were NaN or infinite"):
        ((data, meta, kind),) = read_layers(str(path))
    assert kind == "image" and np.isfinite(data).all()
    assert data[~np.isfinite(raw.T)].tolist() == [float(np.nanmin(raw))] * n_bad
    assert "smallest finite value" in meta["metadata"]["warnings"][0]


@pytest.mark.gui
@pytest.mark.timeout(120)
def test_extensionless_dicom_and_dicomdir_dropped_on_napari(
    make_napari_viewer, data_dir: Path, tmp_path: Path
) -> None:
    """``viewer.open(..., plugin=None)`` is what a drag-and-drop does (napari's own default is its builtins):
    napari finds our reader from the manifest alone, and it is the only one (no reader-choice dialog)."""
    import napari

    dicomdir = _file_set(data_dir, tmp_path / "cd")
    viewer = make_napari_viewer()
    layers = viewer.open(str(dicomdir), plugin=None)
    assert [lay.name for lay in layers] == ["T1post", "Mask_Tumor"]
    assert isinstance(layers[1], napari.layers.Labels) and layers[0].data.shape == layers[1].data.shape
    single = viewer.open(str(PYDICOM_DIR / "dicomdirtests/77654033/CR1/6154"), plugin=None)
    assert len(single) == 1 and single[0].data.shape == (16, 16)
    uid_named = tmp_path / "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.481"
    shutil.copy(PYDICOM_DIR / "CT_small.dcm", uid_named)
    assert viewer.open(str(uid_named), plugin=None)[0].data.shape == (128, 128)


def test_predict_input_reads_a_dicomdir(data_dir: Path, tmp_path: Path) -> None:
    """What ``medssl predict --input DICOMDIR`` reads (``engine.readers.read_any``): the file-set's one image
    series, its tumour mask passed over; an input with two image series is refused naming them."""
    from napari_medssl.engine.readers import read_any

    dicomdir = _file_set(data_dir, tmp_path / "cd")
    image = read_any(dicomdir)
    assert image.name == "T1post" and image.data.shape == io.read(dicomdir)[0].data.shape
    with pytest.raises(
        ValueError, match=r"holds 22 image series; give the folder or file of one: Routine Brain \(.*CT2\)"
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MedicalImageReadWarning)
            read_any(PYDICOM_DIR / "dicomdirtests" / "DICOMDIR")
