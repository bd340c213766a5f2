"""Validation metrics in numpy: Dice/IoU per label for segmentation; accuracy, balanced accuracy, ROC-AUC.

Segmentation metrics are computed per case and averaged over cases (the Medical Segmentation Decathlon
convention). A label absent from both prediction and reference in a case has no Dice for that case (it is
left out of that label's average, not counted as 1). Voxels marked ``ignore`` count nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def dice_iou_case(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: np.ndarray | None = None
) -> dict[int, tuple[float, float]]:
    """Dice and IoU of each foreground label ``1 .. K-1`` in one case (NaN when absent from both).

    Args:
        pred: predicted labels, any shape.
        target: reference labels, same shape.
        num_classes: ``K`` (background included).
        ignore: boolean mask of voxels to leave out (unlabelled).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {target.shape}")
    if ignore is not None:
        keep = ~ignore
        pred, target = pred[keep], target[keep]
    out = {}
    for k in range(1, num_classes):
        p, t = pred == k, target == k
        inter = float(np.count_nonzero(p & t))
        sp, st = float(np.count_nonzero(p)), float(np.count_nonzero(t))
        if sp + st == 0:
            out[k] = (float("nan"), float("nan"))
        else:
            out[k] = (2 * inter / (sp + st), inter / (sp + st - inter))
    return out


def segmentation_metrics(
    per_case: list[dict[int, tuple[float, float]]], label_names: list[str] | None = None
) -> dict[str, float]:
    """Average per-case Dice/IoU: ``dice_<k>``, ``iou_<k>`` per label, then ``mean_dice``, ``mean_iou``.

    ``mean_*`` average the per-label means over foreground labels. Keys use the label value ``k``; names are
    reported separately by the caller.
    """
    if not per_case:
        raise ValueError("no cases to average")
    labels = sorted({k for case in per_case for k in case})
    out: dict[str, float] = {}
    dices, ious = [], []
    for k in labels:
        d = np.array([c[k][0] for c in per_case if k in c], dtype=float)
        i = np.array([c[k][1] for c in per_case if k in c], dtype=float)
        dk = float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")
        ik = float(np.nanmean(i)) if np.isfinite(i).any() else float("nan")
        out[f"dice_{k}"], out[f"iou_{k}"] = dk, ik
        dices.append(dk)
        ious.append(ik)
    out["mean_dice"] = float(np.nanmean(dices)) if np.isfinite(dices).any() else float("nan")
    out["mean_iou"] = float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")
    out["n_cases"] = float(len(per_case))
    return out


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the Mann–Whitney U statistic (ties count one half).

    Args:
        scores: higher = more likely positive, shape ``(N,)``.
        positive: booleans, shape ``(N,)``.

    Returns:
        AUC in [0, 1], or NaN when one of the two classes is missing.
    """
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=float)
    # average ranks (1-based) over runs of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(probs: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy`` (mean recall over classes present) and ``auc``.

    ``auc`` is the ROC-AUC of the positive class for two classes, else the mean one-vs-rest AUC over
    classes present. Samples whose target is negative (unlabelled) are left out.

    Args:
        probs: ``(N, K)`` class probabilities.
        target: ``(N,)`` class indices.
    """
    probs = np.asarray(probs, dtype=float)
    target = np.asarray(target).astype(int)
    keep = target >= 0
    probs, target = probs[keep], target[keep]
    if len(target) == 0:
        raise ValueError("no labelled samples to score")
    pred = probs.argmax(1)
    classes = np.unique(target)
    recalls = [float(np.mean(pred[target == k] == k)) for k in classes]
    if probs.shape[1] == 2:
        auc = roc_auc(probs[:, 1], target == 1)
    else:
        aucs = [roc_auc(probs[:, k], target == k) for k in classes]
        aucs = [a for a in aucs if np.isfinite(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    return {
        "accuracy": float(np.mean(pred == target)),
        "balanced_accuracy": float(np.mean(recalls)),
        "auc": auc,
        "n_samples": float(len(target)),
    }


def group_resamples(groups: list[str], n: int = 2000, seed: int = 0) -> Iterator[np.ndarray]:
    """``n`` bootstrap resamples of case indices: as many groups as there are, drawn with replacement, each
    bringing all its cases (a woman's two mammograms, a patient's slices)."""
    uniq = sorted(set(groups))
    members = {g: np.array([i for i, h in enumerate(groups) if h == g]) for g in uniq}
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([members[uniq[j]] for j in rng.integers(0, len(uniq), len(uniq))])


def bootstrap_auc(
    scores: np.ndarray, labels: np.ndarray, groups: list[str], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """AUC and its bootstrap 95 % interval, resampling groups (patients, women) with replacement."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    auc = roc_auc(scores, labels)
    vals = []
    for pick in group_resamples(groups, n, seed):
        if labels[pick].all() or not labels[pick].any():
            continue
        vals.append(roc_auc(scores[pick], labels[pick]))
    if not vals:
        return float(auc), float("nan"), float("nan")
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(auc), float(lo), float(hi)


def grouped_bootstrap(
    values: np.ndarray, groups: list[str], statistic: Any = np.median, n: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile 95 % interval of ``statistic(values[rows], axis=0)``, resampling groups (patients, women)
    with replacement; ``values`` ``(cases, ...)``; returns ``(low, high)`` with the trailing shape."""
    values = np.asarray(values, dtype=float)
    stats = [statistic(values[pick], axis=0) for pick in group_resamples(groups, n, seed)]
    lo, hi = np.percentile(np.array(stats), [2.5, 97.5], axis=0)
    return lo, hi
