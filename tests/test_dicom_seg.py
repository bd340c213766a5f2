"""DICOM SEG out and in (highdicom) on the real TCIA glioblastoma study: the MaskTumor labels on T1post."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from napari_medssl._reader import read_layers
from napari_medssl._writer import write_labels_dicom_seg, write_labels_nifti
from napari_medssl.engine.readers import write_prediction
from napari_medssl.io import (
    MedicalImageReadError,
    MedicalImageWriteError,
    grid_metadata,
    layer_data,
    read,
    read_dicom,
    read_nifti,
)
from napari_medssl.io.dicom_seg import build_seg, labelmap_supported, read_seg, write_seg

STUDY = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"
T1POST = f"{STUDY}/11-T1post-03326"
MASK = f"{STUDY}/5364-MaskTumor-94345"
PROV = {
    "model": "unet_tiny_hippocampus",
    "weights_sha256": "60629c6133fb69e5fd0423f35062d0ac6b8ca09564f399bf981d92039d87c835",
    "package_version": "0.1.0",
}


@pytest.fixture(scope="module")
def study(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A copy of the T1post series (a study folder of one series) and the real tumour mask on its grid."""
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(data_dir / T1POST, root / "T1post")
    (image,) = read_dicom(root / "T1post")
    (mask,) = read_dicom(data_dir / MASK)
    assert mask.data.shape == image.data.shape and mask.data.any()
    return {"root": root, "image": image, "mask": mask.data}


def _positions(ds: pydicom.Dataset) -> list[tuple[float, ...]]:
    return [
        tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        for item in ds.PerFrameFunctionalGroupsSequence
    ]


@pytest.mark.parametrize("kind", ["labelmap", "binary"])
def test_seg_references_the_series_sits_on_its_slices_and_reads_back(study: dict, kind: str) -> None:
    if kind == "labelmap" and not labelmap_supported():
        pytest.fail("highdicom/pydicom here cannot write LABELMAP SEG; the project pins versions that can")
    image, mask = study["image"], study["mask"]
    uid = image.metadata["header"]["SeriesInstanceUID"]
    prov = {**PROV, "source_series_uid": uid}
    path = write_seg(
        study["root"] / f"seg_{kind}.dcm",
        mask,
        image.metadata["files"],
        class_names=["background", "tumour"],
        segment_codes={"tumour": {"category": "MorphologicallyAbnormalStructure", "type": "Neoplasm"}},
        provenance=prov,
        kind=kind,
    )
    ds = pydicom.dcmread(path)
    seg = hd.seg.Segmentation.from_dataset(ds)
    assert ds.SegmentationType == kind.upper()
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert ds.StudyInstanceUID == image.metadata["header"]["StudyInstanceUID"]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in image.metadata["files"]]
    by_uid = {s.SOPInstanceUID: s for s in sources}
    tumour_slices = [z for z in range(mask.shape[0]) if mask[z].any()]
    assert ds.NumberOfFrames == len(tumour_slices)  # empty slices omitted, one frame per tumour slice
    for item, pos in zip(ds.PerFrameFunctionalGroupsSequence, _positions(ds)):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert pos == tuple(float(v) for v in by_uid[ref].ImagePositionPatient)
    (segment,) = [s for s in ds.SegmentSequence if s.SegmentNumber > 0]  # LABELMAP: 0 is the background
    assert segment.SegmentLabel == "tumour"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SNOMED CT Neoplasm
    assert [n for n in seg.get_segment_numbers() if n > 0] == [1]
    # provenance: model, weights sha256, package version and source series in the header
    assert ds.SeriesDescription == "medssl unet_tiny_hippocampus"
    assert str(ds.ContentCreatorName) == "napari-medssl^unet_tiny_hippocampus"
    assert ds.DeviceSerialNumber == PROV["weights_sha256"]
    (ours,) = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "napari-medssl"]
    described = ours.ContributionDescription
    assert PROV["weights_sha256"] in described and uid in described and "0.1.0" in described
    back = read_seg(path)
    np.testing.assert_array_equal(back.data, mask)
    np.testing.assert_allclose(back.affine, image.affine)
    assert back.is_label and back.modality == "SEG"
    assert back.metadata["provenance"] == prov
    assert back.metadata["class_names"] == ["background", "tumour"]


