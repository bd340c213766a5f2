"""Full-resolution mammography pipeline on real mini-MIAS images (a few of them): breast crop, the labels'
``row`` convention, patch sampling, sliding-window heatmap, ``medssl predict --heatmap``, ``medssl evaluate``
on a tiny folder, woman-grouped folds and the grouped bootstrap."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from napari_medssl import mammo
from napari_medssl.engine import mammo_train as mt
from napari_medssl.engine.cli import main as cli_main
from napari_medssl.engine.data import mias_woman
from napari_medssl.engine.metrics import bootstrap_auc
from napari_medssl.engine.readers import read_image
from napari_medssl.models.registry import create_model, load_model, save_model
from napari_medssl.models.spec import attach_spec


@pytest.fixture(scope="module")
def mias(data_dir: Path) -> Path:
    return data_dir / "mammography_mias"


def test_findings_use_the_row_column_as_array_row(mias: Path) -> None:
    table = mammo.read_findings(mias / "labels.csv")
    assert table["mdb005"] == {"abnormal": True, "findings": [(891, 477, 30), (856, 500, 26)]}
    assert table["mdb006"] == {"abnormal": False, "findings": []}
    rows = {r["image"]: r for r in csv.DictReader(open(mias / "labels.csv"))}
    assert int(rows["mdb010.png"]["row"]) == 1024 - int(rows["mdb010.png"]["y_from_bottom"])
    assert table["mdb010"]["findings"][0][0] == int(rows["mdb010.png"]["row"])
    # findings given without a position make the image abnormal with no finding
    no_pos = [k for k, v in table.items() if v["abnormal"] and not v["findings"]]
    assert no_pos and all(k.startswith("mdb") for k in no_pos)


def test_breast_crop_drops_padding_and_label(mias: Path) -> None:
    img = read_image(mias / "mdb005.png").data
    crop = mammo.breast_crop(img)
    y0, y1, x0, x1 = crop.box
    assert crop.shape == img.shape and crop.image.shape == (y1 - y0, x1 - x0) == crop.mask.shape
    assert crop.image.dtype == np.float32 and 0.0 <= crop.image.min() and crop.image.max() <= 1.0
    assert (x1 - x0) < 0.8 * img.shape[1]  # the black padding beside the breast is gone
    # everything outside the mask is bright only in small bits (the film label), never the breast
    full = np.zeros(img.shape, bool)
    full[y0:y1, x0:x1] = crop.mask
    assert (img[~full] > 60).mean() < 0.02
    assert crop.mask.mean() > 0.5  # the crop is mostly breast
    # both findings lie in the breast, at the csv's row
    for r, c, _ in mammo.read_findings(mias / "labels.csv")["mdb005"]["findings"]:
        assert full[r, c]
    with pytest.raises(ValueError, match="empty"):
        mammo.breast_crop(np.zeros((64, 64), np.uint8))


def _synthetic_image() -> mammo.MammoImage:
    """A flat 'breast' with one bright disc at a known finding (row 300, x 200, radius 20)."""
    img = np.full((600, 400), 0.3, np.float32)
    yy, xx = np.mgrid[:600, :400]
    img[(yy - 300) ** 2 + (xx - 200) ** 2 <= 20**2] = 1.0
    crop = mammo.BreastCrop(img, np.ones_like(img, bool), (0, 600, 0, 400), (600, 400))
    return mammo.MammoImage("mdb001", "woman001", True, crop, [(300, 200, 20)])


def test_patch_sampler_finding_and_normal_patches() -> None:
    sampler = mammo.PatchSampler([_synthetic_image()], patch=128, jitter=32, seed=0)
    x, y = sampler.batch(64)
    assert x.shape == (64, 1, 128, 128) and x.dtype == torch.float32
    has_disc = (x == 1.0).flatten(1).sum(1) > 0.5 * np.pi * 20**2
    assert y.sum() > 10 and (y == 0).sum() > 10
    assert has_disc[y == 1].all()  # finding patches hold the finding (flipped or not)
    assert not (x[y == 0] == 1.0).any()  # normal patches keep away from it
    x, y = sampler.batch(8, labelled=False)
    assert (y == -1).all()


class _Bright(torch.nn.Module):
    """A 'classifier' whose abnormal logit is a window's brightest-pixel count (for pipeline tests)."""

    input_size = (128, 128)
    task = "classify"

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        attach_spec(self)  # the model contract every create_model model carries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x > 0.9).float().flatten(1).mean(1, keepdim=True) * 50 * self.w - 2
        return torch.cat([torch.zeros_like(s), s], 1)


