"""Mammography at full resolution: breast crop, finding/normal patches, sliding-window score and heatmap.

The one pipeline that training (``scripts/mammo_cv.py``), ``medssl predict --heatmap``, ``medssl evaluate``
and the Model dock share for patch classifiers of mammograms:

- :func:`breast_mask` / :func:`breast_crop`: drop the black padding and the film label: threshold, largest
  connected component (scikit-image), holes filled; the crop is the component's bounding box at the
  input's resolution (mini-MIAS: 200 µm pixels), intensities scaled with
  :func:`~napari_medssl.transforms.normalize_intensity` *inside the breast*.
- :func:`read_findings`: mini-MIAS ``labels.csv`` → per image its findings as ``(row, x, radius)`` in array
  coordinates. The csv's ``row`` column already counts from the top (``row = 1024 − y``, Info.txt's ``y``
  counting from the bottom): it *is* the array row; ``y_from_bottom`` is not.
- :class:`PatchSampler`: random ``patch × patch`` windows of the breast, finding patches (the window holds the
  finding's centre, jittered) and normal-tissue patches (centre in the breast, away from every finding; from
  normal and abnormal women alike).
- :func:`score_image`: sliding windows over the breast → per-window abnormality probability → an image score
  (``max`` or the mean of the ``top-k`` windows) and a float32 heatmap on the input's grid (each pixel the mean
  of the windows covering it, 0 outside the breast; windows shifted around the best ones sharpen its peak).

:data:`DEFAULT_PIPELINE` is what a checkpoint records under ``extra["mammo"]`` so the model alone is enough.

Axis legend: B batch, C channels, Y X space (array rows, columns).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medssl.transforms import normalize_intensity

DEFAULT_PIPELINE: dict[str, Any] = {
    "patch": 128,  # window side in pixels of the input grid (mini-MIAS: 200 µm → 25.6 mm)
    "pixel_um": 200,  # the resolution the model was trained at (the input's pixels × scale)
    "scale": 1,  # the breast crop is reduced by this integer factor (block mean) before the windows: 2 → each
    # 128-px window sees 256 input pixels (51 mm at 200 µm), context for large masses and asymmetries
    "stride": 96,  # sliding-window step (window centres ≤ 68 px from any point)
    "crop": "threshold+largest-component",
    "threshold": 0.08,  # fraction of the image's 99th percentile that counts as tissue
    "min_tissue": 0.3,
    "refine": 2,  # windows around which the heatmap looks closer (8 shifted windows each)
    "refine_step": 32,  # a window needs this fraction of breast to be scored
    "aggregate": "topk",  # "max" or "topk" (mean of the k best windows)
    "topk": 3,
    "tta": False,  # average each window's probability over its 8 right-angle rotations/reflections
    "finding_margin": 16,  # pixels added to a finding's radius for the heatmap-peak test
}


AUGMENTATIONS = ("flip", "strong")  # PatchSampler's training-patch augmentations


def pipeline_of(model: Any) -> dict[str, Any] | None:
    """The mammography pipeline a model's checkpoint records (``extra["mammo"]``), or ``None``."""
    mammo = model.spec.extra.get("mammo")
    return {**DEFAULT_PIPELINE, **mammo} if mammo else None


# -- crop -----------------------------------------------------------------------------------------------------
def _gray(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(-1)
    elif arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"a mammogram must be a 2D (Y, X) image, got shape {np.asarray(image).shape}")
    return arr.astype(np.float32, copy=False)


def breast_mask(image: np.ndarray, threshold: float = DEFAULT_PIPELINE["threshold"]) -> np.ndarray:
    """The breast: pixels above ``threshold`` × the 99th percentile, largest connected component, holes filled.

    A small opening first cuts thin bridges to the film label and the scanner's edge artefacts. Returns a
    bool ``(Y, X)`` mask; raises ValueError for an empty (all-dark) image.
    """
    from scipy import ndimage
    from skimage import measure, morphology

    arr = _gray(image)
    top = float(np.percentile(arr[np.isfinite(arr)], 99)) if np.isfinite(arr).any() else 0.0
    if top <= 0:
        raise ValueError("the image is empty (no pixel above 0): no breast to crop")
    fg = np.nan_to_num(arr) > threshold * top
    fg = ndimage.binary_opening(fg, morphology.disk(3))
    lab = measure.label(fg, connectivity=2)
    if lab.max() == 0:
        raise ValueError(f"no tissue above {threshold:.2f} × the 99th percentile: no breast to crop")
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(lab == int(sizes.argmax()))