def test_classes_without_codes_get_the_generic_code_and_every_class_a_segment(study: dict) -> None:
    image = study["image"]
    labels = np.zeros(image.data.shape, np.uint8)
    labels[10, 100:120, 100:130] = 2  # class 1 absent from the data: still a segment
    ds = build_seg(labels, image.metadata["files"], class_names=["background", "anterior", "posterior"])
    segments = [s for s in ds.SegmentSequence if s.SegmentNumber > 0]
    assert [s.SegmentLabel for s in segments] == ["anterior", "posterior"]
    assert {s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning for s in segments} == {"Tissue"}
    assert segments[0].SegmentAlgorithmType == "MANUAL"  # no model: painted labels


def test_seg_beside_its_series_opens_in_napari_on_the_series_grid(study: dict) -> None:
    image, mask = study["image"], study["mask"]
    seg_dir = study["root"] / "SEG"  # a sibling folder of the series, as a PACS pull lays them out
    path = write_seg(seg_dir / "tumour.dcm", mask, image.metadata["files"], provenance=PROV)
    (img_layer,) = read_layers(str(study["root"] / "T1post"))
    (seg_layer,) = read_layers(str(path))
    data, kwargs, kind = seg_layer
    assert kind == "labels"
    np.testing.assert_array_equal(data, mask)
    np.testing.assert_allclose(kwargs["scale"], img_layer[1]["scale"])
    np.testing.assert_allclose(kwargs["translate"], img_layer[1]["translate"])
    # the whole study folder: one image and the SEGs (this one, the other tests') on its grid
    vols = read(study["root"])
    assert [v.modality for v in vols].count("MR") == 1 and len(vols) > 1
    for v in vols:
        assert v.modality == "MR" or (v.is_label and np.allclose(v.affine, image.affine))


def test_seg_without_its_series_is_a_clear_error(study: dict, tmp_path: Path) -> None:
    image = study["image"]
    alone = write_seg(tmp_path / "alone" / "seg.dcm", study["mask"], image.metadata["files"])
    with pytest.raises(MedicalImageReadError, match=image.metadata["header"]["SeriesInstanceUID"]):
        read_seg(alone)
    back = read_seg(alone, source=study["root"] / "T1post")  # told where the series is
    np.testing.assert_array_equal(back.data, study["mask"])


def test_labels_that_do_not_fit_the_series_or_have_no_series_are_refused(study: dict, data_dir: Path) -> None:
    image = study["image"]
    with pytest.raises(MedicalImageWriteError, match="do not fit the source series"):
        build_seg(study["mask"][:5], image.metadata["files"])
    nifti = read_nifti(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz")
    with pytest.raises(ValueError, match="only for a DICOM series input"):
        write_prediction(np.zeros(nifti.data.shape, np.uint8), nifti, study["root"] / "x.dcm")
    assert not (study["root"] / "x.dcm").exists()
    attributes = {"metadata": {"format": "nifti"}, "scale": (1, 1, 1)}
    with pytest.raises(MedicalImageWriteError, match="source DICOM files"):
        write_labels_dicom_seg(str(study["root"] / "y.dcm"), np.zeros((2, 3, 4), np.uint8), attributes)


def test_napari_writer_writes_seg_for_labels_painted_on_the_series(study: dict) -> None:
    _, kwargs, _ = layer_data(study["image"])
    attributes = {"metadata": {**grid_metadata(kwargs["metadata"]), "medssl": {"provenance": PROV}}}
    (written,) = write_labels_dicom_seg(str(study["root"] / "painted"), study["mask"], attributes)
    assert written.endswith("painted.dcm")
    back = read_seg(written)
    np.testing.assert_array_equal(back.data, study["mask"])
    assert back.metadata["provenance"]["model"] == PROV["model"]


def test_napari_nifti_writer_puts_a_predictions_provenance_beside_it(study: dict, tmp_path: Path) -> None:
    _, kwargs, _ = layer_data(study["image"])
    attributes = {"metadata": {**grid_metadata(kwargs["metadata"]), "medssl": {"provenance": PROV}}}
    (written,) = write_labels_nifti(str(tmp_path / "pred.nii.gz"), study["mask"], attributes)
    assert json.loads(Path(f"{written}.json").read_text()) == PROV
    np.testing.assert_allclose(read_nifti(written).affine, study["image"].affine, atol=1e-4)
