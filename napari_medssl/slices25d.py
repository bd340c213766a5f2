"""2.5D inputs: each slice of a volume with its neighbours as channels, at a recorded in-plane spacing.

A 2D segmenter trained by :mod:`napari_medssl.engine.adapt` records its input conventions in its checkpoint
(``model.spec.extra["input"]``), and :func:`napari_medssl.inference.segment_probabilities` applies them
through this module, so ``medssl predict``, the Model dock and training see the same inputs:

- ``context``: slices on each side stacked as channels (``in_chans = 2·context + 1``; edge slices repeat the
  nearest slice; a 2D image repeats itself);
- intensities: :func:`napari_medssl.transforms.normalize_intensity` over the whole volume (0.5–99.5 %);
- ``coords``: two more channels, each pixel's row and column position in the slice scaled to [0, 1]
  (CoordConv; the structure tends to sit where it was painted, a slice away);
- ``roi``: where each structure class was painted, as a box in patient coordinates (RAS mm) and a margin, and
  (newer checkpoints) the painted voxels themselves as points (one per 2 mm cell) with the painted grid;
  given the image's affine, class probabilities far from the paint go to the background (the structure sits
  near where it was painted): on the painted series itself (same grid), farther than ``near_mm`` from any
  painted voxel of the class; on another series (the same patient's other study in the same scanner frame,
  where the structure may have moved or grown), outside the box widened by ``margin_mm``. Without an affine
  nothing is restricted;
- ``in_plane_mm``: slices resampled in-plane to this pixel size (bilinear, antialiased) before the model and
  the probabilities resampled back to the input's grid; when the caller does not know the spacing, the
  scale factor used in training (``train_factor``) is applied;
- ``window`` (newer checkpoints): the square crop, in model pixels, the model was trained on; a larger slice
  is predicted by sliding windows of that size (half overlapping, probabilities averaged with nnU-Net's
  Gaussian weights) instead of whole.
  The U-Net's instance norm then sees statistics like those of its training crops: predicted whole, a 220²
  slice of mostly head and air normalises a tumour's features away (Dice on unpainted slices 0.37–0.56 whole
  vs 0.62–0.71 windowed, same checkpoints: docs/experiments/2026-12-04-adapt-windowed-inference.md).

Axis legend: N slices, C channels, Z Y X space, K classes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medssl.transforms import normalize_intensity

KEY = "input"  # checkpoint_extra key


@dataclass(frozen=True)
class Conventions:
    """How a 2.5D model's inputs are made (see the module docstring)."""

    context: int = 1
    in_plane_mm: float | None = 1.0
    train_factor: float = 1.0  # in-plane scale (new size / old size) of the training image
    coords: bool = False
    roi: dict | None = None  # {"margin_mm", "boxes": {class: [low, high]}, "near_mm", "points", "grid"}
    window: int | None = None  # training crop (model pixels): larger slices are predicted by sliding windows
    kind: str = "2.5d"

    def to_extra(self) -> dict[str, Any]:
        """The JSON-safe record kept in a checkpoint's extra under :data:`KEY`."""
        return asdict(self)

    @property
    def in_chans(self) -> int:
        """Channels the model takes."""
        return 2 * self.context + 1 + (2 if self.coords else 0)

    def factor(self, spacing_yx: tuple[float, float] | None) -> float:
        """In-plane scale for an image of ``spacing_yx`` mm (the training factor when unknown)."""
        if self.in_plane_mm is None:
            return 1.0
        if spacing_yx is None or not all(np.isfinite(s) and s > 0 for s in spacing_yx):
            return float(self.train_factor)
        return float(np.mean(spacing_yx)) / float(self.in_plane_mm)


def conventions(model: Any) -> Conventions | None:
    """The 2.5D conventions a model's checkpoint records, or ``None`` (an ordinary model)."""
    rec = model.spec.extra.get(KEY)
    if not isinstance(rec, dict) or rec.get("kind") != "2.5d":
        return None
    keys = ("context", "in_plane_mm", "train_factor", "coords", "roi", "window")
    fields = {k: rec[k] for k in keys if k in rec}
    return Conventions(**fields)


def scaled_shape(shape_yx: tuple[int, int], factor: float) -> tuple[int, int]:
    """The in-plane shape after scaling by ``factor`` (at least 8 pixels a side)."""
    return tuple(max(8, int(round(s * factor))) for s in shape_yx)  # type: ignore[return-value]