@dataclass
class BreastCrop:
    """A breast cut out of its image: ``image`` (float32 in [0, 1]) and ``mask`` on the crop's grid;
    ``box = (y0, y1, x0, x1)`` in the input's pixels; ``shape`` the input's ``(Y, X)``; ``scale``: input pixels
    per crop pixel (1: full resolution; the crop's grid is the box reduced by this factor)."""

    image: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int]
    shape: tuple[int, int]
    scale: int = 1

    def to_input(self, point: tuple[int, int]) -> tuple[int, int]:
        """A crop-grid ``(row, x)`` in the input's pixels (the centre of its block)."""
        y0, _, x0, _ = self.box
        half = self.scale // 2
        return int(point[0]) * self.scale + half + y0, int(point[1]) * self.scale + half + x0

    def to_input_grid(self, values: np.ndarray) -> np.ndarray:
        """A crop-grid map on the input's grid: blocks repeated back to full resolution, 0 outside the box."""
        y0, y1, x0, x1 = self.box
        up = values
        if self.scale > 1:
            up = np.repeat(np.repeat(values, self.scale, 0), self.scale, 1)
        out = np.zeros(self.shape, values.dtype)
        out[y0:y1, x0:x1] = up[: y1 - y0, : x1 - x0]
        return out


def reduce_crop(crop: BreastCrop, factor: int) -> BreastCrop:
    """The crop at ``1 / factor`` of its resolution: image block means (scikit-image), mask where at least
    half of a block is breast, 0 outside it."""
    if factor == 1:
        return crop
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"scale must be a positive integer, got {factor!r}")
    from skimage.transform import downscale_local_mean

    f = (int(factor), int(factor))
    mask = downscale_local_mean(crop.mask.astype(np.float32), f) >= 0.5
    img = np.where(mask, downscale_local_mean(crop.image, f), 0.0).astype(np.float32)
    return BreastCrop(img, mask, crop.box, crop.shape, crop.scale * int(factor))


