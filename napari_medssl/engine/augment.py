"""Batch augmentations for medical images, as torch ops on the training device.

Each sample draws its own parameters from a seeded ``torch.Generator`` (so runs and resumes are exact):

- flips along the allowed axes only (left–right is usually safe; a flip that swaps anterior and posterior
  would change what a label means, so it is not on by default);
- a small affine: rotation ±10° in the image plane (about Z for volumes), scale 0.9–1.1, shift ±5 %;
  images resampled bilinearly, masks by nearest neighbour, voxels from outside the image become ignored;
- intensity: gamma 0.7–1.5, Gaussian noise σ ≤ 0.03, then clipped to [0, 1].

Axis legend: B batch, C channels, Z Y X space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def random_flips(
    x: torch.Tensor, y: torch.Tensor | None, axes: tuple[int, ...], gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip each sample along each axis in ``axes`` (negative = from the end) with probability 1/2."""
    dims = x.ndim - 2
    for axis in axes:
        if not -dims <= axis < dims:
            raise ValueError(f"flip axis {axis} is out of range for {dims} spatial axes")
        flip = torch.rand(len(x), generator=gen) < 0.5
        if not flip.any():
            continue
        ax = axis % dims
        idx = flip.nonzero().flatten().to(x.device)
        x = x.clone()
        x[idx] = x[idx].flip(ax + 2)  # x[idx] is (n, C, *S): spatial axis ax sits at ax + 2
        if y is not None and y.ndim == x.ndim - 1:
            y = y.clone()
            y[idx] = y[idx].flip(ax + 1)
    return x, y


def random_affine(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gen: torch.Generator,
    max_degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    shift: float = 0.05,
    p: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate (in the Y–X plane), scale and shift each sample with probability ``p``."""
    b, dims = len(x), x.ndim - 2
    apply = torch.rand(b, generator=gen) < p
    angle = _uniform(b, -max_degrees, max_degrees, gen) * math.pi / 180 * apply
    s = torch.where(apply, _uniform(b, *scale, gen), torch.ones(b))
    t = _uniform(b * dims, -shift, shift, gen).view(b, dims) * apply[:, None] * 2
    if not apply.any():
        return x, y
    theta = torch.zeros(b, dims, dims + 1)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    # grid coordinates are ordered (x, y[, z]); rotate x and y, scale all
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if dims == 3:
        theta[:, 2, 2] = 1 / s
    theta[:, :, dims] = t
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    keep = ~apply.to(x.device).view(b, *([1] * (dims + 1)))
    x = torch.where(keep, x, out)
    if y is not None and y.ndim == x.ndim - 1:
        shifted = (y - IGNORE + 1).unsqueeze(1).to(x.dtype)  # ignore → 1, label k → k + 101, outside → 0
        warped = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        warped = warped.squeeze(1).round().long() + IGNORE - 1
        warped[warped < IGNORE] = IGNORE
        y = torch.where(keep.squeeze(1), y, warped)
    return x, y


def random_intensity(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Gamma 0.7–1.5 and Gaussian noise (σ ≤ 0.03), each with probability ``p``, clipped to [0, 1]."""
    b = len(x)
    view = (b, *([1] * (x.ndim - 1)))
    gamma = torch.where(torch.rand(b, generator=gen) < p, _uniform(b, 0.7, 1.5, gen), torch.ones(b))
    sigma = torch.where(torch.rand(b, generator=gen) < p, _uniform(b, 0.0, 0.03, gen), torch.zeros(b))
    noise = torch.randn(x.shape, generator=gen)
    x = x.clamp(0, 1) ** gamma.view(view).to(x.device, x.dtype)
    x = x + noise.to(x.device, x.dtype) * sigma.view(view).to(x.device, x.dtype)
    return x.clamp(0, 1)


def augment_batch(
    x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, flip_axes: tuple[int, ...] = (-1,)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flips, affine and intensity for a batch ``x (B, C, *S)`` and its masks ``y (B, *S)`` (or class ints)."""
    x, y = random_flips(x, y, flip_axes, gen)
    x, y = random_affine(x, y, gen)
    return random_intensity(x, gen), y
