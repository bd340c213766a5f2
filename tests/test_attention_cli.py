"""`medssl attention` on real images (TIFF per head on the input's grid, attention.json), the default
resolution rule, and the classifier saliency maps (Grad-CAM, rollout, deletion/insertion) on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from napari_medssl import explain
from napari_medssl import overlays as ov
from napari_medssl.engine.cli import main
from napari_medssl.models.registry import create_model, save_model


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory):
    """A small ViT with 8-px patches (2 blocks, 2 heads): the default grid depends on the patch size only."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit") / "vit.safetensors"
    save_model(create_model("vit_tiny", embed_dim=64, depth=2, num_heads=2), path)
    return path


def test_default_resolution_rule():
    assert ov.attention_input_size((1024, 1024), 8) == (512, 512)  # capped at 512 on a CPU: 64 x 64
    assert ov.attention_input_size((1024, 1024), 8, device="cuda") == (1024, 1024)
    assert ov.attention_input_size((320, 260), 8) == (632, 512)  # an MR slice: raised to 64 patches
    assert ov.attention_input_size((300, 300), 16) == (1024, 1024)  # 16-px patches need 1024 px
    assert ov.attention_input_size((1024, 800), 8, size=256) == (256, 200)  # the user's choice, aspect kept
    with pytest.raises(ValueError, match="over the limit"):
        ov.attention_input_size((1024, 1024), 8, size=4096)
    with pytest.raises(ValueError, match="at least one patch"):
        ov.attention_input_size((1024, 1024), 8, size=4)


def test_cli_writes_float32_heads_on_the_input_grid_and_json(data_dir, vit_ckpt, tmp_path, capsys):
    img = data_dir / "mammography_mias" / "mdb005.png"
    out = tmp_path / "attn"
    assert main(["attention", "--model", str(vit_ckpt), "--input", str(img), "--out", str(out)]) == 0
    rec = json.loads((out / "attention.json").read_text())
    assert rec["grid"] == [64, 64] and rec["input_size"] == [512, 512] and rec["shape"] == [1024, 1024]
    assert len(rec["tissue_lift"]) == 2 and rec["best_head"] in (0, 1)
    assert rec["settings"]["size"] is None and rec["settings"]["input"] == str(img)
    maps = []
    for h in (0, 1):
        m = tifffile.imread(out / f"head_{h}.tif")
        assert m.dtype == np.float32 and m.shape == (1024, 1024)
        assert (m >= 0).all() and m.max() > 0
        assert len(np.unique(m[:16, :16])) == 1  # one 8-px patch at 512 px covers 16 x 16 input pixels
        maps.append(m)
    plane = tifffile.imread(out / "head_0.tif")  # the lift in the JSON is the written maps' lift
    from napari_medssl.engine import readers

    image = np.asarray(readers.read_any(img).data, dtype=np.float64)
    assert np.allclose(ov.tissue_lift(np.stack(maps), image), rec["tissue_lift"], atol=1e-3)
    assert plane.shape == image.shape
    assert not (out / "mask_0.tif").exists()
    # one head, a size, masks
    one = tmp_path / "one"
    argv = ["attention", "--model", str(vit_ckpt), "--input", str(img), "--out", str(one)]
    assert main([*argv, "--head", "1", "--size", "128", "--threshold", "0.5"]) == 0
    rec = json.loads((one / "attention.json").read_text())
    assert rec["grid"] == [16, 16] and rec["heads"] == [1] and rec["settings"]["threshold"] == 0.5
    assert sorted(p.name for p in one.glob("*.tif")) == ["head_1.tif", "mask_1.tif"]
    mask = tifffile.imread(one / "mask_1.tif")
    assert mask.shape == (1024, 1024) and set(np.unique(mask)) == {0, 1}
    capsys.readouterr()
    assert main([*argv, "--head", "5"]) == 1
    assert "out of range" in capsys.readouterr().err


def test_cli_on_a_volume_takes_the_middle_or_the_asked_slice(data_dir, vit_ckpt, tmp_path, capsys):
    vol = data_dir / "dicom" / "tcia_btp_PGBM-005_T1post"
    out = tmp_path / "mr"
    argv = ["attention", "--model", str(vit_ckpt), "--input", str(vol), "--out", str(out)]
    assert main([*argv, "--size", "160"]) == 0
    rec = json.loads((out / "attention.json").read_text())
    z, y, x = rec["settings"]["shape"]
    assert rec["settings"]["slice"] == z // 2 and rec["shape"] == [y, x]
    assert tifffile.imread(out / "head_0.tif").shape == (y, x)
    assert main([*argv, "--size", "160", "--slice", "3"]) == 0
    assert json.loads((out / "attention.json").read_text())["settings"]["slice"] == 3
    capsys.readouterr()
    assert main([*argv, "--slice", "999"]) == 1
    assert "outside the volume" in capsys.readouterr().err


def test_shipped_dino_default_grid_and_a_tissue_head_on_a_mammogram(data_dir, tmp_path):
    """The zoo's dino_tiny_medical through the command as the goals measure it: 64 x 64 patches on a 1024²
    mammogram by default, one head on the breast (lift well above 1)."""
    out = tmp_path / "dino"
    img = data_dir / "mammography_mias" / "mdb017.png"  # held out from dino_tiny_medical's training
    assert main(["attention", "--model", "dino_tiny_medical", "--input", str(img), "--out", str(out)]) == 0
    rec = json.loads((out / "attention.json").read_text())
    assert rec["grid"][0] >= 64 and rec["grid"][1] >= 64
    assert rec["best_tissue_lift"] > 1.5 and min(rec["tissue_lift"]) < 1.0


# -- classifiers: Grad-CAM, rollout, deletion / insertion -----------------------------------------------------
@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return create_model("vit_tiny", embed_dim=64, depth=2, num_heads=2, num_classes=2).eval()


