"""Metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from napari_medssl.engine.metrics import (
    classification_metrics,
    dice_iou_case,
    roc_auc,
    segmentation_metrics,
)


def test_dice_iou_hand_checked_case():
    target = np.array([[0, 1, 1, 0], [0, 2, 2, 2]])
    pred = np.array([[0, 1, 0, 0], [1, 2, 2, 0]])
    out = dice_iou_case(pred, target, 3)
    # label 1: |P|=2, |T|=2, overlap 1 -> Dice 2·1/4, IoU 1/3
    assert out[1] == pytest.approx((0.5, 1 / 3))
    # label 2: |P|=2, |T|=3, overlap 2 -> Dice 4/5, IoU 2/3
    assert out[2] == pytest.approx((0.8, 2 / 3))
    metrics = segmentation_metrics([out])
    assert metrics["mean_dice"] == pytest.approx(0.65)
    assert metrics["mean_iou"] == pytest.approx(0.5)


def test_ignored_voxels_and_absent_labels():
    target = np.array([1, 1, 0, 0])
    pred = np.array([1, 0, 0, 1])
    ignore = np.array([False, True, False, True])  # the two wrong voxels are unlabelled
    out = dice_iou_case(pred, target, 3, ignore=ignore)
    assert out[1] == (1.0, 1.0)
    assert all(math.isnan(v) for v in out[2])  # label 2 absent from both: no score
    m = segmentation_metrics([out, {1: (0.5, 1 / 3), 2: (0.2, 0.1)}])
    assert m["dice_1"] == pytest.approx(0.75)
    assert m["dice_2"] == pytest.approx(0.2)  # the NaN case is left out, not counted as 1
    assert m["mean_dice"] == pytest.approx((0.75 + 0.2) / 2)


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.4
    pairs = list(itertools.product(scores[positive], scores[~positive]))
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert roc_auc(scores, positive) == pytest.approx(brute)
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert math.isnan(roc_auc(np.array([0.1, 0.9]), np.array([True, True])))


def test_classification_metrics_hand_checked():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])
    target = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(probs, target)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # recall class 0: 1/2, class 1: 2/3
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    # positives (.4, .7, .8) against negatives (.1, .55): 1 + 2 + 2 = 5 wins of 6 pairs
    assert m["auc"] == pytest.approx(5 / 6)
    three = classification_metrics(np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, -100]))
    assert three["accuracy"] == 1.0 and three["auc"] == 1.0 and three["n_samples"] == 3


def test_soft_dice_loss_matches_the_one_hot_formula_and_ignores_voxels():
    import torch
    import torch.nn.functional as F

    from napari_medssl.engine.augment import IGNORE
    from napari_medssl.engine.loop import soft_dice_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 5, requires_grad=True)
    y = torch.randint(0, 3, (2, 6, 5))
    y[0, :2] = IGNORE
    valid = (y != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits, 1) * valid
    onehot = F.one_hot(y.clamp(min=0), 3).movedim(-1, 1) * valid
    inter, denom = (probs * onehot).sum((0, 2, 3))[1:], (probs + onehot).sum((0, 2, 3))[1:]
    want = 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    got = soft_dice_loss(logits, y)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, logits)
    (g2,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g1, g2)
    perfect = torch.full((1, 3, 2, 2), -9.0).index_fill(
        1, torch.tensor([1]), 9.0
    )  # sure of class 1 everywhere
    assert soft_dice_loss(perfect, torch.ones(1, 2, 2, dtype=torch.long)).item() < 0.01
