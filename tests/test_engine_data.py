"""Data sources, splits, samples and augmentations on the real data in ../shared/data."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medssl.engine.augment import IGNORE, augment_batch, random_affine, random_flips
from napari_medssl.engine.data import (
    ArrayData,
    DicomFolder,
    ImageFolder,
    MedMNIST,
    MiasFolder,
    MSDFolder,
    mias_woman,
    open_data,
)
from napari_medssl.engine.samples import SampleSet, choose_size, map_labels
from napari_medssl.engine.split import load_split, make_split, save_split, select, split_for
from napari_medssl.testing.training import one_thread, small_msd  # noqa: F401


def test_msd_folder_reads_zyx_volumes_with_labels(data_dir, tmp_path):
    src = MSDFolder(small_msd(data_dir, tmp_path / "msd", n=3))
    cases = src.cases()
    assert [c.id for c in cases] == ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
    img, lab = cases[0].load()
    raw = np.asarray(nib.load(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz").dataobj)
    assert img.shape == (1, *raw.shape[::-1])  # napari order: file (X, Y, Z) reversed
    np.testing.assert_array_equal(img[0], raw.T)
    assert set(np.unique(lab)) == {0, 1, 2}
    assert src.task == "segment" and src.num_classes() == 3


def test_mias_labels_groups_and_split(data_dir):
    src = MiasFolder(data_dir / "mammography_mias")
    cases = src.cases()
    assert len(cases) == 200
    with open(data_dir / "mammography_mias/labels.csv", newline="") as fh:
        abnormal = {r["image"][:-4] for r in csv.DictReader(fh) if r["abnormality"] != "NORM"}
    assert {c.id for c in cases if c.class_label == 1} == abnormal
    assert mias_woman("mdb001.png") == mias_woman("mdb002") != mias_woman("mdb003")
    split = make_split(cases, 0.2, seed=0)
    assert split == make_split(cases, 0.2, seed=0)
    assert split != make_split(cases, 0.2, seed=1)
    assert not set(split["train"]) & set(split["val"])
    groups = {c.id: c.group for c in cases}
    assert not {groups[i] for i in split["train"]} & {groups[i] for i in split["val"]}
    val_labels = {c.class_label for c in cases if c.id in split["val"]}
    assert val_labels == {0, 1}
    assert 0.15 < len(split["val"]) / 200 < 0.3


def test_split_file_round_trip_and_select(tmp_path):
    src = ArrayData([np.zeros((4, 4))] * 5, [0, 1, 0, 1, 0])
    split = make_split(src.cases(), 0.4, seed=3)
    save_split(split, tmp_path / "split.json", seed=3)
    assert load_split(tmp_path / "split.json") == split
    assert [c.id for c in select(src.cases(), split["val"])] == split["val"]
    with pytest.raises(ValueError, match="not in the data"):
        select(src.cases(), ["nope"])
    with pytest.raises(FileNotFoundError):
        load_split(tmp_path / "missing.json")


def test_medmnist_official_split(data_dir):
    src = MedMNIST(data_dir / "medmnist/retinamnist.npz")
    cases = src.cases()
    split = split_for(src, cases, 0.2, seed=0)
    assert (len(split["train"]), len(split["val"])) == (1080, 120)
    img, label = cases[0].load()
    assert img.shape == (3, 28, 28) and 0 <= label < 5
    assert src.num_classes() == 5


def test_dicom_folder_skips_mask_series(data_dir):
    single = DicomFolder(data_dir / "dicom/tcia_btp_PGBM-005_T1post").cases()
    assert len(single) == 1
    img, label = single[0].load()
    assert img.ndim == 4 and img.shape[1] == 24 and label is None
    study = DicomFolder(data_dir / "dicom/tcia_btp_PGBM-001").cases()
    assert study and all("mask" not in c.id.lower() for c in study)


def test_open_data_detects_layouts_and_refuses_others(data_dir, tmp_path):
    assert isinstance(open_data(str(data_dir / "hippocampus")), MSDFolder)
    assert isinstance(open_data(data_dir / "mammography_mias"), MiasFolder)
    assert isinstance(open_data(data_dir / "medmnist/retinamnist.npz"), MedMNIST)
    assert isinstance(open_data(data_dir / "dicom/tcia_btp_PGBM-005_T1post"), DicomFolder)
    with pytest.raises(FileNotFoundError, match="not found"):
        open_data(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a known data layout"):
        open_data(tmp_path / "empty")


def test_array_data_checks_labels():
    with pytest.raises(ValueError, match="does not match"):
        ArrayData([np.zeros((4, 5))], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="not a mix"):
        ArrayData([np.zeros((4, 4))] * 2, [np.zeros((4, 4)), 1])
    assert ArrayData([np.zeros((4, 4))], [2]).task == "classify"


def test_map_labels_ignore_then_rename():
    mask = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(map_labels(mask, 0, {1: 0, 2: 1, 3: 2}), [IGNORE, 0, 1, 2])
    assert map_labels(0, 0, None) == IGNORE and map_labels(2, None, {2: 1}) == 1


def test_sample_set_slices_volumes_and_skips_unpainted_slices(data_dir, tmp_path):
    img, lab = MSDFolder(small_msd(data_dir, tmp_path / "msd", n=1)).cases()[0].load()
    painted = np.zeros_like(lab)
    painted[10] = lab[10] + 1  # slice 10 painted (0 = unlabelled, 1 = background, 2, 3 = hippocampus)
    src = ArrayData([img[0]], [painted])
    ds = SampleSet(src.cases(), "segment", 2, 1, ignore_index=0, label_map={1: 0, 2: 1, 3: 2}, train=False)
    assert ds.items == [(0, 10)]
    ds.set_size((64, 48))
    item = ds[0]
    assert item["image"].shape == (1, 64, 48)
    y = item["label"]
    y_h, y_w = lab[10].shape
    np.testing.assert_array_equal(y[:y_h, :y_w].numpy(), lab[10])
    assert (y[y_h:] == IGNORE).all() and (y[:, y_w:] == IGNORE).all()
    full = SampleSet(src.cases(), "segment", 2, 1)
    assert len(full.items) == img.shape[1]
    assert choose_size(None, None, full.spatial_shapes(), 2) == (64, 48)


def test_sample_set_classification_resizes_whole_image(data_dir):
    cases = MiasFolder(data_dir / "mammography_mias").cases()[:2]
    ds = SampleSet(cases, "classify", 2, 3)
    ds.set_size((32, 32))
    item = ds[1]
    assert item["image"].shape == (3, 32, 32) and int(item["label"]) == cases[1].class_label
    assert float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1


def test_flips_and_affine_keep_labels_consistent():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    y = x[:, 0].long()
    fx, fy = random_flips(x, y, (-1,), gen)
    for i in range(2):
        flipped = not torch.equal(fx[i], x[i])
        expected = x[i].flip(-1) if flipped else x[i]
        assert torch.equal(fx[i], expected) and torch.equal(fy[i], expected[0].long())
    img = torch.rand(4, 1, 24, 24)
    mask = torch.randint(0, 3, (4, 24, 24))
    ax, ay = random_affine(img, mask, torch.Generator().manual_seed(1), p=1.0)
    assert set(ay.unique().tolist()) <= {IGNORE, 0, 1, 2}
    assert (ay == IGNORE).any()  # rotated corners come from outside the image
    a1 = augment_batch(img, mask, torch.Generator().manual_seed(5))
    a2 = augment_batch(img, mask, torch.Generator().manual_seed(5))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    assert float(a1[0].min()) >= 0 and float(a1[0].max()) <= 1


def test_image_folder_with_labels_csv(data_dir, tmp_path):
    names = sorted(p.name for p in (data_dir / "mammography_mias").glob("*.png"))[:4]
    for n in names:
        (tmp_path / n).symlink_to(data_dir / "mammography_mias" / n)
    rows = ["image,label,group"] + [
        f"{n},{'dense' if i % 2 else 'fatty'},p{i // 2}" for i, n in enumerate(names)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    src = open_data(tmp_path)
    assert isinstance(src, ImageFolder) and src.task == "classify"
    assert src.class_names == ["dense", "fatty"]
    cases = src.cases()
    assert [c.class_label for c in cases] == [1, 0, 1, 0] and cases[0].group == cases[1].group == "p0"
    img, label = cases[1].load()
    assert img.shape == (1, 1024, 1024) and label == 0
