"""U-Net baseline (Ronneberger et al. 2015, https://arxiv.org/abs/1505.04597), 2D or 3D.

The standard encoder-decoder: four downsampling steps (widths ``w, 2w, 4w, 8w`` and a ``16w`` bottleneck),
each level two ``3×3`` (``3×3×3``) convolutions with norm and LeakyReLU, transposed-convolution upsampling
and skip concatenation, a ``1×1`` head to ``K`` logits. Inputs of any size are zero-padded at the far end to a
multiple of 16 and the logits cropped back, so ``forward`` keeps the input's spatial shape.

Sizes (``K = 3``, one input channel; FLOPs by ``torch.utils.flop_counter.FlopCounterMode``, one forward pass
at batch 1 on a hippocampus slice ``35×51`` (2D) or the whole volume ``35×51×35`` (3D), padded inside to
``48×64`` / ``48×64×48``):

| name | width ``w`` | 2D params | 2D FLOPs | 3D params | 3D FLOPs |
|---|---|---|---|---|---|
| ``unet_tiny`` | 16 | 1.94 M | 0.28 G | 5.65 M | 16.8 G |
| ``unet_small`` | 32 | 7.76 M | 1.13 G | 22.6 M | 66.9 G |
| ``unet_base`` | 64 | 31.0 M | 4.51 G | 90.3 M | 267 G |

Axis legend: B batch, C channels, Z Y X space, K classes.
"""

from __future__ import annotations

import torch
from torch import nn

from napari_medssl.models.layers.spatial import (
    check_spatial_dims,
    conv_nd,
    conv_transpose_nd,
    crop_spatial,
    norm_nd,
    pad_to_multiple,
)
from napari_medssl.models.registry import register_model

__all__ = ["ConvBlock", "UNet", "unet_base", "unet_small", "unet_tiny"]


class ConvBlock(nn.Sequential):
    """Two ``(conv 3 → norm → LeakyReLU)`` steps, ``in_ch → out_ch``, size kept."""

    def __init__(self, in_ch: int, out_ch: int, spatial_dims: int = 2, norm: str = "instance") -> None:
        conv = conv_nd(spatial_dims)
        bias = norm == "none"
        super().__init__(
            conv(in_ch, out_ch, 3, padding=1, bias=bias),
            norm_nd(norm, spatial_dims, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
            conv(out_ch, out_ch, 3, padding=1, bias=bias),
            norm_nd(norm, spatial_dims, out_ch),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UNet(nn.Module):
    """Four-level U-Net segmenter: ``(B, C, *spatial) -> (B, K, *spatial)`` logits for any spatial size.

    Args:
        spatial_dims: 2 (slices ``Y X``) or 3 (volumes ``Z Y X``).
        in_chans: image channels ``C``.
        num_classes: ``K`` output classes (hippocampus: background, anterior, posterior).
        base_width: channels ``w`` of the first level; level ``i`` has ``w·2^i``.
        levels: downsampling steps (4 for the standard U-Net); inputs are padded to multiples of ``2^levels``.
        norm: ``"instance"`` (default), ``"batch"``, ``"group"`` or ``"none"``.
    """

    task = "segment"
    input_size = None

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        num_classes: int = 3,
        base_width: int = 16,
        levels: int = 4,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
        if levels < 1 or base_width < 1:
            raise ValueError(f"levels and base_width must be >= 1, got {levels} and {base_width}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.multiple = 2**levels
        widths = [base_width * 2**i for i in range(levels + 1)]
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        up = conv_transpose_nd(spatial_dims)
        self.pool = pool(2)
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, spatial_dims, norm)
            for c_in, c_out in zip([in_chans, *widths[:-1]], widths)
        )
        self.ups = nn.ModuleList(up(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels)))
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i], spatial_dims, norm) for i in reversed(range(levels))
        )
        self.head = conv_nd(spatial_dims)(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` → ``(B, K, *spatial)`` logits."""
        if x.shape[1:2] != (self.in_chans,):
            raise ValueError(f"expected {self.in_chans} input channel(s), got shape {tuple(x.shape)}")
        x, spatial = pad_to_multiple(x, self.multiple, self.spatial_dims)
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return crop_spatial(self.head(x), spatial)


def _unet(width: int, **overrides) -> UNet:
    return UNet(**{"base_width": width, **overrides})


@register_model
def unet_tiny(**overrides) -> UNet:
    """U-Net with base width 16 (2D by default; ``spatial_dims=3`` for volumes)."""
    return _unet(16, **overrides)


@register_model
def unet_small(**overrides) -> UNet:
    """U-Net with base width 32."""
    return _unet(32, **overrides)


@register_model
def unet_base(**overrides) -> UNet:
    """U-Net with base width 64 (Ronneberger et al.'s widths)."""
    return _unet(64, **overrides)
