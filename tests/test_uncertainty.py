"""Where to paint next (napari_medssl.uncertainty) with shipped hippocampus models on a real crop: the
uncertainty concentrates on the model's errors, an ensemble scores by its members, slices rank without the
painted ones, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medssl import io, uncertainty, zoo


@pytest.fixture(scope="module")
def case(data_dir):
    torch.set_num_threads(1)
    image = io.read(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz")[0].data
    truth = io.read(data_dir / "hippocampus/labelsTr/hippocampus_001.nii.gz")[0].data
    return image, truth


def test_tta_uncertainty_is_high_where_the_model_errs(case):
    image, truth = case
    model = zoo.load("unet_tiny_hippocampus")
    u = uncertainty.uncertainty(model, image)
    assert u.method == "tta" and u.samples[:6] == uncertainty.TTA
    assert "mirror x" in u.samples  # its training flipped along x, so mirroring along x is a fair sample
    assert u.entropy.shape == image.shape and u.probabilities.shape == (3, *image.shape)
    assert 0 <= u.mutual_information.min() and u.mutual_information.max() <= u.entropy.max() <= 1
    np.testing.assert_allclose(u.probabilities.sum(0), 1, atol=1e-4)
    wrong = u.probabilities.argmax(0) != truth
    assert wrong.any()
    # the model is unsure where it is wrong: 10x the entropy of the voxels it gets right
    assert u.entropy[wrong].mean() > 10 * u.entropy[~wrong].mean()
    assert u.mutual_information[wrong].mean() > 10 * u.mutual_information[~wrong].mean()


def test_an_ensemble_scores_by_its_members_and_slices_rank_without_painted_ones(case):
    image, truth = case
    model = zoo.load("ensemble_tiny_hippocampus")
    u = uncertainty.uncertainty(model, image)
    assert u.method == "ensemble" and len(u.samples) == 3
    ranked = uncertainty.rank_slices(u.entropy)
    assert [i for i, _ in ranked] == list(np.argsort(-u.entropy.mean((1, 2)), kind="stable"))
    top = ranked[0][0]
    assert truth[top].any()  # the most uncertain slice holds hippocampus (the boundary is where doubt lives)
    painted = np.zeros_like(truth)
    painted[top, 3, 3] = 1
    again = uncertainty.rank_slices(u.entropy, painted=painted, top=5)
    assert len(again) == 5 and top not in [i for i, _ in again] and again[0] == ranked[1]


def test_bad_input_is_refused(case):
    image, _ = case
    with pytest.raises(ValueError, match="segmenter"):
        uncertainty.uncertainty(zoo.load("scratch_vit_tiny_mias"), image[0])
    unet = zoo.load("unet_tiny_hippocampus")
    with pytest.raises(ValueError, match="ensemble model"):
        uncertainty.uncertainty(unet, image, method="ensemble")
    with pytest.raises(ValueError, match="unknown uncertainty method"):
        uncertainty.uncertainty(unet, image, method="dropout")
    with pytest.raises(ValueError, match="not on the image's grid"):
        uncertainty.rank_slices(np.zeros((4, 5, 6)), painted=np.zeros((4, 5, 7)))
    with pytest.raises(ValueError, match=r"\(Z, Y, X\) map"):
        uncertainty.rank_slices(np.zeros((5, 6)))
