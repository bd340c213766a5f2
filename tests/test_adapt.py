"""Fast adaptation from painted slices (engine/adapt.py, slices25d.py, ``medssl finetune --labels``).

Real data: a crop of TCIA PGBM-001's T1 post-contrast series and its tumour mask, painted as the dock does
(tumour 2, the rest of each painted slice 1, other slices 0). Tiny budgets (a few steps, random-init U-Net):
these check the contract and the bad inputs, not the accuracy (benchmarks/bench_adapt.py measures that).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medssl import inference, io, slices25d, zoo
from napari_medssl.engine import adapt
from napari_medssl.engine.cli import main
from napari_medssl.engine.readers import read_any
from napari_medssl.testing.training import one_thread  # noqa: F401 (autouse fixture)

CROP = (slice(12, 22), slice(150, 294), slice(100, 244))  # 10 x 144 x 144 voxels around the tumour


def _study(data_dir: Path, date: str) -> tuple:
    folder = Path(glob.glob(str(data_dir / "dicom" / "tcia_btp_PGBM-001" / f"{date}*"))[0])
    return read_any(next(folder.glob("*T1post*"))), read_any(next(folder.glob("*MaskTumor*"))).data > 0


def _crop_affine(affine: np.ndarray) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in CROP]
    return affine @ shift


@pytest.fixture(scope="module")
def painted_crop(data_dir, tmp_path_factory) -> dict:
    """The cropped T1post and its painted labels (3 tumour slices) as NIfTI files on one grid."""
    img, mask = _study(data_dir, "04-02-1992")
    image, tumour = img.data[CROP], mask[CROP]
    painted = np.zeros(image.shape, np.uint8)
    rows = [z for z in range(len(tumour)) if tumour[z].any()][1:4]
    painted[rows] = np.where(tumour[rows], 2, 1)
    d = tmp_path_factory.mktemp("adapt")
    affine = _crop_affine(img.affine)
    io.write_nifti(d / "t1post.nii.gz", image, affine)
    io.write_nifti(d / "painted.nii.gz", painted, affine)
    return {"dir": d, "image": image, "painted": painted, "affine": affine, "spacing": img.spacing}


def finetune_argv(data, labels, model: str, out, max_steps: int) -> list[str]:
    """``medssl finetune --task segment --data ... --labels ... --model ... --out ... --max-steps ...``."""
    return [
        "finetune",
        "--task",
        "segment",
        "--data",
        str(data),
        "--labels",
        str(labels),
        "--model",
        model,
        "--out",
        str(out),
        "--max-steps",
        str(max_steps),
    ]


def test_cli_finetune_labels_then_predict(painted_crop, data_dir, tmp_path, capsys):
    d = painted_crop["dir"]
    before = (d / "painted.nii.gz").read_bytes()
    out = tmp_path / "run"
    argv = finetune_argv(d / "t1post.nii.gz", d / "painted.nii.gz", "unet_tiny", out, 3)
    argv += ["--max-minutes", "5", "--batch-size", "2"]
    assert main(argv) == 0
    assert (d / "painted.nii.gz").read_bytes() == before  # nothing the user painted is touched
    model = zoo.load(out / "best.safetensors")
    conv = slices25d.conventions(model)
    assert conv == slices25d.Conventions(
        context=1, in_plane_mm=1.0, train_factor=conv.train_factor, coords=True, roi=conv.roi, window=96
    )
    # the painted tumour's box in patient coordinates, from the crop's own affine
    rows = np.argwhere(painted_crop["painted"] == 2)
    ras = painted_crop["affine"] @ np.c_[rows, np.ones(len(rows))].T
    low, high = conv.roi["boxes"]["1"]
    np.testing.assert_allclose(low, ras[:3].min(1), atol=0.01)
    np.testing.assert_allclose(high, ras[:3].max(1), atol=0.01)
    assert conv.roi["margin_mm"] == 12.0
    assert conv.train_factor == pytest.approx(np.mean(painted_crop["spacing"][1:]) / 1.0)
    assert model.in_chans == 5 and model.num_classes == 2  # 3 slices + row and column positions
    record = json.loads((out / "adapt.json").read_text())
    assert record["steps"] == 3 and record["painted_slices"] == [
        int(z) for z in np.flatnonzero(painted_crop["painted"].reshape(10, -1).any(1))
    ]
    # predict on the same crop and on the whole other study (another grid, another size): labels on its grid
    pred = tmp_path / "pred.nii.gz"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "best.safetensors"),
                "--input",
                str(d / "t1post.nii.gz"),
                "--output",
                str(pred),
            ]
        )
        == 0
    )
    got = read_any(pred)
    assert got.data.shape == painted_crop["image"].shape and set(np.unique(got.data)) <= {0, 1}
    np.testing.assert_allclose(got.affine, painted_crop["affine"], atol=1e-3)
    other = Path(glob.glob(str(data_dir / "dicom" / "tcia_btp_PGBM-001" / "11-19-1991*" / "*T1post*"))[0])
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "best.safetensors"),
                "--input",
                str(other),
                "--output",
                str(tmp_path / "other.nii.gz"),
            ]
        )
        == 0
    )
    assert read_any(tmp_path / "other.nii.gz").data.shape == read_any(other).data.shape


def test_first_checkpoint_comes_before_training_ends_and_previews(painted_crop, tmp_path):
    cfg = adapt.AdaptConfig(
        out_dir=str(tmp_path),
        model="unet_tiny",
        max_steps=4,
        batch_size=2,
        crop=64,
        first_checkpoint_s=0.0,
        checkpoint_every_s=1e9,
        preview_slice=4,
        max_minutes=5,
    )
    kinds, files_at_first = [], None
    for ev in adapt.adapt_events(painted_crop["image"], painted_crop["painted"], cfg, (0.69, 0.69)):
        kinds.append(ev["event"])
        if ev["event"] == "checkpoint" and files_at_first is None:
            files_at_first = Path(ev["path"]).is_file()
            assert ev["step"] == 1  # written after the first step, long before the run ends
        if ev["event"] == "preview":
            assert ev["labels"].shape == painted_crop["image"].shape[1:] and ev["slice"] == 4
            assert set(np.unique(ev["labels"])) <= {0, 2}  # painted-value convention: class 1 shows as 2
    assert files_at_first and kinds[-1] == "done" and kinds.count("step") == 4
    assert kinds.index("checkpoint") < kinds.index("step", 1) and "preview" in kinds


def test_inference_applies_recorded_conventions(painted_crop, tmp_path):
    """A checkpoint's 2.5D conventions (context, in-plane spacing) are applied by inference.segment."""
    model = zoo.load(_tiny_run(painted_crop, tmp_path))
    image = painted_crop["image"]
    conv = slices25d.conventions(model)
    vol = slices25d.normalized_slices(image, conv.factor((0.69, 0.69)))
    assert vol.shape[1:] == slices25d.scaled_shape(image.shape[1:], 0.69)
    stack = slices25d.model_inputs(vol, conv, torch.arange(len(vol)))
    assert torch.equal(stack[0, 0], vol[0]) and torch.equal(stack[5, 2], vol[6])  # edges repeat
    assert torch.equal(stack[9, 1], vol[9]) and torch.equal(stack[9, 2], vol[9])
    assert stack[0, 3, 0, 0] == 0 and stack[0, 3, -1, 0] == 1 and stack[0, 4, 0, -1] == 1  # row, column
    # the training crop is recorded: a larger slice is predicted by windows of that size only
    assert conv.window == 64 and max(vol.shape[1:]) > 64
    sizes: list[tuple[int, ...]] = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[2:])))
    probs = inference.segment_probabilities(model, image, spacing=(6.5, 0.69, 0.69))
    hook.remove()
    assert sizes and set(sizes) == {(64, 64)}
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    # without the spacing the training's own scale factor is used: the same result for this image
    np.testing.assert_allclose(inference.segment_probabilities(model, image), probs, atol=1e-5)
    # a checkpoint without a recorded window (older ones) is predicted whole, slice by slice
    model.spec.extra[slices25d.KEY].pop("window")
    with torch.inference_mode():
        expected = torch.softmax(model(stack[3:4]), 1)[0]
    expected = torch.nn.functional.interpolate(expected[None], size=image.shape[1:], mode="bilinear")[0]
    whole = inference.segment_probabilities(model, image, spacing=(6.5, 0.69, 0.69))
    np.testing.assert_allclose(whole[:, 3], expected.numpy(), atol=1e-4)


