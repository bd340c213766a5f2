"""Fixed 2D sine-cosine position embeddings (MAE, He et al. 2022) and their resizing to other grids.

The table for a ``(gh, gw)`` patch grid gives every patch ``E`` numbers: half encode its row, half its
column, each as sines and cosines of the position at ``E / 4`` geometric frequencies (Vaswani et al. 2017).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of 1D positions.

    Args:
        dim: output size per position (even).
        pos: positions, any shape ``(M,)`` (may be fractional).

    Returns:
        ``(M, dim)``: ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 10000^(−2i/dim)``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding size must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Sine-cosine table for a patch grid, laid out row-major like the patch tokens.

    Args:
        dim: embedding size ``E`` (divisible by 4).
        grid_size: ``(gh, gw)`` patches.
        cls_token: prepend a row of zeros for the [CLS] token.

    Returns:
        ``(gh·gw, E)``, or ``(1 + gh·gw, E)`` with ``cls_token``.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding size must be divisible by 4, got {dim}")
    gh, gw = grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    # MAE's layout: first half from the column (w) index, second half from the row (h) index.
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (gh·gw, E)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim), emb], dim=0)
    return emb


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a patch position table to another grid by bicubic interpolation (DINO's recipe).

    Works for fixed sin-cos tables and for learned ones loaded from checkpoints alike.

    Args:
        pos_embed: ``(1, gh·gw, E)`` patch positions (no [CLS] row).
        old_grid: ``(gh, gw)`` the table was made for.
        new_grid: ``(gh', gw')`` wanted.

    Returns:
        ``(1, gh'·gw', E)``; the input itself when the grids are equal.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    e = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], e).permute(0, 3, 1, 2)  # (1, E, gh, gw)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], e)