def breast_crop(
    image: np.ndarray, threshold: float = DEFAULT_PIPELINE["threshold"], scale: int = 1
) -> BreastCrop:
    """Crop to the breast's bounding box; intensities normalised inside the breast; reduced by ``scale``
    (1: full resolution)."""
    arr = _gray(image)
    mask = breast_mask(arr, threshold)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop, cmask = arr[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    lo, hi = np.percentile(crop[cmask], [0.5, 99.5])
    norm = normalize_intensity(np.clip(crop, lo, hi)) if hi > lo else np.zeros_like(crop)
    norm = np.where(cmask, norm, 0.0).astype(np.float32)
    full = BreastCrop(norm, cmask, (y0, y1, x0, x1), (int(arr.shape[0]), int(arr.shape[1])))
    return reduce_crop(full, scale)


# -- labels ---------------------------------------------------------------------------------------------------
def read_findings(csv_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """mini-MIAS ``labels.csv`` → ``{image stem: {"abnormal": bool, "findings": [(row, x, radius), ...]}}``.

    ``row`` is the csv's ``row`` column (array row, counted from the top); rows without a centre (findings the
    database gives no position for) make the image abnormal but add no finding.
    """
    path = Path(csv_path)
    out: dict[str, dict[str, Any]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "abnormality", "x", "row", "radius"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (mini-MIAS labels.csv)")
        for rec in reader:
            stem = Path(rec["image"].strip()).stem
            item = out.setdefault(stem, {"abnormal": False, "findings": []})
            if rec["abnormality"].strip().upper() == "NORM":
                continue
            item["abnormal"] = True
            vals = [rec[k].strip() for k in ("row", "x", "radius")]
            if all(vals):
                item["findings"].append(tuple(int(float(v)) for v in vals))
    return out


def inside_finding(point: tuple[int, int], findings: list[tuple[int, int, int]], margin: int = 16) -> bool:
    """Whether ``point = (row, x)`` lies within ``radius + margin`` of any finding's centre."""
    return any((point[0] - r) ** 2 + (point[1] - c) ** 2 <= (rad + margin) ** 2 for r, c, rad in findings)


# -- patches --------------------------------------------------------------------------------------------------
@dataclass
class MammoImage:
    """One prepared image for patch sampling: its crop and findings in crop coordinates."""

    id: str
    woman: str
    abnormal: bool
    crop: BreastCrop
    findings: list[tuple[int, int, int]] = field(default_factory=list)  # (row, x, radius) in the crop


def prepare_images(
    root: str | os.PathLike,
    ids: list[str] | None = None,
    threshold: float = DEFAULT_PIPELINE["threshold"],
    scale: int = 1,
) -> list[MammoImage]:
    """Read a mini-MIAS-format folder (``labels.csv`` + images) into :class:`MammoImage` items (crops reduced
    by ``scale``; findings' centres and radii on the crop's grid)."""
    from napari_medssl.engine import readers
    from napari_medssl.engine.data import mias_woman

    root = Path(root)
    table = read_findings(root / "labels.csv")
    out = []
    for stem in sorted(table) if ids is None else ids:
        files = sorted(root.glob(stem + ".*"))
        if not files:
            raise FileNotFoundError(f"{root / stem}.*: listed in labels.csv but missing")
        crop = breast_crop(readers.read_image(files[0]).data, threshold, scale)
        y0, _, x0, _ = crop.box
        finds = [
            ((r - y0) // scale, (c - x0) // scale, max(1, round(rad / scale)))
            for r, c, rad in table[stem]["findings"]
        ]
        out.append(MammoImage(stem, mias_woman(stem), table[stem]["abnormal"], crop, finds))
    return out


def _window(img: np.ndarray, cy: int, cx: int, p: int) -> np.ndarray:
    """The ``p × p`` window centred at ``(cy, cx)``, zero-padded where it leaves the image."""
    h, w = img.shape
    y0, x0 = cy - p // 2, cx - p // 2
    out = np.zeros((p, p), np.float32)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + p), min(w, x0 + p)
    if ye > ys and xe > xs:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = img[ys:ye, xs:xe]
    return out


class PatchSampler:
    """Random labelled patches from :class:`MammoImage` items.

    Args:
        images: the images to draw from (one fold's training women, or all for pretraining).
        patch: window side.
        finding_fraction: share of finding patches in a labelled batch.
        jitter: the finding's centre lies within this many pixels of the window's centre (at most half the
            window minus 8).
        seed: random seed.
        augment: ``"flip"`` (random horizontal and vertical flips; the runs of 2026-12-03) or ``"strong"``
            (flips, a random transpose, so all 8 right-angle rotations/reflections, and a per-patch intensity
            jitter: gamma in [0.8, 1.25], contrast × [0.9, 1.1]; 0 stays 0, values clipped to [0, 1]).
    """

    def __init__(
        self,
        images: list[MammoImage],
        patch: int = 128,
        finding_fraction: float = 0.5,
        jitter: int = 32,
        seed: int = 0,
        augment: str = "flip",
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.images, self.patch, self.fraction, self.augment = images, patch, finding_fraction, augment
        self.jitter = min(jitter, patch // 2 - 8)
        self.rng = np.random.default_rng(seed)
        self.findings = [(i, f) for i, im in enumerate(images) for f in im.findings]
        # normal tissue: normal images, and abnormal ones whose findings all have a position
        self.normal_src = [i for i, im in enumerate(images) if not im.abnormal or im.findings]
        self._coords = [np.argwhere(im.crop.mask[::8, ::8]) * 8 for im in images]
        self.hard: list[tuple[int, int, int]] = []  # (image index, row, x) of mined hard-negative windows
        self.hard_fraction = 0.0

    def normal_candidates(self, stride: int = 64, min_tissue: float = 0.3) -> list[tuple[int, int, int]]:
        """``(image index, row, x)`` of every grid window that counts as normal tissue (:meth:`is_normal`):
        the pool :func:`~napari_medssl.engine.mammo_train.mine_hard_negatives` scores."""
        return [
            (i, cy, cx)
            for i in self.normal_src
            for cy, cx in window_centres(self.images[i].crop.mask, self.patch, stride, min_tissue)
            if self.is_normal(i, cy, cx)
        ]

    def is_normal(self, i: int, cy: int, cx: int) -> bool:
        """Whether a window of image ``i`` centred at ``(cy, cx)`` counts as normal tissue: its centre farther
        than ``radius + 0.75 · patch`` (beyond the window's half-diagonal) from every finding."""
        return not inside_finding((cy, cx), self.images[i].findings, int(0.75 * self.patch))

    def window_at(self, i: int, cy: int, cx: int) -> np.ndarray:
        """Image ``i``'s ``patch × patch`` window centred at ``(cy, cx)``."""
        return _window(self.images[i].crop.image, cy, cx, self.patch)

    def set_hard_negatives(self, windows: list[tuple[int, int, int]], fraction: float) -> None:
        """From now on, draw a ``fraction`` of the normal-tissue patches from ``windows`` (``(image index,
        row, x)``, shifted by up to 16 px) instead of uniformly over the breast: hard-negative mining."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"hard-negative fraction must be in [0, 1], got {fraction}")
        self.hard, self.hard_fraction = list(windows), fraction if windows else 0.0

    def normal_patch(self) -> np.ndarray:
        """A window centred in the breast that holds no finding (:meth:`is_normal`); after
        :meth:`set_hard_negatives`, sometimes one of the mined windows instead."""
        if self.hard and self.rng.random() < self.hard_fraction:
            i, cy, cx = self.hard[int(self.rng.integers(len(self.hard)))]
            dy, dx = self.rng.integers(-16, 17, size=2)
            if self.is_normal(i, cy + dy, cx + dx):
                return self.window_at(i, int(cy + dy), int(cx + dx))
        for _ in range(100):
            i = int(self.rng.choice(self.normal_src))
            coords = self._coords[i]
            cy, cx = coords[int(self.rng.integers(len(coords)))]
            if self.is_normal(i, cy, cx):
                return self.window_at(i, int(cy), int(cx))
        raise RuntimeError("could not draw a normal-tissue patch in 100 tries")

    def finding_patch(self) -> np.ndarray:
        """A window holding a finding's centre (jittered by up to ``jitter`` pixels)."""
        i, (r, c, _) = self.findings[int(self.rng.integers(len(self.findings)))]
        dy, dx = self.rng.integers(-self.jitter, self.jitter + 1, size=2)
        return _window(self.images[i].crop.image, int(r + dy), int(c + dx), self.patch)

    def batch(self, n: int, labelled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n, 1, p, p)`` patches with random flips and labels ``(n,)`` (1 finding, 0 normal tissue).

        ``labelled=False`` (self-supervised): every patch a random breast window, the labels all -1.
        """
        xs, ys = [], []
        for _ in range(n):
            if labelled and self.findings and self.rng.random() < self.fraction:
                xs.append(self.finding_patch())
                ys.append(1)
            elif labelled:
                xs.append(self.normal_patch())
                ys.append(0)
            else:
                i = int(self.rng.integers(len(self.images)))
                cy, cx = self._coords[i][int(self.rng.integers(len(self._coords[i])))]
                xs.append(_window(self.images[i].crop.image, int(cy), int(cx), self.patch))
                ys.append(-1)
        x = np.stack(xs)[:, None]
        flip_x = self.rng.random(n) < 0.5
        x[flip_x] = x[flip_x][..., ::-1]
        flip_y = self.rng.random(n) < 0.5
        x[flip_y] = x[flip_y][..., ::-1, :]
        if self.augment == "strong":
            x = self._strong(x)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor(ys)

    def _strong(self, x: np.ndarray) -> np.ndarray:
        """Random transpose (with the flips: the 8 right-angle symmetries) and intensity jitter of ``(n, 1,
        p, p)`` patches in [0, 1]."""
        n = len(x)
        swap = self.rng.random(n) < 0.5
        x[swap] = np.swapaxes(x[swap], -1, -2)
        gamma = np.exp(self.rng.uniform(np.log(0.8), np.log(1.25), n)).astype(np.float32)
        gain = self.rng.uniform(0.9, 1.1, n).astype(np.float32)
        x = np.clip(np.power(np.clip(x, 0, 1), gamma[:, None, None, None]) * gain[:, None, None, None], 0, 1)
        return x.astype(np.float32, copy=False)


# -- sliding window -------------------------------------------------------------------------------------------
def window_grid(shape: tuple[int, int], patch: int, stride: int) -> tuple[list[int], list[int]]:
    """Window-centre rows and columns on a ``stride`` grid covering a crop of ``shape`` (last one flush)."""
    axes = []
    for n in shape:
        half = patch // 2
        c = list(range(half, max(n - half, half) + 1, stride))
        if c[-1] + (patch - half) < n:
            c.append(n - (patch - half))
        axes.append(c)
    return axes[0], axes[1]


def window_centres(mask: np.ndarray, patch: int, stride: int, min_tissue: float) -> list[tuple[int, int]]:
    """Window centres on the :func:`window_grid` whose window holds ≥ ``min_tissue`` breast."""
    ys, xs = window_grid(mask.shape, patch, stride)
    m = mask.astype(np.float32)
    out = [(y, x) for y in ys for x in xs if _window(m, y, x, patch).mean() >= min_tissue]
    if not out:
        rows, cols = np.nonzero(mask)
        out = [(min(ys, key=lambda v: abs(v - rows.mean())), min(xs, key=lambda v: abs(v - cols.mean())))]
    return out


def aggregate(probs: np.ndarray, how: str = "topk", k: int = 3) -> float:
    """Image score from window probabilities: ``max`` or the mean of the ``k`` highest."""
    if probs.size == 0:
        raise ValueError("no window probabilities to aggregate")
    if how == "max":
        return float(probs.max())
    if how == "topk":
        return float(np.sort(probs)[-min(k, probs.size) :].mean())
    raise ValueError(f"aggregate must be 'max' or 'topk', got {how!r}")


@torch.no_grad()
def window_probabilities(
    model: torch.nn.Module,
    windows: np.ndarray,
    batch_size: int = 32,
    device: torch.device | None = None,
    cancel: Any = None,
    tta: bool = False,
) -> np.ndarray:
    """Abnormal-class probability of each ``(N, p, p)`` window (the model's last class); ``cancel``: a
    ``threading.Event`` or a callable, checked between batches; ``tta``: the mean over the window's 8
    right-angle rotations and reflections (the symmetries the ``strong`` training augmentation uses)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(windows), batch_size):
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                from napari_medssl.inference import Cancelled

                raise Cancelled("cancelled")
            x = torch.from_numpy(windows[i : i + batch_size])[:, None].to(device)
            size = tuple(model.spec.input_size or x.shape[-2:])
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            views = [x]
            if tta:
                views = [v.transpose(-1, -2) if t else v for v in _flips(x) for t in (False, True)]
            prob = torch.stack([model(v).float().softmax(-1)[:, -1] for v in views]).mean(0)
            out.append(prob.cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _flips(x: torch.Tensor) -> list[torch.Tensor]:
    return [x, x.flip(-1), x.flip(-2), x.flip(-1, -2)]


def heatmap_from_windows(
    shape: tuple[int, int], centres: list[tuple[int, int]], probs: np.ndarray, patch: int, mask: np.ndarray
) -> np.ndarray:
    """Each pixel: the mean probability of the windows covering it (0 where none does or outside ``mask``)."""
    acc = np.zeros(shape, np.float64)
    cnt = np.zeros(shape, np.float64)
    h, w = shape
    for (cy, cx), p in zip(centres, probs):
        y0, x0 = max(0, cy - patch // 2), max(0, cx - patch // 2)
        y1, x1 = min(h, cy - patch // 2 + patch), min(w, cx - patch // 2 + patch)
        acc[y0:y1, x0:x1] += p
        cnt[y0:y1, x0:x1] += 1
    out = np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)
    return np.where(mask, out, 0.0).astype(np.float32)


def heatmap_peak(heat: np.ndarray) -> tuple[int, int]:
    """The centre of the heatmap's maximum: the centroid of the connected plateau holding the arg-max pixel
    (window-mean maps are piecewise constant), moved to its nearest plateau pixel."""
    from skimage import measure

    top = np.unravel_index(int(np.argmax(heat)), heat.shape)
    plateau = measure.label(heat >= heat[top] - 1e-6, connectivity=1)
    pts = np.argwhere(plateau == plateau[top])
    c = pts.mean(0)
    best = pts[int(np.argmin(((pts - c) ** 2).sum(1)))]
    return int(best[0]), int(best[1])


def score_crop(
    model: torch.nn.Module,
    crop: BreastCrop,
    pipeline: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: torch.device | None = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """Sliding windows over a :class:`BreastCrop`, then a finer look around the best ones.

    The score aggregates the regular grid's windows; windows shifted by ``refine_step`` around the
    ``refine`` best ones sharpen the heatmap where it matters (its peak). Returns ``score``, the crop-grid
    ``heatmap``, its ``peak`` ``(row, x)`` in crop pixels, the grid windows' ``probs`` and ``centres``.
    """
    pipe = {**DEFAULT_PIPELINE, **(pipeline or {})}
    p = int(pipe["patch"])
    centres = window_centres(crop.mask, p, int(pipe["stride"]), float(pipe["min_tissue"]))
    tta = bool(pipe.get("tta", False))
    probs = window_probabilities(
        model, np.stack([_window(crop.image, y, x, p) for y, x in centres]), batch_size, device, cancel, tta
    )
    step, h, w = int(pipe["refine_step"]), *crop.mask.shape
    seen = set(centres)
    extra = []
    for i in np.argsort(probs)[::-1][: int(pipe["refine"])]:
        cy, cx = centres[i]
        for dy in (-step, 0, step):
            for dx in (-step, 0, step):
                c = (min(max(cy + dy, 0), h - 1), min(max(cx + dx, 0), w - 1))
                if c not in seen and crop.mask[c]:
                    seen.add(c)
                    extra.append(c)
    more = np.zeros(0, np.float32)
    if extra:
        windows = np.stack([_window(crop.image, y, x, p) for y, x in extra])
        more = window_probabilities(model, windows, batch_size, device, cancel, tta)
    heat = heatmap_from_windows(crop.image.shape, centres + extra, np.r_[probs, more], p, crop.mask)
    return {
        "score": aggregate(probs, pipe["aggregate"], int(pipe["topk"])),
        "heatmap": heat,
        "peak": heatmap_peak(heat),
        "probs": probs,
        "centres": centres,
    }


def score_image(
    model: torch.nn.Module,
    image: np.ndarray,
    pipeline: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: torch.device | None = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """Whole-image abnormality from patches: crop, sliding windows, aggregate, heatmap.

    Returns:
        ``{"score": float (abnormal probability), "heatmap": float32 (Y, X) on the input's grid,
        "peak": (row, x) of the heatmap's maximum, "n_windows": int, "box": crop box}``.
    """
    pipe = {**DEFAULT_PIPELINE, **(pipeline or {})}
    crop = breast_crop(image, pipe["threshold"], int(pipe["scale"]))
    res = score_crop(model, crop, pipe, batch_size, device, cancel)
    return {
        "score": res["score"],
        "heatmap": crop.to_input_grid(res["heatmap"]),
        "peak": crop.to_input(res["peak"]),
        "n_windows": len(res["centres"]),
        "box": crop.box,
    }


def peak_hit(peak: tuple[int, int], im: MammoImage, pipeline: dict[str, Any]) -> bool | None:
    """Whether a crop-grid heatmap peak lies within a marked finding's radius + ``finding_margin`` input pixels
    (``None`` for an image with no marked finding)."""
    if not im.findings:
        return None
    margin = int(pipeline["finding_margin"]) / im.crop.scale
    return inside_finding(peak, im.findings, margin)  # type: ignore[arg-type]


def evaluate_folder(
    model: torch.nn.Module,
    root: str | os.PathLike,
    batch_size: int = 32,
    device: torch.device | None = None,
    progress: Callable[[int, int], Any] | None = None,
    ids: list[str] | None = None,
) -> dict[str, Any]:
    """Image-level metrics of a mammography patch classifier on a mini-MIAS-format folder (all its images,
    or the image stems ``ids``).

    Every image is scored with the model's own pipeline (:func:`pipeline_of`; :data:`DEFAULT_PIPELINE` when
    the checkpoint records none). Returns ``{"metrics": {auc, auc_ci95_low, auc_ci95_high (bootstrap over
    women), peak_hit_rate (marked findings whose heatmap peak lies within radius + margin), n_images,
    n_abnormal, n_marked}, "per_image": [...]}``.
    """
    from napari_medssl.engine.metrics import bootstrap_auc

    pipe = pipeline_of(model) or dict(DEFAULT_PIPELINE)
    ids = sorted(read_findings(Path(root) / "labels.csv")) if ids is None else ids
    rows = []
    for n, stem in enumerate(ids):
        im = prepare_images(root, [stem], pipe["threshold"], int(pipe["scale"]))[0]
        res = score_crop(model, im.crop, pipe, batch_size, device)
        hit = peak_hit(res["peak"], im, pipe)
        rows.append(
            {
                "id": stem,
                "woman": im.woman,
                "abnormal": im.abnormal,
                "score": res["score"],
                "peak": list(im.crop.to_input(res["peak"])),
                "peak_hit": hit,
            }
        )
        if progress is not None:
            progress(n + 1, len(ids))
    labels = np.array([r["abnormal"] for r in rows])
    auc, lo, hi = (float("nan"),) * 3
    if labels.any() and not labels.all():
        auc, lo, hi = bootstrap_auc(np.array([r["score"] for r in rows]), labels, [r["woman"] for r in rows])
    hits = [r["peak_hit"] for r in rows if r["peak_hit"] is not None]
    metrics = {
        "auc": auc,
        "auc_ci95_low": lo,
        "auc_ci95_high": hi,
        "peak_hit_rate": float(np.mean(hits)) if hits else float("nan"),
        "n_images": float(len(rows)),
        "n_abnormal": float(labels.sum()),
        "n_marked": float(len(hits)),
    }
    return {"metrics": metrics, "per_image": rows, "pipeline": pipe}


def heatmap_colormap(color: tuple[float, float, float] = (1.0, 0.2, 0.0)) -> np.ndarray:
    """RGBA control points ``(4, 4)`` for showing a heatmap over the mammogram: transparent in the lower
    quarter of the display range, then red to yellow with opacity rising to 0.55 at the top, so the tissue
    under the hottest spot stays readable."""
    r, g, b = color
    return np.array([[r, g, b, 0.0], [r, g, b, 0.0], [r, min(1.0, g + 0.4), b, 0.3], [1.0, 0.9, 0.1, 0.55]])


HEATMAP_CONTROLS = np.array([0.0, 0.25, 0.6, 1.0])


def heatmap_display_range(heat: np.ndarray) -> tuple[float, float]:
    """Contrast limits for showing a heatmap: from the breast's median value (so at least half of the breast
    stays fully transparent) to the map's maximum; ``(0, 1)`` for an empty or flat map."""
    inside = heat[heat > 0]
    if inside.size == 0 or float(inside.max()) <= float(np.median(inside)):
        return 0.0, 1.0
    return float(np.median(inside)), float(inside.max())