def test_saliency_shapes_and_rollout_mass(classifier):
    x = torch.rand(3, 1, 64, 64)
    for fn in (explain.grad_cam, explain.attention_rollout, explain.raw_attention):
        m = fn(classifier, x)
        assert m.shape == (3, 8, 8) and (m >= 0).all() and torch.isfinite(m).all()
    roll = explain.attention_rollout(classifier, x)
    assert (roll.sum(dim=(1, 2)) < 1).all() and (roll.sum(dim=(1, 2)) > 0).all()  # [CLS] keeps the rest
    with pytest.raises(ValueError, match="classifier"):
        explain.grad_cam(create_model("vit_tiny", embed_dim=64, depth=1, num_heads=2), x)


def test_grad_cam_is_class_specific(classifier):
    """With the second class's head row the negation of the first's, the two classes' Grad-CAMs split the
    patches between them: where one is positive the other is zero, and together they are |CAM|."""
    with torch.no_grad():
        classifier.head.weight[1] = -classifier.head.weight[0]
        classifier.head.bias.zero_()
    x = torch.rand(2, 1, 64, 64)
    c0, c1 = explain.grad_cam(classifier, x, target=0), explain.grad_cam(classifier, x, target=1)
    assert (c0 * c1).abs().max() < 1e-6
    assert (c0 > 0).any() and (c1 > 0).any()


def test_deletion_insertion_curves(classifier):
    x = torch.rand(1, 1, 64, 64)
    target = 0
    # the map that knows each patch's effect: occlusion (blur one patch, loss of the class probability)
    with torch.no_grad():
        base = explain._blur(x, 4.0)
        p0 = classifier(x).softmax(1)[0, target]
        one = torch.eye(64).reshape(64, 1, 8, 8).repeat_interleave(8, -2).repeat_interleave(8, -1)
        occluded = x * (1 - one) + base * one  # (64, 1, 64, 64): patch i blurred in image i
        effect = (p0 - classifier(occluded).softmax(1)[:, target]).reshape(8, 8)
    good = explain.deletion_insertion(classifier, x, effect, target)
    bad = explain.deletion_insertion(classifier, x, -effect, target)
    assert good["deletion"].shape == (65,) and good["insertion"].shape == (65,)
    assert good["deletion"][0] == pytest.approx(float(p0), abs=1e-5)  # nothing deleted: the image itself
    assert good["insertion"][-1] == pytest.approx(float(p0), abs=1e-5)  # everything inserted
    assert good["deletion_auc"] < bad["deletion_auc"]
    with pytest.raises(ValueError, match="does not match"):
        explain.deletion_insertion(classifier, x, effect[:4], target)


def test_dino_global_crops_smaller_than_the_image_size():
    """The higher-resolution recipe: 32-px global crops of 64-px images (local crops default to 3/7 of them)."""
    torch.manual_seed(0)
    model = create_model("dino_tiny", depth=1, out_dim=64, hidden_dim=32, img_size=64, global_size=32)
    assert model.input_size == (64, 64) and model.global_size == (32, 32) and model.local_size == (16, 16)
    out = model.pretrain_loss(torch.rand(2, 1, 64, 64))
    assert torch.isfinite(out["loss"])


def test_grouped_bootstrap_resamples_whole_groups():
    from napari_medssl.engine.metrics import grouped_bootstrap

    values = np.array([1.0, 1.0, 5.0, 5.0])  # each group's two cases are equal: medians only of 1, 3 or 5
    lo, hi = grouped_bootstrap(values, ["a", "a", "b", "b"], n=200)
    assert lo == 1.0 and hi == 5.0
    lo, hi = grouped_bootstrap(np.full((6, 2), 2.0), list("aabbcc"), np.mean, n=50)
    assert np.all(lo == 2.0) and np.all(hi == 2.0)


def test_deletion_insertion_coarse_steps_match_the_fine_curve(classifier):
    x = torch.rand(1, 1, 64, 64)
    sal = torch.rand(8, 8)
    fine = explain.deletion_insertion(classifier, x, sal, 1)
    coarse = explain.deletion_insertion(classifier, x, sal, 1, patches_per_step=4)
    assert coarse["deletion"].shape == (17,)
    assert torch.allclose(coarse["deletion"], fine["deletion"][::4], atol=1e-5)


def test_saliency_overlays_for_a_zoo_classifier_on_a_mammogram(data_dir):
    from napari_medssl import zoo
    from napari_medssl.io import read
    from napari_medssl.overlay_methods import method_for

    model = zoo.load("scratch_vit_tiny_mias").eval()
    assert method_for(model) == "Grad-CAM (classifier)"
    img = read(data_dir / "mammography_mias" / "mdb017.png")[0]
    plane = ov.take_plane(img.data, None, (0, 1), img.scale, img.translate)
    cam, roll, raw = ov.saliency_overlays(model, plane)
    assert cam.name.startswith("Grad-CAM (") and cam.metadata["class"] in ("normal", "abnormal")
    assert cam.metadata["grid"] == [8, 8] and cam.metadata["input_size"] == [64, 64]
    for ly in (cam, roll, raw):
        assert ly.data.shape == img.data.shape and ly.data.dtype == np.float32
        assert ly.data.min() >= 0 and ly.data.max() == pytest.approx(1.0)
    assert cam.style["visible"] and not roll.style["visible"]
    other = ov.saliency_overlays(
        model, plane, target=1 - ["normal", "abnormal"].index(cam.metadata["class"])
    )[0]
    assert other.metadata["class"] != cam.metadata["class"]
    with pytest.raises(ValueError, match="out of range"):
        ov.saliency_overlays(model, plane, target=5)