def normalized_slices(image: np.ndarray, factor: float) -> torch.Tensor:
    """``(Z, Y, X)`` or ``(Y, X)`` raw → normalised ``(Z, Y', X')`` float tensor, scaled in-plane."""
    arr = normalize_intensity(np.asarray(image))
    vol = torch.from_numpy(arr if arr.ndim == 3 else arr[None])
    new = scaled_shape(tuple(vol.shape[1:]), factor)
    if tuple(new) != tuple(vol.shape[1:]):
        vol = F.interpolate(vol[:, None], size=new, mode="bilinear", align_corners=False, antialias=True)[
            :, 0
        ]
    return vol.contiguous()


def stack_context(vol: torch.Tensor, context: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """``(Z, Y, X)`` → ``(N, 2·context + 1, Y, X)``: slice ``z`` with ``z-context..z+context`` (clamped)."""
    z = vol.shape[0]
    index = torch.arange(z) if index is None else index
    offsets = torch.arange(-context, context + 1)
    idx = (index[:, None] + offsets[None]).clamp(0, z - 1)
    return vol[idx]


def coord_channels(shape_yx: tuple[int, ...]) -> torch.Tensor:
    """``(2, Y, X)``: each pixel's row and column position scaled to [0, 1]."""
    ys = torch.linspace(0, 1, int(shape_yx[0]))
    xs = torch.linspace(0, 1, int(shape_yx[1]))
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"))


def model_inputs(vol: torch.Tensor, conv: Conventions, index: torch.Tensor) -> torch.Tensor:
    """The model's input for slices ``index`` of a prepared volume: context slices (and coordinates)."""
    x = stack_context(vol, conv.context, index)
    if conv.coords:
        x = torch.cat([x, coord_channels(vol.shape[1:]).expand(len(x), -1, -1, -1)], 1)
    return x


def painted_boxes(
    labels: np.ndarray, affine: np.ndarray, margin_mm: float, near_mm: float | None = None, cell_mm: float = 2.0
) -> dict[str, Any]:
    """The ``roi`` record: per structure class ``k >= 1`` of ``labels`` (class indices, negative unpainted),
    the RAS box of its voxels (the image's ``affine``: index → RAS mm), and the margin; with ``near_mm``
    also the painted voxels as points (the centroid of each ``cell_mm`` cell they occupy, at most about 4000
    per class: the cell grows until they fit) and the painted grid (shape, affine)."""
    boxes, points = {}, {}
    aff = np.asarray(affine, float)
    for k in sorted(int(v) for v in np.unique(labels) if v >= 1):
        idx = np.argwhere(labels == k).T
        ras = (aff @ np.vstack([idx, np.ones((1, idx.shape[1]))]))[:3]
        boxes[str(k)] = [ras.min(1).round(2).tolist(), ras.max(1).round(2).tolist()]
        if near_mm is not None:
            points[str(k)] = _cell_centroids(ras.T, cell_mm).round(1).tolist()
    roi: dict[str, Any] = {"margin_mm": float(margin_mm), "boxes": boxes}
    if near_mm is not None:
        roi.update(
            near_mm=float(near_mm),
            points=points,
            grid={"shape": [int(n) for n in np.shape(labels)], "affine": aff.round(4).tolist()},
        )
    return roi


def _cell_centroids(ras: np.ndarray, cell_mm: float, max_points: int = 4000) -> np.ndarray:
    """``(P, 3)`` centroids of the ``cell_mm`` cells that hold the points ``ras (N, 3)`` (at most
    ``max_points``: the cell doubles until they fit)."""
    while True:
        keys, inverse = np.unique(np.floor(ras / cell_mm).astype(np.int64), axis=0, return_inverse=True)
        if len(keys) <= max_points:
            break
        cell_mm *= 2
    inverse = inverse.reshape(-1)
    sums = np.zeros((len(keys), 3))
    np.add.at(sums, inverse, ras)
    return sums / np.bincount(inverse, minlength=len(keys))[:, None]


def on_grid(roi: dict, shape: tuple[int, ...], affine: np.ndarray, tol_mm: float = 0.01) -> bool:
    """Whether an image of ``shape`` and ``affine`` lies on the grid the ``roi`` was painted on."""
    grid = roi.get("grid")
    if not grid or tuple(grid["shape"]) != tuple(shape):
        return False
    return bool(np.abs(np.asarray(grid["affine"], float) - np.asarray(affine, float)).max() <= tol_mm)


def apply_roi(probs: np.ndarray, roi: dict, affine: np.ndarray) -> np.ndarray:
    """Move each boxed class's probability far from its paint to the background (in place): outside the box
    widened by ``margin_mm``, and on the painted grid itself also farther than ``near_mm`` from every painted
    point of the class."""
    from scipy.spatial import cKDTree

    shape = probs.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = grid @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    margin = float(roi.get("margin_mm", 0.0))
    near = roi.get("near_mm") if on_grid(roi, shape, affine) else None
    for k, (lo, hi) in (roi.get("boxes") or {}).items():
        if int(k) >= len(probs):
            continue
        inside = np.all((ras >= np.asarray(lo) - margin) & (ras <= np.asarray(hi) + margin), 1)
        pts = (roi.get("points") or {}).get(k)
        if near is not None and pts:
            where = np.flatnonzero(inside)
            dist, _ = cKDTree(np.asarray(pts, float)).query(ras[where], distance_upper_bound=float(near))
            inside[where[~np.isfinite(dist)]] = False
        inside = inside.reshape(shape)
        probs[0] += np.where(inside, 0.0, probs[int(k)])
        probs[int(k)] *= inside
    return probs


def check_image(image: np.ndarray, rgb: bool = False) -> None:
    """Refuse what a 2.5D model cannot take: RGB, or anything but a 2D image or a ``(Z, Y, X)`` volume.

    Raises:
        ValueError: naming the shape and why.
    """
    shape = np.shape(image)
    if rgb:
        raise ValueError(f"a 2.5D gray-scale model cannot take an RGB image (shape {shape})")
    if len(shape) not in (2, 3) or min(shape[-2:]) < 8:
        raise ValueError(
            f"a 2.5D model takes a (Y, X) image or a (Z, Y, X) volume of at least 8×8, got {shape}"
        )


def segment_probabilities(
    model: torch.nn.Module,
    image: np.ndarray,
    conv: Conventions,
    device: torch.device,
    spacing_yx: tuple[float, float] | None = None,
    batch_size: int = 8,
    mirror: tuple[int, ...] = (),
    progress: Any = None,
    cancel: Any = None,
    slices: list[int] | None = None,
    affine: np.ndarray | None = None,
) -> np.ndarray:
    """Probabilities ``(K, *image.shape)`` (only ``slices`` filled when given, zeros elsewhere); with the
    image's ``affine`` (index → RAS mm) and a recorded ``roi``, restricted to it."""
    from napari_medssl.inference import _check_cancel, _segment_batch

    check_image(image)
    shape = np.shape(image)
    vol = normalized_slices(image, conv.factor(spacing_yx))
    index = torch.arange(vol.shape[0]) if slices is None else torch.as_tensor(slices, dtype=torch.long)
    flips = [()] + [tuple(int(a) for a in m) for m in _mirror_combos(mirror)]
    out: np.ndarray | None = None
    total = math.ceil(len(index) / batch_size)
    was_training = model.training
    model.eval()
    try:
        for b, i in enumerate(range(0, len(index), batch_size)):
            _check_cancel(cancel)
            x = model_inputs(vol, conv, index[i : i + batch_size])
            window = None
            if conv.window and max(x.shape[-2:]) > conv.window:
                window = (conv.window, conv.window)
            probs = _segment_batch(model, x, device, window, 0.5, batch_size, gaussian=True)
            for f in flips[1:]:  # mirroring test-time augmentation: flip, predict, flip back
                probs += _segment_batch(model, x.flip(f), device, window, 0.5, batch_size, gaussian=True).flip(f)
            probs /= len(flips)
            probs = F.interpolate(probs, size=shape[-2:], mode="bilinear", align_corners=False)
            if out is None:
                out = np.zeros((probs.shape[1], *(shape if len(shape) == 3 else (1, *shape))), np.float32)
            out[:, index[i : i + batch_size].numpy()] = probs.movedim(1, 0).numpy()
            if progress is not None:
                progress(b + 1, total)
    finally:
        model.train(was_training)
    assert out is not None
    if conv.roi and affine is not None and len(shape) == 3:
        apply_roi(out, conv.roi, affine)
    return out if len(shape) == 3 else out[:, 0]


def _mirror_combos(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every non-empty combination of in-plane mirror axes (-1 = X, -2 = Y), as tensor dims."""
    import itertools

    norm = sorted({int(a) for a in axes})
    if any(a not in (-1, -2) for a in norm):
        raise ValueError(f"a 2.5D model mirrors in-plane only (axes -1, -2), got {tuple(axes)}")
    return [c for r in range(1, len(norm) + 1) for c in itertools.combinations(norm, r)]