def _tiny_run(painted_crop: dict, out: Path) -> Path:
    cfg = adapt.AdaptConfig(out_dir=str(out), model="unet_tiny", max_steps=1, batch_size=2, crop=64)
    events = list(adapt.adapt_events(painted_crop["image"], painted_crop["painted"], cfg, (0.69, 0.69)))
    return Path(events[-1]["best_path"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("nothing", "nothing is painted"),
        ("background_only", "only background (label 1) is painted"),
        ("class_only", "only one class (label 2) is painted"),
        ("other_shape", "differs from the image's"),
        ("other_grid", "voxel positions differ"),
        ("model_3d", "is a 3D model"),
        ("model_vit", "not 'segment'"),
    ],
)
def test_bad_inputs_refused_before_training(painted_crop, tmp_path, capsys, case, message):
    d = painted_crop["dir"]
    painted = painted_crop["painted"].copy()
    affine = painted_crop["affine"]
    model = "unet_tiny"
    if case == "nothing":
        painted[:] = 0
    elif case == "background_only":
        painted[painted == 2] = 1
    elif case == "class_only":
        painted[painted == 1] = 0
    elif case == "other_shape":
        painted = painted[:, :-4]
    elif case == "other_grid":
        affine = affine.copy()
        affine[:3, 3] += 3.0  # the same shape, 3 mm away: another series
    elif case == "model_3d":
        model = "unet_tiny_3d_hippocampus"
    elif case == "model_vit":
        model = "scratch_vit_tiny_mias"
    labels = io.write_nifti(tmp_path / "labels.nii.gz", painted, affine)
    before = Path(labels).read_bytes()
    out = tmp_path / "run"
    argv = finetune_argv(d / "t1post.nii.gz", labels, model, out, 2) + ["--max-minutes", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (out / "best.safetensors").exists()  # refused before any training
    assert Path(labels).read_bytes() == before


def test_roi_moves_probability_outside_the_box_to_background():
    affine = np.diag([5.0, 1.0, 1.0, 1.0])
    labels = -np.ones((6, 20, 20), int)
    labels[2, 5:8, 5:8] = 1
    labels[2, 0, 0] = 0
    roi = slices25d.painted_boxes(labels, affine, margin_mm=2.0)
    assert roi["boxes"] == {"1": [[10.0, 5.0, 5.0], [10.0, 7.0, 7.0]]}
    probs = np.stack([np.full((6, 20, 20), 0.3), np.full((6, 20, 20), 0.7)]).astype(np.float32)
    slices25d.apply_roi(probs, roi, affine)
    assert probs[1, 2, 3:10, 3:10].min() == pytest.approx(0.7) and probs[1, 2, 10:].max() == 0
    assert probs[1, 1].max() == 0 and probs[1, 3].max() == 0  # 5 mm away > 2 mm margin
    np.testing.assert_allclose(probs.sum(0), 1.0)


def test_roi_on_the_painted_grid_keeps_only_what_is_near_the_paint():
    """An L-shaped structure: its box holds a far corner that the paint never came near. On the painted grid
    the far corner goes to background (farther than near_mm from every painted voxel); on another grid (a
    follow-up study) only the widened box applies."""
    affine = np.diag([5.0, 1.0, 1.0, 1.0])
    labels = -np.ones((6, 40, 40), int)
    labels[2] = 0
    labels[2, 5:30, 5:8] = 1  # vertical bar
    labels[2, 27:30, 5:30] = 1  # horizontal bar: the box spans 5..29 × 5..29
    roi = slices25d.painted_boxes(labels, affine, margin_mm=2.0, near_mm=4.0)
    assert roi["near_mm"] == 4.0 and roi["grid"]["shape"] == [6, 40, 40]
    assert 0 < len(roi["points"]["1"]) <= 4000
    probs = np.stack([np.full((6, 40, 40), 0.3), np.full((6, 40, 40), 0.7)]).astype(np.float32)
    same = slices25d.apply_roi(probs.copy(), roi, affine)
    assert same[1, 2, 10, 6] == pytest.approx(0.7) and same[1, 2, 28, 20] == pytest.approx(0.7)
    assert same[1, 2, 8, 25] == 0  # inside the box, 17 mm from the paint
    assert same[1, 1, 28, 20] == 0  # the next slice is 5 mm away > 4 mm
    np.testing.assert_allclose(same.sum(0), 1.0)
    moved = affine.copy()
    moved[0, 3] = 0.5  # another series in the same frame: the box rules
    other = slices25d.apply_roi(probs.copy(), roi, moved)
    assert other[1, 2, 8, 25] == pytest.approx(0.7)
    assert not slices25d.on_grid(roi, (6, 40, 40), moved) and slices25d.on_grid(roi, (6, 40, 40), affine)


def test_headers_describing_the_same_grid_pass():
    affine = np.diag([6.5, 0.69, 0.69, 1.0])
    jitter = affine.copy()
    jitter[:3, :3] += 1e-5  # float32 round-off in a NIfTI header
    adapt.check_grid((10, 20, 20), (10, 20, 20), affine, jitter, (6.5, 0.69, 0.69))
    with pytest.raises(ValueError, match="voxel positions differ"):
        shifted = affine.copy()
        shifted[1, 3] = 0.5
        adapt.check_grid((10, 20, 20), (10, 20, 20), affine, shifted, (6.5, 0.69, 0.69))


def test_widen_input_keeps_the_function_and_adds_channels():
    from napari_medssl.models import create_model

    torch.manual_seed(0)
    model = create_model("unet_tiny", in_chans=3, num_classes=2, levels=2).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        adapt.widen_input(model, 2)
        after = model(torch.cat([x, torch.rand(1, 2, 32, 32)], 1))
    assert model.in_chans == 5 and model.config["in_chans"] == 5
    torch.testing.assert_close(before, after)


def test_rgb_image_refused():
    with pytest.raises(ValueError, match="RGB"):
        adapt.preflight(np.zeros((64, 64, 3)), np.ones((64, 64), np.uint8), {"out_dir": "x"}, rgb=True)


def test_pretrained_start_keeps_its_encoder_and_gets_a_fresh_decoder(tmp_path):
    """The zoo's starting point: encoder weights as shipped, decoder and head re-initialised; a checkpoint
    already adapted from paint is continued whole."""
    image = np.random.default_rng(0).normal(size=(5, 40, 40)).astype(np.float32)
    shipped = zoo.load(adapt.DEFAULT_START)
    cfg = adapt.AdaptConfig(out_dir=str(tmp_path / "a"))
    model, _ = adapt.start_model(None, 2, image, cfg)
    ours, theirs = dict(model.named_parameters()), dict(shipped.named_parameters())
    enc = [n for n in theirs if n.startswith("encoders.1.")]
    dec = [n for n in theirs if n.startswith(("decoders.", "ups."))]
    assert enc and dec
    assert all(torch.equal(ours[n], theirs[n].float()) for n in enc)
    assert not any(torch.equal(ours[n], theirs[n].float()) for n in dec if ours[n].numel() > 1)

    painted = np.zeros(image.shape, np.uint8)
    painted[2] = 1
    painted[2, 10:20, 10:20] = 2
    run = adapt.AdaptConfig(out_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, crop=32)
    path = list(adapt.adapt_events(image, painted, run))[-1]["best_path"]
    again, _ = adapt.start_model(path, 2, image, adapt.AdaptConfig(out_dir=str(tmp_path / "b")))
    from napari_medssl.models.registry import load_model

    adapted = dict(load_model(path).named_parameters())
    cont = dict(again.named_parameters())
    assert all(torch.equal(cont[n], adapted[n]) for n in dec)


def test_uncertainty_follows_the_paint_prior(painted_crop, tmp_path):
    """A paint-adapted model's uncertainty is zero where its predictions are forced to background (far from
    the paint), so 'where to paint next' does not rank the volume's empty ends first."""
    from napari_medssl import uncertainty

    image, painted, affine = painted_crop["image"], painted_crop["painted"], painted_crop["affine"]
    cfg = adapt.AdaptConfig(out_dir=str(tmp_path), model="unet_tiny", max_steps=2, batch_size=2, crop=64)
    events = list(adapt.adapt_events(image, painted, cfg, (0.69, 0.69), affine))
    model = zoo.load(events[-1]["best_path"])
    assert slices25d.conventions(model).roi  # the painted region is recorded
    spacing = tuple(painted_crop["spacing"])
    free = uncertainty.uncertainty(model, image, spacing=spacing)
    held = uncertainty.uncertainty(model, image, spacing=spacing, affine=affine)
    probs = inference.segment_probabilities(model, image, spacing=spacing, affine=affine)
    forced = probs[1:].sum(0) == 0  # the prior's background
    painted_z = np.flatnonzero(painted.reshape(len(painted), -1).any(1))
    far = [z for z in range(len(image)) if np.abs(painted_z - z).min() >= 3]  # > 10 mm at 6.5 mm slices
    assert far and forced[far].all() and free.entropy[far].max() > 0
    assert held.entropy[forced].max() == 0 and held.mutual_information[forced].max() == 0
    np.testing.assert_array_equal(held.entropy[~forced], free.entropy[~forced])
    ranked = [z for z, _ in uncertainty.rank_slices(held.entropy, painted=painted)]
    assert not set(ranked[:2]) & set(far)
