"""Inference: device choice, slice-by-slice and whole-volume segmentation, sliding windows, progress, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from napari_medssl import inference
from napari_medssl.io import read_nifti
from napari_medssl.models import create_model
from napari_medssl.models.spec import attach_spec
from napari_medssl.testing.training import TINY_UNET, TINY_VIT, one_thread  # noqa: F401
from napari_medssl.transforms import normalize_intensity


class PointwiseSegmenter(nn.Module):
    """A 1×1-convolution segmenter: its output at a voxel depends on that voxel only, so any tiling of the
    image must give exactly the whole-image result (a test double for the windowing arithmetic)."""

    task, spatial_dims, in_chans, num_classes = "segment", 2, 1, 3

    def __init__(self, input_size=None) -> None:
        super().__init__()
        self.input_size = input_size
        self.conv = nn.Conv2d(1, 3, 1)
        self.calls: list[tuple[int, ...]] = []
        attach_spec(self)  # the model contract every create_model model carries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        if self.input_size is not None:
            assert tuple(x.shape[2:]) == tuple(self.input_size)
        return self.conv(x)


@pytest.fixture(scope="module")
def hippo(data_dir) -> np.ndarray:
    return read_nifti(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz").data


def test_pick_device():
    assert inference.pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert inference.pick_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        inference.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            inference.pick_device("cuda")


def test_2d_model_segments_a_volume_slice_by_slice(hippo):
    torch.manual_seed(0)
    model = create_model("unet_tiny", **TINY_UNET).eval()
    labels = inference.segment(model, hippo)
    assert labels.shape == hippo.shape and labels.dtype == np.uint8
    x = torch.from_numpy(normalize_intensity(hippo))
    with torch.no_grad():
        for z in (0, hippo.shape[0] // 2):
            manual = model(x[z][None, None]).argmax(1)[0].numpy()
            np.testing.assert_array_equal(labels[z], manual)
        probs = inference.segment_probabilities(model, hippo, slice_axis=2)
        y = model(x.permute(2, 0, 1)[:, None]).softmax(1)  # slices along X
    assert probs.shape == (3, *hippo.shape)
    np.testing.assert_allclose(probs[:, :, :, 5], y[5].numpy(), atol=1e-5)


def test_3d_model_segments_the_whole_volume(hippo):
    model = create_model("unet_tiny", spatial_dims=3, **TINY_UNET).eval()
    probs = inference.segment_probabilities(model, hippo)
    with torch.no_grad():
        whole = model(torch.from_numpy(normalize_intensity(hippo))[None, None]).softmax(1)[0]
    np.testing.assert_allclose(probs, whole.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="3D model needs"):
        inference.segment(model, hippo[0])


def test_sliding_window_equals_whole_image_and_reports_progress():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(70, 90)).astype(np.float32)
    whole_model = PointwiseSegmenter()
    windowed = PointwiseSegmenter(input_size=(32, 32))
    windowed.load_state_dict(whole_model.state_dict())
    seen = []
    a = inference.segment_probabilities(whole_model, image)
    b = inference.segment_probabilities(
        windowed, image, batch_size=4, progress=lambda d, t: seen.append((d, t))
    )
    np.testing.assert_allclose(a, b, atol=1e-6)
    n_windows = sum(c[0] for c in windowed.calls)
    # window 32, step 24: rows start at 0, 24, 38 (3 windows), columns at 0, 24, 48, 58 (4 windows)
    assert n_windows == 3 * 4
    assert [d for d, _ in seen] == [1, 2, 3] and seen[-1] == (3, 3)  # 12 windows in batches of 4


def test_gaussian_window_weights_average_to_the_pointwise_result():
    """Gaussian-weighted windows (2.5D checkpoints) are a weighted mean: a pointwise model still gives the
    whole-image result, and the weights peak at the window's centre."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(2, 1, 70, 90)).astype(np.float32))
    model = PointwiseSegmenter()
    whole = inference._segment_batch(model, x, torch.device("cpu"), None)
    tiled = inference._segment_batch(model, x, torch.device("cpu"), (32, 32), 0.5, 4, gaussian=True)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)
    w = inference._window_weights((32, 32), gaussian=True)
    assert w.shape == (32, 32) and float(w.min()) >= 1e-3 and w[15:17, 15:17].min() > 0.99 > w[0, 0]


