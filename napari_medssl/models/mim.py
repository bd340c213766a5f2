"""MiM, Mask in Mask: hierarchical masked image modelling for 3D volumes (Zhuang et al., IEEE TMI 2025).

Pre-training (:meth:`MiM.pretrain_loss`):

1. Nested masks (:func:`nested_cell_masks`): level 0 masks ``r0`` of the cells of side ``c`` covering the
   volume; level ``l`` splits the cells masked at level ``l−1`` into ``2³`` children of side ``c/2^l`` and masks
   a fraction ``r_l`` of them. So every finer level's masked region lies inside the coarser one's (defaults
   ``r = 0.5, 0.6, 0.5``, ``c = 16`` → cells of 16, 8 and 4 voxels). The reference crops sub-volumes out of the
   masked regions and re-masks them at a finer scale; here the levels stay on the volume's own grid, so one
   encoder pass per level covers them and the masks can be shown on the volume (:func:`nested_masks`).
2. Every level is reconstructed: the volume with that level's masked voxels replaced by a learned value goes
   through the encoder and a light decoder predicts each token's ``p³`` voxels; MSE on the masked voxels.
3. Cross-level alignment between adjacent levels: token features of the same anatomy are pulled together with
   BYOL's loss ``2 − 2·cos(predictor(f_l), stopgrad(f_{l+1}))`` (symmetrised), weight 0.1 per pair.

Backbone: hybrid, as in the reference: convolutional stages down to 1/``p`` (:class:`ConvStem3d`, ``p = 8``),
then a ViT (timm ``Block``) on the tokens with fixed 3D sin-cos positions, so any grid size works.

Segmentation (:meth:`MiM.forward`): a UNETR-style decoder: the transformer output reshaped to its grid and
upsampled step by step with transposed convolutions, each step joined with the matching conv stage, and at full
resolution with a conv block on the image itself; ``1×1×1`` conv to ``K`` logits. Volumes whose sides are not
multiples of ``p`` are zero-padded at the far end and the logits cropped back.

Sizes (one channel in, ``K = 3``; FLOPs of one ``forward`` at batch 1 on a whole hippocampus volume
``35×51×35``, padded inside to ``40×56×40``, by ``FlopCounterMode``):

| name | conv stages | ViT (E, depth, heads) | params | FLOPs |
|---|---|---|---|---|
| ``mim_tiny`` | 16, 32, 64 | 96, 4, 3 | 1.40 M | 2.70 G |
| ``mim_base`` | 32, 64, 128 | 768, 12, 12 (ViT-B) | 96.5 M | 41.5 G |

Axis legend: B batch, C channels, Z Y X space, N tokens, E embedding, H heads, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from napari_medssl.models.layers.patch_embed3d import ConvStem3d, sincos_3d
from napari_medssl.models.layers.spatial import crop_spatial, pad_to_multiple
from napari_medssl.models.registry import register_model
from napari_medssl.models.unet import ConvBlock

__all__ = ["MiM", "mim_base", "mim_tiny", "nested_cell_masks", "nested_masks"]

DEFAULT_RATIOS = (0.5, 0.6, 0.5)


def _check_levels(ratios: Sequence[float], cell_size: int) -> None:
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"mask ratios must be in (0, 1), one per level, got {list(ratios)}")
    if cell_size < 1 or cell_size % 2 ** (len(ratios) - 1):
        raise ValueError(
            f"cell_size ({cell_size}) must be divisible by 2^(levels-1) = {2 ** (len(ratios) - 1)} "
            f"so that every level's cells split in halves"
        )


def nested_cell_masks(
    spatial: Sequence[int],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    cell_size: int = 16,
    batch: int = 1,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Nested random masks, one ``(B, *spatial)`` boolean voxel mask per level (True = masked).

    Args:
        spatial: ``(Z, Y, X)`` (any number of axes works).
        ratios: fraction masked at each level: level 0 of all cells, level ``l`` of the children of the cells
            masked at level ``l−1``.
        cell_size: side of the level-0 cells; level ``l`` uses ``cell_size / 2^l``.
        batch: ``B`` independent mask sets.
        generator: random source (for reproducible masks).

    Returns:
        ``[m_0, m_1, …]`` with ``m_{l+1} ⊆ m_l``.
    """
    _check_levels(ratios, cell_size)
    nd = len(spatial)
    grid = [-(-s // cell_size) for s in spatial]
    parent = torch.ones(batch, *grid, dtype=torch.bool)
    masks = []
    for level, ratio in enumerate(ratios):
        if level:
            for axis in range(1, nd + 1):
                parent = parent.repeat_interleave(2, dim=axis)
        flat = parent.flatten(1)  # (B, cells)
        noise = torch.rand(flat.shape, generator=generator)
        noise = noise.masked_fill(~flat, float("inf"))  # only children of masked cells are candidates
        keep = (flat.sum(1).float() * ratio).round().long()  # (B,)
        rank = noise.argsort(dim=1).argsort(dim=1)
        cells = (rank < keep[:, None]).reshape(parent.shape)  # (B, *grid_l)
        side = cell_size // 2**level
        voxels = cells
        for axis in range(1, nd + 1):
            voxels = voxels.repeat_interleave(side, dim=axis)
        masks.append(voxels[(slice(None), *(slice(0, s) for s in spatial))])
        parent = cells
    return masks


def nested_masks(
    shape_or_x: Sequence[int] | np.ndarray | torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    seed: int = 0,
    cell_size: int = 16,
) -> list[np.ndarray]:
    """MiM's nested masks for display: one boolean ``(Z, Y, X)`` array per level, finer ones inside coarser ones.

    Args:
        shape_or_x: a ``(Z, Y, X)`` shape, or an array / tensor whose last three axes are ``Z, Y, X``.
        ratios: see :func:`nested_cell_masks`.
        seed: random seed (same seed, same masks).
        cell_size: side of the level-0 cells in voxels.
    """
    if isinstance(shape_or_x, (np.ndarray, torch.Tensor)):
        spatial = tuple(shape_or_x.shape[-3:])
    else:
        spatial = tuple(int(s) for s in shape_or_x)
    if len(spatial) != 3 or min(spatial) < 1:
        raise ValueError(f"expected a (Z, Y, X) shape or a volume with at least 3 axes, got {spatial}")
    generator = torch.Generator().manual_seed(int(seed))
    return [m[0].numpy() for m in nested_cell_masks(spatial, ratios, cell_size, 1, generator)]


class MiM(nn.Module):
    """Hybrid CNN-ViT for 3D volumes with MiM pre-training and a UNETR-style segmentation head.

    Args:
        in_chans: ``C``.
        num_classes: ``K`` (segmentation logits).
        conv_dims: channels of the conv stages (patch size ``p = 2^len``).
        embed_dim: ``E`` (divisible by 6 and by ``num_heads``).
        depth: transformer blocks.
        num_heads: ``H``.
        mlp_ratio: transformer MLP hidden size / ``E``.
        decoder_dim: width of the reconstruction decoder.
        decoder_depth: transformer blocks in the reconstruction decoder.
        mask_ratios: per-level ratios of the nested masks (≥ 1 level; 3 by default).
        cell_size: level-0 mask cell side in voxels.
        align_weight: weight of each adjacent-level alignment term.
        norm: norm of the convolutional parts.
        spatial_dims: must be 3 (accepted so every segmenter takes the same keyword).
    """

    task = "segment"
    spatial_dims = 3
    input_size = None

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        conv_dims: Sequence[int] = (16, 32, 64),
        embed_dim: int = 96,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        decoder_dim: int = 96,
        decoder_depth: int = 1,
        mask_ratios: Sequence[float] = DEFAULT_RATIOS,
        cell_size: int = 16,
        align_weight: float = 0.1,
        norm: str = "instance",
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"MiM is a 3D model: spatial_dims must be 3, got {spatial_dims!r}")
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
        if embed_dim % 6 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by 6 and by num_heads ({num_heads})")
        _check_levels(mask_ratios, cell_size)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.mask_ratios, self.cell_size, self.align_weight = tuple(mask_ratios), cell_size, align_weight
        self.stem = ConvStem3d(in_chans, conv_dims, embed_dim, norm)
        self.patch_size = p = self.stem.patch_size
        self.blocks = nn.Sequential(
            *(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim)
        # pre-training parts
        self.mask_value = nn.Parameter(torch.zeros(in_chans))
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_blocks = nn.Sequential(
            *(
                Block(decoder_dim, max(1, decoder_dim // 32), mlp_ratio, qkv_bias=True)
                for _ in range(decoder_depth)
            )
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, p**3 * in_chans)
        self.predictor = nn.Sequential(
            nn.Linear(embed_dim, 2 * embed_dim),
            nn.LayerNorm(2 * embed_dim),
            nn.GELU(),
            nn.Linear(2 * embed_dim, embed_dim),
        )
        # UNETR-style segmentation decoder
        dims = list(conv_dims)
        self.seg_bottleneck = ConvBlock(embed_dim + dims[-1], dims[-1], 3, norm)
        self.seg_ups = nn.ModuleList(
            nn.ConvTranspose3d(dims[i + 1], dims[i], 2, stride=2) for i in reversed(range(len(dims) - 1))
        )
        self.seg_blocks = nn.ModuleList(
            ConvBlock(2 * dims[i], dims[i], 3, norm) for i in reversed(range(len(dims) - 1))
        )
        full = max(dims[0] // 2, 8)
        self.seg_up_full = nn.ConvTranspose3d(dims[0], full, 2, stride=2)
        self.seg_image = ConvBlock(in_chans, full, 3, norm)
        self.seg_full = ConvBlock(2 * full, full, 3, norm)
        self.seg_head = nn.Conv3d(full, num_classes, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, Z, Y, X) volume, got shape {tuple(x.shape)}")

    def forward_encoder(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int, int]]:
        """Padded ``(B, C, Z, Y, X)`` → ``(tokens (B, N, E), conv stage maps, grid (gz, gy, gx))``."""
        tokens, feats, grid = self.stem(x)
        tokens = tokens + sincos_3d(tokens.shape[-1], grid).to(tokens)
        return self.norm(self.blocks(tokens)), feats, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Z, Y, X)`` → ``(B, K, Z, Y, X)`` segmentation logits."""
        self._check(x)
        x, spatial = pad_to_multiple(x, self.patch_size, 3)
        tokens, feats, grid = self.forward_encoder(x)
        z = tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)  # (B, E, gz, gy, gx)
        y = self.seg_bottleneck(torch.cat([z, feats[-1]], dim=1))
        for up, block, skip in zip(self.seg_ups, self.seg_blocks, reversed(feats[:-1])):
            y = block(torch.cat([up(y), skip], dim=1))
        y = self.seg_full(torch.cat([self.seg_up_full(y), self.seg_image(x)], dim=1))
        return crop_spatial(self.seg_head(y), spatial)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Z, Y, X)`` (multiples of ``p``) → ``(B, N, p³·C)``, tokens row-major like the encoder's."""
        b, c, *s = x.shape
        p = self.patch_size
        g = [d // p for d in s]
        x = x.reshape(b, c, g[0], p, g[1], p, g[2], p)
        return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, g[0] * g[1] * g[2], p**3 * c)

    def _align(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Symmetrised BYOL loss between two ``(B, N, E)`` token sets of the same positions."""

        def d(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return (2 - 2 * F.cosine_similarity(self.predictor(online), target.detach(), dim=-1)).mean()

        return 0.5 * (d(a, b) + d(b, a))

    def pretrain_loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """MiM objective on ``(B, C, Z, Y, X)`` volumes (``y`` unused).

        Returns:
            ``{"loss", "recon_0", "recon_1", …, "align_0_1", …}``: total, per-level masked-voxel MSE, and the
            unweighted alignment term of each adjacent pair.
        """
        self._check(x)
        multiple = int(np.lcm(self.patch_size, self.cell_size))
        x, spatial = pad_to_multiple(x, multiple, 3)
        valid = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.bool, device=x.device)
        valid[(slice(None), *(slice(0, s) for s in spatial))] = True
        masks = nested_cell_masks(x.shape[2:], self.mask_ratios, self.cell_size, x.shape[0], generator)
        target = self.patchify(x)  # (B, N, p³·C)
        out: dict[str, torch.Tensor] = {}
        feats = []
        total = x.new_zeros(())
        for level, mask in enumerate(masks):
            mask = mask.to(x.device) & valid  # (B, Z, Y, X); padding is never a target
            m = mask[:, None].to(x.dtype)
            x_masked = x * (1 - m) + m * self.mask_value.view(1, -1, 1, 1, 1)
            tokens, _, _ = self.forward_encoder(x_masked)
            pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(self.decoder_embed(tokens))))
            weight = self.patchify(m.expand_as(x))  # (B, N, p³·C)
            recon = ((pred - target) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)
            out[f"recon_{level}"] = recon
            total = total + recon
            feats.append(tokens)
        for level in range(len(feats) - 1):
            align = self._align(feats[level], feats[level + 1])
            out[f"align_{level}_{level + 1}"] = align
            total = total + self.align_weight * align
        out["loss"] = total
        return out


_SIZES = {
    "tiny": {"conv_dims": (16, 32, 64), "embed_dim": 96, "depth": 4, "num_heads": 3, "decoder_dim": 96},
    "base": {
        "conv_dims": (32, 64, 128),
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "decoder_dim": 384,
        "decoder_depth": 2,
    },
}


@register_model
def mim_tiny(**overrides) -> MiM:
    """MiM with three conv stages (16/32/64) and a 4-block, 96-wide ViT (patch 8)."""
    return MiM(**{**_SIZES["tiny"], **overrides})


@register_model
def mim_base(**overrides) -> MiM:
    """MiM with three conv stages (32/64/128) and a ViT-B (768 wide, 12 blocks, patch 8), the reference size."""
    return MiM(**{**_SIZES["base"], **overrides})
