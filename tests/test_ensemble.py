"""Segmentation ensembles: the mean of 2D and 3D members' probabilities, each run as it runs alone.

Real data: hippocampus volumes and the zoo's trained segmenters; the arithmetic is checked against running each
member through :mod:`napari_medssl.inference` on its own.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medssl import inference, zoo
from napari_medssl.engine import train
from napari_medssl.engine.cli import main
from napari_medssl.engine.evaluate import evaluate
from napari_medssl.models import create_model, load_model, save_model
from napari_medssl.models.ensemble import from_checkpoints
from napari_medssl.testing.training import small_msd


@pytest.fixture(scope="module")
def volume(data_dir) -> np.ndarray:
    path = sorted((data_dir / "hippocampus" / "imagesTr").glob("*.nii.gz"))[3]
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)  # odd sides, e.g. 35 x 51 x 35


def _member(tmp_path, name: str, seed: int, dims: int, extra: dict) -> str:
    torch.manual_seed(seed)
    kw = {"levels": 2} if name == "unet_tiny" else {}
    model = create_model(name, spatial_dims=dims, num_classes=3, **kw)
    path = tmp_path / f"{name}_{dims}d_{seed}.safetensors"
    save_model(model, path, extra={"task": "segment", "class_names": ["bg", "a", "p"], **extra})
    return str(path)


@pytest.fixture()
def members(tmp_path) -> list[str]:
    flips = {"train_config": {"augment": True, "flip_axes": [-1]}, "split_val": ["0:x"]}
    return [
        _member(tmp_path, "unet_tiny", 0, 2, {"sample_size": [48, 40], **flips}),
        _member(tmp_path, "unet_tiny", 1, 3, {"sample_size": [24, 32, 24], **flips}),  # sliding windows
        _member(tmp_path, "emfformer_tiny", 2, 3, {"split_val": ["0:x"]}),  # whole volume, no flips
    ]


def test_probabilities_are_the_weighted_mean_of_members_run_alone(members, volume):
    ens = from_checkpoints(members, weights=[1.0, 2.0, 1.0])
    assert ens.spatial_dims == 3 and ens.num_classes == 3 and ens.weights == [0.25, 0.5, 0.25]
    assert ens.checkpoint_extra["split_val"] == ["0:x"] and ens.checkpoint_extra["class_names"] == [
        "bg",
        "a",
        "p",
    ]
    alone = [inference.segment_probabilities(load_model(p), volume, device="cpu") for p in members]
    expected = 0.25 * alone[0] + 0.5 * alone[1] + 0.25 * alone[2]
    got = inference.segment_probabilities(ens, volume, device="cpu")
    assert got.shape == (3, *volume.shape)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
    labels = inference.segment(ens, volume, device="cpu")
    assert labels.shape == volume.shape and set(np.unique(labels)) <= {0, 1, 2}

    # mirroring TTA: each member along its own training flips (the EMF member recorded none)
    mirrored = [
        inference.segment_probabilities(load_model(p), volume, device="cpu", mirror=m)
        for p, m in zip(members, [(-1,), (-1,), ()])
    ]
    assert inference.training_flip_axes(ens) == (-1,)
    got_tta = inference.segment_probabilities(ens, volume, device="cpu", mirror=(-1,))
    np.testing.assert_allclose(
        got_tta, 0.25 * mirrored[0] + 0.5 * mirrored[1] + 0.25 * mirrored[2], atol=1e-5
    )


def test_forward_is_the_mean_run_whole_and_the_checkpoint_round_trips(members, volume, tmp_path):
    ens = from_checkpoints(members).eval()
    x = torch.from_numpy((volume - volume.mean()) / volume.std())[None, None]
    with torch.no_grad():
        got = ens(x).softmax(1)
        parts = []
        for m in ens.members:
            if m.spatial_dims == 2:  # slices along Z
                p = m(x[0].movedim(1, 0)).softmax(1).movedim(0, 1)[None]
            else:
                p = m(x).softmax(1)
            parts.append(p)
    torch.testing.assert_close(got, sum(parts) / 3, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="volumes"):
        ens(x[:, :, 0])

    path = tmp_path / "ens.safetensors"
    save_model(ens, path, extra=ens.checkpoint_extra)
    back = load_model(path)
    assert [type(m).__name__ for m in back.members] == ["UNet", "UNet", "EMFFormer"]
    assert back.members[1].checkpoint_extra["sample_size"] == [24, 32, 24]  # each member keeps its window
    np.testing.assert_allclose(
        inference.segment_probabilities(back, volume, device="cpu"),
        inference.segment_probabilities(ens, volume, device="cpu"),
        atol=1e-6,
    )


def test_bad_ensembles_are_refused_clearly(members, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        from_checkpoints(members[:1])
    torch.manual_seed(0)
    two = create_model("unet_tiny", levels=2, num_classes=2)
    save_model(two, tmp_path / "two.safetensors", extra={"task": "segment"})
    with pytest.raises(ValueError, match="disagree"):
        from_checkpoints([members[0], tmp_path / "two.safetensors"])
    cls = create_model("vit_tiny", num_classes=2, img_size=32, depth=1)
    save_model(cls, tmp_path / "cls.safetensors")
    with pytest.raises(ValueError, match="not a segmentation model"):
        from_checkpoints([members[0], tmp_path / "cls.safetensors"])
    ens = from_checkpoints(members[:2])
    save_model(ens, tmp_path / "ens.safetensors", extra=ens.checkpoint_extra)
    with pytest.raises(ValueError, match="ensemble itself"):
        from_checkpoints([members[0], tmp_path / "ens.safetensors"])
    with pytest.raises(ValueError, match="weights"):
        from_checkpoints(members[:2], weights=[1.0])
    with pytest.raises(ValueError, match="not trained or fine-tuned itself"):
        next(train(_finetune_config(tmp_path / "ens.safetensors", tmp_path)))


def _finetune_config(model, tmp_path):
    from napari_medssl.engine import ArrayData, TrainConfig

    data = ArrayData([np.zeros((8, 8), np.float32)] * 2, [np.zeros((8, 8), np.int64)] * 2)
    return TrainConfig(model=str(model), task="segment", data=data, out_dir=str(tmp_path / "r"), device="cpu")


def test_cli_builds_a_zoo_ensemble_that_scores_and_predicts_on_real_data(data_dir, tmp_path, capsys):
    out = tmp_path / "ens.safetensors"
    code = main(
        [
            "ensemble",
            "--model",
            "unet_tiny_hippocampus",
            "--model",
            "mim_tiny_hippocampus",
            "--out",
            str(out),
            "--fp16",
        ]
    )
    assert code == 0 and "2 members" in capsys.readouterr().out
    ens = zoo.load(str(out), device="cpu")
    assert ens.spatial_dims == 3 and len(ens.members) == 2
    msd = small_msd(data_dir, tmp_path / "msd", n=3)
    scored = evaluate(ens, msd, split="all", device="cpu", batch_size=16)["metrics"]
    singles = [
        evaluate(zoo.load(n, device="cpu"), msd, device="cpu", batch_size=16)["metrics"]
        for n in ("unet_tiny_hippocampus", "mim_tiny_hippocampus")
    ]
    # trained members: the average is a good segmentation, and not worse than the weaker member
    assert scored["mean_dice"] > 0.8 and scored["mean_dice"] >= min(s["mean_dice"] for s in singles) - 0.01
    case = sorted((msd / "imagesTr").iterdir())[0]
    pred = tmp_path / "pred.nii.gz"
    assert (
        main(["predict", "--model", str(out), "--input", str(case), "--output", str(pred), "--device", "cpu"])
        == 0
    )
    img, lab = nib.load(case), nib.load(pred)
    assert lab.shape == img.shape and np.allclose(lab.affine, img.affine)
    assert (
        main(["ensemble", "--model", "unet_tiny", "--model", "mim_tiny_hippocampus", "--out", str(out)]) == 1
    )
    assert "untrained" in capsys.readouterr().err
