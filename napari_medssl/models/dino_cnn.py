"""DINO-attention CNN: a convolutional segmenter fed with a DINO ViT's attention maps (arXiv 2304.14571).

Two convolutional encoders run side by side: one on the image, one on the per-head [CLS] attention maps of a
frozen DINO ViT stacked as channels (``H`` heads → ``H`` channels). At every level their features are
concatenated and fused by a ``1×1`` conv; the fused maps are the skips of a U-Net-style decoder. The maps come
from :func:`napari_medssl.models.attention.attention_maps`, the same function the viewer's overlay calls, so what
the user looks at is exactly this model's second input.

The DINO backbone (the teacher ViT of ``create_model(dino_model)``, or of a checkpoint given as
``dino_checkpoint``) is held inside the model, frozen and always in eval mode; ``forward(x)`` takes only the
image: it resizes ``x`` to the backbone's ``input_size`` (bilinear), computes the maps, resizes them back to
``x``'s size, and runs the two encoders. Inputs of any size are zero-padded to a multiple of ``2^levels`` and
the logits cropped back.

Sizes (one channel in, ``K = 3``; FLOPs of one ``forward`` at batch 1 on a hippocampus slice ``35×51`` by
``FlopCounterMode``, the DINO backbone's share included; params count the trainable CNN only):

| name | image / attention widths | DINO backbone | trainable params | FLOPs (of which DINO) |
|---|---|---|---|---|
| ``dinocnn_tiny`` | 16…128 / 8…64 | ``dino_tiny`` (ViT E 192, patch 8, 64²) | 0.59 M | 0.50 G (0.32 G) |
| ``dinocnn_base`` | 32…256 / 16…128 | ``dino_small`` (ViT-S/16, 224²) | 2.35 M | 9.25 G (8.54 G) |

Axis legend: B batch, C channels, Y X space, H heads, K classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from napari_medssl.models.layers.spatial import crop_spatial, norm_nd, pad_to_multiple
from napari_medssl.models.registry import create_model, read_checkpoint, register_model
from napari_medssl.models.unet import ConvBlock

__all__ = ["DinoCNN", "build_dino_backbone", "dinocnn_base", "dinocnn_tiny"]


def build_dino_backbone(
    dino_model: str = "dino_tiny", dino_checkpoint: str | os.PathLike | None = None
) -> nn.Module:
    """The ViT whose attention feeds the CNN: ``create_model(dino_model)``'s teacher, optionally with weights.

    Args:
        dino_model: a registered DINO model name (``"dino_tiny"``, ``"dino_small"``).
        dino_checkpoint: a zoo/engine checkpoint (safetensors with a model config: the model it names is built
            and loaded) or an official DINO weights file (loaded into ``dino_model``).

    Raises:
        FileNotFoundError: ``dino_checkpoint`` does not exist.
        ValueError: the checkpoint is not a DINO/ViT model.
    """
    from napari_medssl.models.dino_import import load_dino_checkpoint
    from napari_medssl.models.registry import load_model

    model = None
    if dino_checkpoint is not None:
        if not os.path.isfile(dino_checkpoint):
            raise FileNotFoundError(f"dino_checkpoint not found: {dino_checkpoint}")
        try:
            config = read_checkpoint(dino_checkpoint)[1]
        except ValueError:
            config = {}
        if "name" in config:
            model = load_model(dino_checkpoint)
        else:
            model = create_model(dino_model)
            load_dino_checkpoint(dino_checkpoint, model)
    else:
        model = create_model(dino_model)
    vit = getattr(model, "backbone", model)
    if not hasattr(vit, "cls_attention"):
        raise ValueError(
            f"the DINO backbone must be a ViT with cls_attention (a dino_* model); got {type(model).__name__}"
        )
    return vit


class DualEncoder(nn.Module):
    """One U-Net encoder: ``ConvBlock`` per level, max-pool between levels; returns every level's map."""

    def __init__(self, in_ch: int, widths: Sequence[int], norm: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(a, b, 2, norm) for a, b in zip([in_ch, *widths[:-1]], widths))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class DinoCNN(nn.Module):
    """Image encoder + attention-map encoder, fused per level, U-Net decoder: ``(B, C, Y, X) -> (B, K, Y, X)``.

    Args:
        in_chans: image channels ``C``.
        num_classes: ``K``.
        base_width: image-encoder width at level 0 (doubling per level).
        attn_width: attention-encoder width at level 0 (doubling per level).
        levels: downsampling steps.
        norm: ``"instance"``, ``"batch"``, ``"group"`` or ``"none"``.
        dino_model: registered DINO model whose teacher ViT gives the maps.
        dino_checkpoint: weights for it (see :func:`build_dino_backbone`); without it the backbone is random,
            which is only useful for tests.
        dino_resize: resize the image to the backbone's ``input_size`` before computing the maps.
        spatial_dims: must be 2 (accepted so every segmenter takes the same keyword).
    """

    task = "segment"
    spatial_dims = 2
    input_size = None

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 3,
        base_width: int = 16,
        attn_width: int = 8,
        levels: int = 3,
        norm: str = "instance",
        dino_model: str = "dino_tiny",
        dino_checkpoint: str | None = None,
        dino_resize: bool = True,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"the DINO-attention CNN is 2D: spatial_dims must be 2, got {spatial_dims!r}")
        if in_chans < 1 or num_classes < 1 or levels < 1:
            raise ValueError(
                f"in_chans, num_classes, levels must be >= 1, got {in_chans}, {num_classes}, {levels}"
            )
        self.in_chans, self.num_classes = in_chans, num_classes
        self.multiple = 2**levels
        self.dino_resize = dino_resize
        self.dino = build_dino_backbone(dino_model, dino_checkpoint)
        self.dino.requires_grad_(False)
        self.dino.eval()
        heads = self.dino.num_heads
        widths = [base_width * 2**i for i in range(levels + 1)]
        attn_widths = [attn_width * 2**i for i in range(levels + 1)]
        self.image_encoder = DualEncoder(in_chans, widths, norm)
        self.attn_encoder = DualEncoder(heads, attn_widths, norm)
        self.fuse = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(w + a, w, 1, bias=False), norm_nd(norm, 2, w), nn.LeakyReLU(0.01, inplace=True)
            )
            for w, a in zip(widths, attn_widths)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(levels))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i], 2, norm) for i in reversed(range(levels))
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def train(self, mode: bool = True) -> DinoCNN:
        """Set train/eval mode; the frozen DINO backbone always stays in eval mode."""
        super().train(mode)
        self.dino.eval()
        return self

    def dino_input(self, x: torch.Tensor) -> torch.Tensor:
        """The image as the backbone sees it: its channel count, resized to its ``input_size``."""
        want = self.dino.in_chans
        if x.shape[1] != want:
            x = x.mean(dim=1, keepdim=True).expand(-1, want, -1, -1)
        size = getattr(self.dino, "input_size", None)
        if self.dino_resize and size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Y, X)`` → the backbone's per-head maps ``(B, H, Y, X)`` in [0, 1] (no gradient)."""
        from napari_medssl.models.attention import attention_maps

        maps = attention_maps(self.dino, self.dino_input(x), upsample=True)  # (B, H, y, x) at the DINO size
        if tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
            maps = F.interpolate(maps, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return maps.to(x.dtype)

    def forward(self, x: torch.Tensor, maps: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, Y, X)`` → ``(B, K, Y, X)`` logits.

        Args:
            x: images.
            maps: precomputed :meth:`attention` maps ``(B, H, Y, X)``; computed here when ``None``.
        """
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, Y, X) image, got shape {tuple(x.shape)}")
        if maps is None:
            maps = self.attention(x)
        x, spatial = pad_to_multiple(x, self.multiple, 2)
        maps, _ = pad_to_multiple(maps, self.multiple, 2)
        fused = [
            fuse(torch.cat([a, b], dim=1))
            for fuse, a, b in zip(self.fuse, self.image_encoder(x), self.attn_encoder(maps))
        ]
        y = fused.pop()
        for up, dec in zip(self.ups, self.decoders):
            y = dec(torch.cat([fused.pop(), up(y)], dim=1))
        return crop_spatial(self.head(y), spatial)


@register_model
def dinocnn_tiny(**overrides) -> DinoCNN:
    """DINO-attention CNN on ``dino_tiny`` maps, image widths 16…128, attention widths 8…64 (3 downsamplings)."""
    return DinoCNN(**{"base_width": 16, "attn_width": 8, "dino_model": "dino_tiny", **overrides})


@register_model
def dinocnn_base(**overrides) -> DinoCNN:
    """DINO-attention CNN on ``dino_small`` (ViT-S/16) maps, image widths 32…256, attention widths 16…128."""
    return DinoCNN(**{"base_width": 32, "attn_width": 16, "dino_model": "dino_small", **overrides})