def test_cancel_stops_inference(hippo):
    model = create_model("unet_tiny", **TINY_UNET).eval()
    flag = threading.Event()
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        flag.set()

    with pytest.raises(inference.Cancelled):
        inference.segment(model, hippo, batch_size=4, progress=progress, cancel=flag)
    assert calls == [1]
    with pytest.raises(inference.Cancelled):
        inference.classify(create_model("vit_tiny", num_classes=2, **TINY_VIT), hippo, cancel=lambda: True)


def test_classify_images_volumes_and_rgb(data_dir):
    from napari_medssl.io import read_image

    mammogram = read_image(data_dir / "mammography_mias/mdb005.png").data
    model = create_model("vit_tiny", num_classes=2, **TINY_VIT).eval()
    p = inference.classify(model, mammogram)
    assert p.shape == (2,) and p.sum() == pytest.approx(1, abs=1e-5)
    x = torch.from_numpy(normalize_intensity(mammogram))[None, None]
    with torch.no_grad():
        manual = model(inference.resize(x, (32, 32))).softmax(1)[0].numpy()
    np.testing.assert_allclose(p, manual, atol=1e-5)
    volume = np.stack([mammogram[::8, ::8]] * 5)
    assert inference.classify(model, volume).shape == (5, 2)
    rgb_model = create_model("vit_tiny", num_classes=5, **{**TINY_VIT, "in_chans": 3}).eval()
    fundus = np.load(data_dir / "medmnist/retinamnist.npz")["val_images"][0]
    assert inference.classify(rgb_model, fundus).shape == (5,)
    assert inference.classify(rgb_model, mammogram).shape == (5,)  # gray repeated to RGB
    with pytest.raises(ValueError, match="cannot predict"):
        inference.predict(create_model("mae_tiny", **TINY_VIT), mammogram)


def test_mirror_tta_averages_the_flipped_passes(hippo):
    """``mirror=(-1,)`` = mean of the softmax of the volume and the un-flipped softmax of its X-flip."""
    torch.manual_seed(0)
    model = create_model("unet_tiny", **TINY_UNET).eval()
    vol = hippo[:6]
    plain = inference.segment_probabilities(model, vol)
    flipped = inference.segment_probabilities(model, vol[..., ::-1].copy())[..., ::-1]
    calls: list[tuple[int, int]] = []
    both = inference.segment_probabilities(
        model, vol, mirror=(-1,), progress=lambda d, t: calls.append((d, t))
    )
    np.testing.assert_allclose(both, (plain + flipped) / 2, atol=1e-6)
    assert calls == [(1, 2), (2, 2)]  # one forward per pass (6 slices, batch 8), both passes reported
    three = inference.segment_probabilities(model, vol, mirror=(-1, -2))  # X, Y and X+Y flips: 4 passes
    assert three.shape == plain.shape and np.allclose(three.sum(0), 1, atol=1e-5)
    with pytest.raises(ValueError, match="distinct"):
        inference.segment_probabilities(model, vol, mirror=(-1, 1))
    with pytest.raises(ValueError, match="out of range"):
        inference.segment_probabilities(model, vol, mirror=(-3,))
    assert inference.training_flip_axes(model) == ()
    attach_spec(model, {"train_config": {"augment": True, "flip_axes": [-1]}})
    assert inference.training_flip_axes(model) == (-1,)
    attach_spec(model, {"train_config": {"augment": False, "flip_axes": [-1]}})
    assert inference.training_flip_axes(model) == ()