def test_sliding_window_heatmap_peaks_on_the_finding() -> None:
    im = _synthetic_image()
    res = mammo.score_crop(_Bright(), im.crop, {"stride": 96})
    assert res["heatmap"].shape == im.crop.image.shape and res["heatmap"].dtype == np.float32
    assert mammo.inside_finding(res["peak"], im.findings, 16)
    assert res["score"] > 0.5
    assert mammo.aggregate(np.array([0.1, 0.9, 0.5]), "max") == pytest.approx(0.9)
    assert mammo.aggregate(np.array([0.1, 0.9, 0.5]), "topk", 2) == pytest.approx(0.7)


def _tiny_classifier(path: Path, trained_on: list[str] | None = None) -> Path:
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny", img_size=128, patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=2
    )
    extra = {"task": "classify", "class_names": ["normal", "abnormal"], "mammo": dict(mammo.DEFAULT_PIPELINE)}
    return save_model(model, path, {**extra, "trained_on": trained_on or []})


def _predict(ckpt: Path, image: Path, out: Path, heatmap: Path) -> int:
    args = ["predict", "--model", str(ckpt), "--input", str(image), "--output", str(out / "p.json")]
    return cli_main([*args, "--heatmap", str(heatmap), "--device", "cpu"])


def test_predict_heatmap_on_the_input_grid(mias: Path, test_output: Path, capsys) -> None:
    out = test_output / "mammo_predict"
    ckpt = _tiny_classifier(out / "tiny.safetensors")
    assert _predict(ckpt, mias / "mdb005.png", out, out / "h.tif") == 0
    probs = json.loads((out / "p.json").read_text())["mdb005.png"]["probabilities"]
    assert set(probs) == {"normal", "abnormal"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    heat = tifffile.imread(out / "h.tif")
    assert heat.shape == (1024, 1024) and heat.dtype == np.float32
    assert heat.max() > 0 and heat[:, :40].max() == 0  # zero on the padding beside the breast
    assert _predict(ckpt, mias / "mdb005.png", out, out / "h.png") == 1
    assert ".tif" in capsys.readouterr().err


def test_evaluate_auc_on_a_tiny_folder(mias: Path, test_output: Path) -> None:
    folder = test_output / "mammo_tiny_mias"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    keep = ["mdb005.png", "mdb006.png", "mdb007.png", "mdb010.png"]
    rows = [r for r in csv.DictReader(open(mias / "labels.csv")) if r["image"] in keep]
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in keep:
        shutil.copy(mias / name, folder / name)
    ckpt = _tiny_classifier(folder.parent / "mammo_tiny.safetensors")
    out = folder.parent / "mammo_eval.json"
    assert (
        cli_main(
            ["evaluate", "--model", str(ckpt), "--data", str(folder), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert m["n_images"] == 4 and m["n_abnormal"] == 2 and m["n_marked"] == 2
    assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["peak_hit_rate"] <= 1.0
    scores = {r["id"]: r["score"] for r in res["per_image"]}
    pos = [scores["mdb005"], scores["mdb010"]]
    neg = [scores["mdb006"], scores["mdb007"]]
    expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert m["auc"] == pytest.approx(expected)
    # --split val: the folder's images the checkpoint does not list as trained on
    ckpt = _tiny_classifier(folder.parent / "mammo_tiny_val.safetensors", ["mdb005", "mdb006"])
    args = ["evaluate", "--model", str(ckpt), "--data", str(folder), "--out", str(out), "--device", "cpu"]
    assert cli_main([*args, "--split", "val"]) == 0
    assert [r["id"] for r in json.loads(out.read_text())["per_image"]] == ["mdb007", "mdb010"]


def test_woman_folds_never_split_a_woman(mias: Path) -> None:
    table = mammo.read_findings(mias / "labels.csv")
    ids = sorted(table)
    women = [mias_woman(i) for i in ids]
    folds = mt.woman_folds(ids, women, [table[i]["abnormal"] for i in ids], k=5, seed=3)
    fold_of: dict[str, set[int]] = {}
    for w, f in zip(women, folds):
        fold_of.setdefault(w, set()).add(f)
    assert all(len(s) == 1 for s in fold_of.values())
    abn = np.bincount([f for f, i in zip(folds, ids) if table[i]["abnormal"]], minlength=5)
    assert abn.max() - abn.min() <= 3  # abnormal women spread evenly
    with pytest.raises(ValueError):
        mt.woman_folds(ids, women, [False] * len(ids), k=1)


def test_bootstrap_auc_resamples_groups() -> None:
    auc, lo, hi = bootstrap_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0]), ["a", "b", "c", "d"])
    assert (auc, lo, hi) == (1.0, 1.0, 1.0)
    auc, lo, hi = bootstrap_auc(
        np.r_[np.linspace(0, 1, 20), np.linspace(0.2, 1.2, 20)],
        np.r_[np.zeros(20), np.ones(20)],
        [str(i) for i in range(40)],
        n=300,
    )
    assert lo < auc < hi


def test_methods_pretrain_and_finetune_one_step() -> None:
    sampler = mammo.PatchSampler([_synthetic_image()], patch=128, seed=1)
    miram = mt.pretrain("miram", sampler, steps=1, batch_size=2)
    assert miram.hr_decoder.grid[0] * miram.hr_decoder.grid[1] >= 1024  # the Nystrom decoder's tokens
    clf = mt.classifier_from("miram", miram)
    assert torch.equal(clf.encoder.blocks[0].attn.qkv.weight, miram.encoder.blocks[0].attn.qkv.weight)
    mt.finetune(clf, sampler, steps=1, batch_size=2)
    assert clf(torch.rand(2, 1, 128, 128)).shape == (2, 2)
    with pytest.raises(ValueError):
        mt.pretrain("scratch", sampler, steps=1)


def test_cnn_method_trains_saves_loads_and_maps(tmp_path: Path) -> None:
    sampler = mammo.PatchSampler([_synthetic_image()], patch=128, seed=2, augment="strong")
    assert "cnn" in mt.SUPERVISED_ONLY
    with pytest.raises(ValueError):
        mt.pretrain("cnn", sampler, steps=1)
    torch.manual_seed(0)
    clf = mt.classifier_from("cnn", None, encoder={"embed_dim": 64})  # ViT sizes do not apply to the CNN
    assert clf.spec.name == "cnn_tiny" and clf.spec.task == "classify" and clf.spec.input_size is None
    before = clf.fc.weight.detach().clone()
    assert mt.finetune(clf, sampler, steps=2, batch_size=4, warmup=1) is clf
    assert not torch.equal(before, clf.fc.weight)  # two optimiser steps moved the head
    extra = {"task": "classify", "class_names": ["normal", "abnormal"], "mammo": dict(mammo.DEFAULT_PIPELINE)}
    back = load_model(save_model(clf, tmp_path / "cnn.safetensors", extra)).eval()  # BatchNorm: eval stats
    x = torch.rand(3, 1, 128, 128)
    assert torch.allclose(back(x), clf(x), atol=1e-6)
    im = _synthetic_image()
    res = mammo.score_crop(back, im.crop, mammo.pipeline_of(back))
    assert res["heatmap"].shape == im.crop.image.shape and res["heatmap"].dtype == np.float32
    assert 0.0 <= res["score"] <= 1.0


def test_strong_augmentation_keeps_labels_and_range() -> None:
    with pytest.raises(ValueError, match="augment"):
        mammo.PatchSampler([_synthetic_image()], augment="mixup")
    plain = mammo.PatchSampler([_synthetic_image()], patch=128, seed=3)
    strong = mammo.PatchSampler([_synthetic_image()], patch=128, seed=3, augment="strong")
    xp, yp = plain.batch(32)
    xs, ys = strong.batch(32)
    assert torch.equal(yp, ys)  # the same draws, only the pixels change
    assert xs.shape == xp.shape and xs.dtype == torch.float32 and 0.0 <= xs.min() and xs.max() <= 1.0
    assert not torch.equal(xs, xp)
    # background (0) stays 0: the amount of zero pixels per patch is unchanged by transpose and gamma
    assert torch.equal((xs == 0).flatten(1).sum(1), (xp == 0).flatten(1).sum(1))


def test_hard_negative_mining_draws_the_decoy_never_the_finding() -> None:
    im = _synthetic_image()
    im.crop.image[60:100, 60:340] = 0.95  # a bright band of normal tissue, far from the finding (row 300)
    sampler = mammo.PatchSampler([im], patch=128, seed=4)
    cands = sampler.normal_candidates(stride=64)
    assert cands and all(not mammo.inside_finding((y, x), im.findings, 96) for _, y, x in cands)
    hard = mt.mine_hard_negatives(_Bright(), sampler, per_image=2)
    assert len(hard) == 2 and all(abs(y - 80) < 64 for _, y, _ in hard)  # the decoy's windows
    with pytest.raises(ValueError, match="fraction"):
        sampler.set_hard_negatives(hard, 1.5)
    sampler.set_hard_negatives(hard, 1.0)
    normal = np.stack([sampler.normal_patch() for _ in range(20)])
    assert ((normal == np.float32(0.95)).reshape(20, -1).sum(1) > 1000).all()  # all hold the band now
    x, y = sampler.batch(32)
    assert (y == 0).any() and not (x[y == 0] == 1.0).any()  # and never the finding's disc
    # in the loop: mined once half-way, logged, the classifier still trains
    lines: list[str] = []
    clf = mt.classifier_from("cnn", None)
    plain = mammo.PatchSampler([im], patch=128, seed=5)
    mt.finetune(clf, plain, steps=4, batch_size=4, warmup=1, log=lines.append, hard_rounds=1)
    assert plain.hard and plain.hard_fraction == 0.5
    assert any("hard negatives mined" in ln for ln in lines)


def test_reduced_scale_crop_maps_back_to_the_input_grid(mias: Path) -> None:
    raw = np.zeros((700, 500), np.float32)
    raw[50:650, 60:460] = 0.3  # the 'breast' inside black padding
    yy, xx = np.mgrid[:700, :500]
    raw[(yy - 350) ** 2 + (xx - 260) ** 2 <= 24**2] = 1.0  # a finding at row 350, x 260
    full = mammo.breast_crop(raw)
    half = mammo.breast_crop(raw, scale=2)
    assert half.scale == 2 and half.box == full.box
    assert half.image.shape == tuple((n + 1) // 2 for n in full.image.shape)
    assert half.to_input((0, 0)) == (full.box[0] + 1, full.box[2] + 1)  # a block's centre
    res = mammo.score_image(_Bright(), raw, {"scale": 2, "stride": 48})
    assert res["heatmap"].shape == raw.shape and res["heatmap"].dtype == np.float32
    assert (res["heatmap"][:50] == 0).all() and res["heatmap"][350, 260] > 0
    assert (res["peak"][0] - 350) ** 2 + (res["peak"][1] - 260) ** 2 <= (24 + 16) ** 2
    with pytest.raises(ValueError, match="scale"):
        mammo.reduce_crop(full, 0)
    # findings on the reduced grid: centre and radius halved, the peak test in input pixels
    (im,) = mammo.prepare_images(mias, ["mdb005"], scale=2)
    y0, _, x0, _ = im.crop.box
    assert im.findings[0] == ((891 - y0) // 2, (477 - x0) // 2, 15)
    r, c, _ = im.findings[0]
    assert mammo.peak_hit((r + 20, c), im, {"finding_margin": 16})  # 40 input px off: inside 30 + 16
    assert not mammo.peak_hit((r + 25, c), im, {"finding_margin": 16})  # 50 input px off: outside


class _Corner(_Bright):
    """A 'classifier' that looks at one corner only: its score changes with every rotation/reflection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0, :16, :16].mean((1, 2))[:, None] * 8 * self.w - 4
        return torch.cat([torch.zeros_like(s), s], 1)


def test_window_tta_averages_the_eight_symmetries() -> None:
    windows = np.zeros((2, 128, 128), np.float32)
    windows[0, :16, :16] = 1.0  # bright in the top-left corner only
    windows[1, -16:, -16:] = 1.0  # bottom-right
    plain = mammo.window_probabilities(_Corner(), windows)
    assert plain[0] > 0.9 and plain[1] < 0.1
    tta = mammo.window_probabilities(_Corner(), windows, tta=True)
    # 2 of the 8 symmetries (identity, transpose) keep the top-left corner in place, 2 bring the other there
    expect = (2 * plain[0] + 6 * plain[1]) / 8
    assert tta == pytest.approx([expect, expect], abs=1e-6)
