"""Cases → training samples of one size: slices of volumes for 2D models, crops or resized images.

- Intensities: :func:`napari_medssl.transforms.normalize_intensity` over the whole image or volume (as in
  :mod:`napari_medssl.inference`), channels matched to the model (gray ↔ RGB).
- ``segment``: samples keep the native resolution; padded (image 0, label ignored) and cropped to
  ``size`` (random crops in training, half of them centred on a labelled foreground voxel; centred otherwise).
  Slices without any labelled voxel are skipped (painted labels often cover a few slices only).
- ``classify`` / ``pretrain``: 2D samples are whole images resized to ``size`` (as inference does); 3D
  samples are padded/cropped to ``size``.
- Labels: ``ignore_index`` voxels become ``-100`` (ignored), then ``label_map`` renames values.

Axis legend: C channels, Z Y X space.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from napari_medssl.engine.augment import IGNORE
from napari_medssl.engine.data import Case
from napari_medssl.inference import match_channels, resize
from napari_medssl.transforms import normalize_intensity

_CACHE_BYTES = 1 << 30  # resized whole images kept in memory per process


def map_labels(label: Any, ignore_index: int | None, label_map: dict[int, int] | None) -> Any:
    """Apply ``ignore_index`` (→ -100) then ``label_map`` to a mask or a class int."""
    if label is None:
        return None
    if np.ndim(label) == 0:
        v = int(label)
        if ignore_index is not None and v == ignore_index:
            return IGNORE
        return label_map.get(v, v) if label_map else v
    mask = np.asarray(label).astype(np.int64)
    out = mask.copy()
    if label_map:
        for src, dst in label_map.items():
            out[mask == src] = dst
    if ignore_index is not None:
        out[mask == ignore_index] = IGNORE
    return out


def choose_size(
    model_size: tuple[int, ...] | None,
    patch_size: tuple[int, ...] | None,
    shapes: list[tuple[int, ...]],
    dims: int,
) -> tuple[int, ...]:
    """The sample size: the model's ``input_size``, else ``patch_size``, else from the data.

    From the data: the largest shape, each side rounded up to a multiple of 16 and capped at 256 (2D) or 96
    (3D), so small data (hippocampus slices) fits whole and large images get random crops.
    """
    if model_size is not None:
        return tuple(int(s) for s in model_size)
    if patch_size is not None:
        if len(patch_size) != dims:
            raise ValueError(f"patch_size {patch_size} has {len(patch_size)} sides but the model is {dims}D")
        return tuple(int(s) for s in patch_size)
    cap = 256 if dims == 2 else 96
    biggest = np.max(np.array(shapes), axis=0)
    return tuple(int(min(cap, 16 * math.ceil(s / 16))) for s in biggest)


class SampleSet(Dataset):
    """Training/validation samples from cases (see the module docstring).

    Args:
        cases: the cases of one split.
        task: ``"segment"``, ``"classify"`` or ``"pretrain"``.
        model_dims: the model's spatial dims (2 or 3).
        in_chans: the model's input channels.
        slice_axis: volume axis (0 Z, 1 Y, 2 X) that 2D models slice along.
        ignore_index: label value for unlabelled voxels.
        label_map: label renaming applied after ``ignore_index``.
        train: random crops (else centred).
        seed: seeds the random crops (with the epoch and the sample index).
    """

    def __init__(
        self,
        cases: list[Case],
        task: str,
        model_dims: int,
        in_chans: int,
        slice_axis: int = 0,
        ignore_index: int | None = None,
        label_map: dict[int, int] | None = None,
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.cases, self.task, self.dims, self.in_chans = cases, task, model_dims, in_chans
        self.slice_axis, self.ignore_index, self.label_map = slice_axis, ignore_index, label_map
        self.train, self.seed, self.epoch = train, seed, 0
        self.size: tuple[int, ...] | None = None
        self._cache: dict[int, tuple[np.ndarray, Any]] = {}
        self._resized: dict[tuple[int, int], torch.Tensor] = {}
        self._resized_bytes = 0
        self._shapes: list[tuple[int, ...]] | None = None
        self.items: list[tuple[int, int]] = []  # (case index, slice index or -1)
        for ci, case in enumerate(cases):
            if case.spatial_dims < model_dims:
                raise ValueError(f"case {case.id} is 2D but the model is 3D; give it volumes")
            if case.spatial_dims == model_dims:
                self.items.append((ci, -1))
                continue
            img, lab = self._get(ci)
            for si in range(img.shape[1 + slice_axis]):
                if task == "segment" and lab is not None and np.ndim(lab) > 0:
                    if not (np.take(lab, si, axis=slice_axis) != IGNORE).any():
                        continue
                self.items.append((ci, si))
        if not self.items:
            raise ValueError("no training samples: every image is unlabelled (painted labels all 0?)")

    def set_size(self, size: tuple[int, ...]) -> None:
        """Fix the sample size (see :func:`choose_size`)."""
        self.size = tuple(size)

    def set_epoch(self, epoch: int) -> None:
        """Vary the random crops per epoch."""
        self.epoch = epoch

    def _get(self, ci: int, keep: bool = True) -> tuple[np.ndarray, Any]:
        """The normalised image ``(C, *spatial)`` and mapped label of case ``ci`` (kept in memory if ``keep``)."""
        if ci in self._cache:
            return self._cache[ci]
        img, lab = self.cases[ci].load()
        img = match_channels(normalize_intensity(img), self.in_chans)
        lab = map_labels(lab, self.ignore_index, self.label_map)
        if np.ndim(lab) > 0 and lab.shape != img.shape[1:]:
            raise ValueError(
                f"case {self.cases[ci].id}: label shape {lab.shape} != image shape {img.shape[1:]}"
            )
        if keep:
            self._cache[ci] = (img, lab)
        return img, lab

    def spatial_shapes(self) -> list[tuple[int, ...]]:
        """Spatial shape of every sample source (slices for 2D models); loads images when needed."""
        if self._shapes is None:
            shapes = []
            for ci in sorted({ci for ci, _ in self.items}):
                shape = self._get(ci, keep=self.cases[ci].spatial_dims > self.dims)[0].shape[1:]
                if self.cases[ci].spatial_dims > self.dims:
                    shape = tuple(np.delete(np.array(shape), self.slice_axis))
                shapes.append(tuple(int(s) for s in shape))
            self._shapes = shapes
        return self._shapes

    def class_counts(self, num_classes: int) -> np.ndarray:
        """How many samples of each class (classification)."""
        counts = np.zeros(num_classes)
        for ci, _ in self.items:
            case = self.cases[ci]
            lab = case.class_label if case.class_label is not None else self._get(ci)[1]
            lab = map_labels(lab, self.ignore_index, self.label_map)
            if lab is not None and 0 <= lab < num_classes:
                counts[lab] += 1
        return counts

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        assert self.size is not None, "call set_size first"
        ci, si = self.items[i]
        if self.task != "segment" and self.dims == 2:  # whole image, resized (cached: it never changes)
            x = self._resized.get((ci, si))
            if x is None:
                img, _ = self._get(ci, keep=si >= 0)
                img = img if si < 0 else np.take(img, si, axis=1 + self.slice_axis)
                x = resize(torch.from_numpy(np.ascontiguousarray(img))[None], self.size)[0]
                if self._resized_bytes < _CACHE_BYTES:
                    self._resized[(ci, si)] = x
                    self._resized_bytes += x.numel() * x.element_size()
            return {"image": x, "label": torch.tensor(self._class(ci))}
        img, lab = self._get(ci)
        if si >= 0:
            img = np.take(img, si, axis=1 + self.slice_axis)
            if np.ndim(lab) > 0:
                lab = np.take(lab, si, axis=self.slice_axis)
        x = torch.from_numpy(np.ascontiguousarray(img))
        y = None if lab is None or np.ndim(lab) == 0 else torch.from_numpy(np.ascontiguousarray(lab))
        x, y = self._crop(x, y, i)
        return {"image": x, "label": y if y is not None else torch.tensor(self._class(ci))}

    def _class(self, ci: int) -> int:
        lab = self._get(ci)[1] if self.cases[ci].class_label is None else self.cases[ci].class_label
        if lab is None or np.ndim(lab) > 0:
            return IGNORE
        return int(map_labels(lab, self.ignore_index, self.label_map))

    def _crop(
        self, x: torch.Tensor, y: torch.Tensor | None, i: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.size
        assert size is not None
        pad: list[int] = []
        for s, w in zip(reversed(x.shape[1:]), reversed(size)):
            pad += [0, max(0, w - s)]  # at the far end, as inference pads
        if any(pad):
            x = torch.nn.functional.pad(x, pad)
            if y is not None:
                y = torch.nn.functional.pad(y, pad, value=IGNORE)
        shape = x.shape[1:]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            starts = [int(rng.integers(0, s - w + 1)) for s, w in zip(shape, size)]
            if y is not None and rng.random() < 0.5:
                fg = torch.nonzero(y > 0)
                if len(fg):
                    centre = fg[int(rng.integers(len(fg)))].tolist()
                    starts = [min(max(0, c - w // 2), s - w) for c, s, w in zip(centre, shape, size)]
        else:
            starts = [(s - w) // 2 for s, w in zip(shape, size)]
        region = tuple(slice(a, a + w) for a, w in zip(starts, size))
        x = x[(slice(None), *region)]
        return x, None if y is None else y[region]
