"""3D tokenisers: a plain strided patch embedding, a convolutional stem (hybrid backbones), 3D sin-cos positions.

Axis legend: B batch, C channels, Z Y X space, N tokens (row-major over the ``(gz, gy, gx)`` grid), E embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from napari_medssl.models.layers.pos_embed import sincos_1d
from napari_medssl.models.layers.spatial import norm_nd


def sincos_3d(dim: int, grid_size: Sequence[int]) -> torch.Tensor:
    """Fixed sine-cosine table for a ``(gz, gy, gx)`` patch grid, row-major like the tokens.

    Args:
        dim: ``E``, divisible by 6 (a third of the numbers per axis, half sines, half cosines).
        grid_size: ``(gz, gy, gx)``.

    Returns:
        ``(gz·gy·gx, E)``: ``[x part, y part, z part]`` per token.
    """
    if dim % 6:
        raise ValueError(f"3D sin-cos embedding size must be divisible by 6, got {dim}")
    gz, gy, gx = (int(g) for g in grid_size)
    zz, yy, xx = torch.meshgrid(torch.arange(gz), torch.arange(gy), torch.arange(gx), indexing="ij")
    return torch.cat([sincos_1d(dim // 3, a) for a in (xx, yy, zz)], dim=1)


class PatchEmbed3d(nn.Module):
    """``(B, C, Z, Y, X) -> (B, N, E)`` by one ``p×p×p`` strided convolution (sides must be multiples of ``p``).

    Args:
        patch_size: cube side ``p``.
        in_chans: ``C``.
        embed_dim: ``E``.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 192) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [s for s in x.shape[2:] if s % self.patch_size]
        if x.ndim != 5 or bad:
            raise ValueError(
                f"expected (B, C, Z, Y, X) with sides divisible by {self.patch_size}, got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class ConvStage3d(nn.Sequential):
    """``conv 3 stride 2 → norm → GELU → conv 3 → norm → GELU``: halves the size, ``in_ch → out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "instance") -> None:
        super().__init__(
            nn.Conv3d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
            norm_nd(norm, 3, out_ch),
            nn.GELU(),
            nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
            norm_nd(norm, 3, out_ch),
            nn.GELU(),
        )


class ConvStem3d(nn.Module):
    """Convolutional stages then a ``1×1×1`` projection to tokens: the first half of a hybrid CNN-ViT.

    With ``S = len(dims)`` stages the patch size is ``p = 2^S`` (reference MiM: 96³ → 12³, ``p = 8``).

    Args:
        in_chans: ``C``.
        dims: channels of each stage (stage ``i`` at 1/``2^(i+1)``).
        embed_dim: ``E``.
        norm: norm of the conv stages.
    """

    def __init__(self, in_chans: int, dims: Sequence[int], embed_dim: int, norm: str = "instance") -> None:
        super().__init__()
        if not dims:
            raise ValueError("dims needs at least one conv stage")
        self.patch_size = 2 ** len(dims)
        self.stages = nn.ModuleList(ConvStage3d(a, b, norm) for a, b in zip([in_chans, *dims[:-1]], dims))
        self.proj = nn.Conv3d(dims[-1], embed_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int, int]]:
        """``(B, C, Z, Y, X)`` (sides multiples of ``p``) → ``(tokens (B, N, E), stage maps, grid (gz, gy, gx))``."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), feats, tuple(x.shape[2:])
