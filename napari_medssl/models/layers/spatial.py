"""Helpers shared by the segmenters that work in 2D and 3D alike.

``conv_nd`` / ``norm_nd`` pick the 2D or 3D layer class; ``pad_to_multiple`` zero-pads a ``(B, C, *spatial)``
tensor at the far end of every spatial axis so each side is a multiple of what the network's downsampling
needs, and ``crop_spatial`` cuts the output back to the input's size.

Axis legend: B batch, C channels, Z Y X space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("instance", "batch", "group", "none")


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` when it is 2 or 3, else raise a ``ValueError`` naming it."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv3d if check_spatial_dims(spatial_dims) == 3 else nn.Conv2d


def conv_transpose_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return nn.ConvTranspose3d if check_spatial_dims(spatial_dims) == 3 else nn.ConvTranspose2d


def norm_nd(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """A normalisation layer over ``channels``.

    Args:
        kind: ``"instance"`` (affine instance norm, nnU-Net's default), ``"batch"``, ``"group"`` (8 groups or
            fewer) or ``"none"``.
        spatial_dims: 2 or 3.
        channels: ``C``.
    """
    check_spatial_dims(spatial_dims)
    if kind == "instance":
        cls = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        return cls(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm3d(channels) if spatial_dims == 3 else nn.BatchNorm2d(channels)
    if kind == "group":
        groups = max(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def pad_to_multiple(
    x: torch.Tensor, multiple: int, spatial_dims: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the last ``spatial_dims`` axes of ``x`` at their far end up to multiples of ``multiple``.

    Args:
        x: ``(B, C, *spatial)``.
        multiple: the total downsampling factor of the network.
        spatial_dims: 2 or 3.

    Returns:
        ``(padded, spatial)``: the padded tensor (``x`` itself when nothing is needed) and the original
        spatial shape, for :func:`crop_spatial`.
    """
    if x.ndim != spatial_dims + 2:
        raise ValueError(
            f"expected a (B, C, {'Z, Y, X' if spatial_dims == 3 else 'Y, X'}) tensor, got shape {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[2:])
    extra = [-s % multiple for s in spatial]
    if not any(extra):
        return x, spatial
    pads: list[int] = []
    for e in reversed(extra):  # F.pad lists the last axis first
        pads += [0, e]
    return F.pad(x, pads), spatial


def crop_spatial(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Cut ``(B, C, *padded)`` back to ``(B, C, *spatial)`` (the near corner is kept)."""
    return x[(..., *(slice(0, s) for s in spatial))]
