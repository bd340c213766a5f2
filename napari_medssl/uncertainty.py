"""Where to paint next: a segmenter's voxel-wise uncertainty and the slices ranked by it.

MONAI Label's epistemic scoring, brought to napari: the model predicts the image several times under small
changes, and where the predictions disagree or are unsure the user should paint next.

Method (``method="auto"``):

- an ensemble (``model.is_ensemble``): its members' probabilities, each member run as it runs alone: a true
  ensemble of independently trained models;
- any other segmenter: **test-time augmentation** (:data:`TTA`): the image itself, two gamma changes of its
  contrast, two in-plane shifts, a little Gaussian noise, and mirrors along the axes the model's training
  flipped at random (none when it did not). Why not MC dropout: none of the plugin's segmenters has dropout
  layers (turning dropout on at test time in a model trained without it only adds noise). Why not an
  ensemble for a single model: K fine-tunes cost K times the one-minute budget; TTA costs K forward passes
  and works with every checkpoint, including a fast adaptation's.

From the ``S`` probability maps ``p_s`` (``(K, *spatial)``): the **entropy** of their mean (the predictive
entropy, total uncertainty) and the **mutual information** (BALD: entropy of the mean minus the mean entropy,
the part due to disagreement, i.e. epistemic), both divided by ``log K`` so they lie in ``[0, 1]``.
:func:`rank_slices` ranks slices by their mean score, leaving out slices already painted.

Pure numpy/torch through :mod:`napari_medssl.inference`; no napari or Qt. Axis legend: K classes, S samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_medssl.transforms import normalize_intensity

TTA = ("identity", "gamma 0.7", "gamma 1.4", "shift +", "shift -", "noise")
"""The test-time augmentations (plus mirrors along the model's training flip axes)."""

SHIFT_FRACTION = 1 / 32
"""In-plane shift, as a fraction of the smaller in-plane side (at least one voxel)."""
NOISE_STD = 0.03
"""Gaussian noise added to the intensities normalised to [0, 1]."""
SCORES = ("entropy", "mutual_information")

__all__ = ["SCORES", "TTA", "Uncertainty", "rank_slices", "uncertainty"]


@dataclass
class Uncertainty:
    """Voxel-wise uncertainty of a segmentation.

    Attributes:
        entropy: ``(*spatial)`` float32 in [0, 1]: predictive entropy of the mean probabilities / log K.
        mutual_information: ``(*spatial)`` float32 in [0, 1]: the samples' disagreement (BALD) / log K.
        probabilities: ``(K, *spatial)`` float32: the mean of the samples.
        method: ``"tta"`` or ``"ensemble"``.
        samples: The names of the samples (augmentations or members).
    """

    entropy: np.ndarray
    mutual_information: np.ndarray
    probabilities: np.ndarray
    method: str
    samples: tuple[str, ...]

    def score(self, name: str = "entropy") -> np.ndarray:
        """The map called ``name`` (one of :data:`SCORES`)."""
        if name not in SCORES:
            raise ValueError(f"unknown uncertainty score {name!r}; use one of {', '.join(SCORES)}")
        return getattr(self, name)


def _in_plane_axes(image: np.ndarray, model_dims: int, slice_axis: int) -> tuple[int, ...]:
    """Spatial axes of ``image`` (gray) to shift: the slice's two axes for a 2D model, all for a 3D one."""
    dims = image.ndim
    if model_dims == 3 or dims == 2:
        return tuple(range(dims))
    return tuple(a for a in range(dims) if a != slice_axis)


def _augmentations(
    image: np.ndarray, model: Any, slice_axis: int, mirror: tuple[int, ...], seed: int
) -> list[tuple[str, np.ndarray, Callable[[np.ndarray], np.ndarray]]]:
    """``(name, augmented image, undo on probabilities (K, *spatial))`` for each TTA sample."""
    axes = _in_plane_axes(image, model.spec.spatial_dims, slice_axis)
    step = max(1, int(round(min(image.shape[a] for a in axes) * SHIFT_FRACTION)))
    norm = normalize_intensity(image)
    rng = np.random.default_rng(seed)
    keep: Callable[[np.ndarray], np.ndarray] = lambda p: p  # noqa: E731
    out = []
    for name in TTA:
        if name == "identity":
            out.append((name, image, keep))
        elif name.startswith("gamma"):
            out.append((name, norm ** float(name.split()[1]), keep))
        elif name.startswith("shift"):
            s = step if name.endswith("+") else -step
            back = tuple(a + 1 for a in axes)
            out.append(
                (
                    name,
                    np.roll(image, (s,) * len(axes), axes),
                    lambda p, s=s, b=back: np.roll(p, (-s,) * len(b), b),
                )
            )
        elif name == "noise":
            out.append((name, norm + rng.normal(0, NOISE_STD, norm.shape).astype(np.float32), keep))
    for a in mirror:  # model-input axes counted from the end: -1 = X
        axis = image.ndim + int(a)
        out.append(
            (
                f"mirror {'zyx'[axis - image.ndim + 3]}",
                np.flip(image, axis),
                lambda p, x=axis: np.flip(p, x + 1),
            )
        )
    return out


def _scores(samples: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean probabilities, normalised predictive entropy and mutual information of ``S`` maps ``(K, ...)``."""
    eps = 1e-7
    k = samples[0].shape[0]
    mean = np.mean(samples, axis=0, dtype=np.float32)
    norm = np.float32(np.log(max(k, 2)))
    entropy = -(mean * np.log(mean + eps)).sum(0) / norm
    each = np.mean([-(p * np.log(p + eps)).sum(0) for p in samples], axis=0) / norm
    mi = np.clip(entropy - each, 0.0, None)
    return mean, np.clip(entropy, 0.0, 1.0).astype(np.float32), mi.astype(np.float32)


def uncertainty(
    model: Any,
    image: np.ndarray,
    *,
    method: str = "auto",
    device: Any = None,
    slice_axis: int = 0,
    batch_size: int = 8,
    spacing: tuple[float, ...] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    cancel: Any = None,
    affine: np.ndarray | None = None,
) -> Uncertainty:
    """Voxel-wise uncertainty of a segmenter on a gray image or volume (see the module docstring).

    Args:
        model: a ``"segment"`` model (an ensemble too).
        image: ``(Y, X)`` or ``(Z, Y, X)``, raw intensities.
        method: ``"auto"`` (members for an ensemble, else TTA), ``"tta"`` or ``"ensemble"``.
        device, slice_axis, batch_size, cancel: as :func:`napari_medssl.inference.segment_probabilities`.
        spacing: voxel size in mm, passed on to models that resample (2.5D conventions).
        seed: for the noise sample.
        progress: called as ``progress(done, total)`` with the forward passes of all samples.
        affine: the volume's index → RAS mm matrix. For a model adapted from paint (2.5D conventions with a
            painted region, :mod:`napari_medssl.slices25d`) the scores are zero where its predictions are
            forced to background (far from the paint), as its predictions are: the ranking then points at
            slices where the model could still change its answer, not at the volume's empty ends.

    Raises:
        ValueError: not a segmenter, an RGB image, ``"ensemble"`` for a single model, or an unknown method.
        napari_medssl.inference.Cancelled: ``cancel`` turned true.
    """
    from napari_medssl import inference

    if model.spec.task != "segment":
        raise ValueError(f"uncertainty needs a segmenter; this model's task is {model.spec.task!r}")
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4):
        raise ValueError(f"uncertainty takes a gray 2D image or a (Z, Y, X) volume, got shape {image.shape}")
    ensemble = model.spec.is_ensemble
    if method == "auto":
        method = "ensemble" if ensemble else "tta"
    if method not in ("tta", "ensemble"):
        raise ValueError(f"unknown uncertainty method {method!r}; use auto, tta or ensemble")
    if method == "ensemble" and not ensemble:
        raise ValueError(
            "method 'ensemble' needs an ensemble model (medssl ensemble); use 'tta' for one model"
        )
    kw: dict[str, Any] = dict(device=device, slice_axis=slice_axis, batch_size=batch_size, rgb=False)
    if spacing is not None and "spacing" in inspect.signature(inference.segment_probabilities).parameters:
        kw["spacing"] = tuple(spacing)  # models with 2.5D conventions resample in-plane (slices25d)
    if method == "ensemble":
        runs = [(f"member {i}", m, image, None) for i, m in enumerate(model.members)]
    else:
        mirror = inference.training_flip_axes(model)
        runs = [
            (n, model, img, undo) for n, img, undo in _augmentations(image, model, slice_axis, mirror, seed)
        ]
    samples, names = [], []
    for i, (name, member, img, undo) in enumerate(runs):

        def report(done: int, total: int, i: int = i) -> None:
            if progress is not None:
                progress(i * total + done, len(runs) * total)

        p = inference.segment_probabilities(member, img, progress=report, cancel=cancel, **kw)
        samples.append(undo(p) if undo is not None else p)
        names.append(name)
    mean, entropy, mi = _scores(samples)
    allowed = _painted_region(model, image, slice_axis, affine)
    if allowed is not None:
        entropy, mi = entropy * allowed, mi * allowed
    return Uncertainty(entropy, mi, mean, method, tuple(names))


def _painted_region(model: Any, image: np.ndarray, slice_axis: int, affine: np.ndarray | None) -> np.ndarray | None:
    """Where a paint-adapted 2.5D model may predict a structure (its recorded painted region on this grid),
    as a float mask; ``None`` when nothing restricts it (no region, no affine, a 2D image, another axis)."""
    from napari_medssl import slices25d

    conv = None if model.spec.is_ensemble else slices25d.conventions(model)
    if conv is None or not conv.roi or affine is None or np.ndim(image) != 3 or slice_axis != 0:
        return None
    k = int(model.spec.num_classes)
    probs = np.zeros((k, *np.shape(image)), np.float32)
    probs[1:] = 1.0
    slices25d.apply_roi(probs, conv.roi, affine)
    return (probs[1:].max(0) > 0).astype(np.float32)


def rank_slices(
    score: np.ndarray, axis: int = 0, painted: np.ndarray | None = None, top: int | None = None
) -> list[tuple[int, float]]:
    """Slices along ``axis`` by their mean score, highest first; slices with a painted voxel left out.

    Args:
        score: ``(Z, Y, X)`` map (:attr:`Uncertainty.entropy` or ``mutual_information``).
        axis: the slicing axis.
        painted: labels on the same grid (non-zero = painted), or ``None``.
        top: keep the first ``top`` (default all).

    Returns:
        ``[(slice index, mean score), ...]``.

    Raises:
        ValueError: a score that is not 3D or ``painted`` on another grid.
    """
    score = np.asarray(score)
    if score.ndim != 3:
        raise ValueError(f"ranking slices needs a (Z, Y, X) map, got shape {score.shape}")
    other = tuple(a for a in range(3) if a != axis)
    means = score.mean(axis=other)
    skip = np.zeros(score.shape[axis], bool)
    if painted is not None:
        painted = np.asarray(painted)
        if painted.shape != score.shape:
            raise ValueError(
                f"painted labels of shape {painted.shape} are not on the image's grid {score.shape}"
            )
        skip = (painted != 0).any(axis=other)
    order = [int(i) for i in np.argsort(-means, kind="stable") if not skip[i]]
    ranked = [(i, float(means[i])) for i in order]
    return ranked[:top] if top is not None else ranked
