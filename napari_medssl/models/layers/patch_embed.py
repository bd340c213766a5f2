"""Patch embeddings: split an image into non-overlapping patches and project each to ``E`` numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_2tuple(value: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    """``8 -> (8, 8)``; ``(64, 96)`` stays; anything else is a ``ValueError`` naming ``what``."""
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{what} must be a positive int or a (height, width) pair, got {value!r}")
    return value


class PatchEmbed(nn.Module):
    """2D patch embedding: ``(B, C, Y, X) -> (B, N, E)`` with ``N = (Y / p) · (X / p)``, row-major.

    A strided convolution named ``proj`` (timm's name, so official checkpoints map onto it), for any number of
    input channels. Inputs whose sides are not multiples of the patch size are zero-padded at the bottom and
    right (see :meth:`pad`).

    Args:
        patch_size: patch side ``p`` (int or ``(ph, pw)``).
        in_chans: image channels ``C``.
        embed_dim: token size ``E``.
    """

    def __init__(
        self, patch_size: int | tuple[int, int] = 8, in_chans: int = 1, embed_dim: int = 192
    ) -> None:
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid_size(self, spatial: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` for an image of ``(Y, X)`` pixels (after padding)."""
        ph, pw = self.patch_size
        return -(-spatial[0] // ph), -(-spatial[1] // pw)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``(B, C, Y, X)`` at the bottom/right to multiples of the patch size (no copy if already)."""
        ph, pw = self.patch_size
        dy, dx = -x.shape[-2] % ph, -x.shape[-1] % pw
        return F.pad(x, (0, dx, 0, dy)) if dy or dx else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a (B, {self.in_chans}, Y, X) image tensor, got shape {tuple(x.shape)}"
            )
        x = self.proj(self.pad(x))  # (B, E, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, E)
