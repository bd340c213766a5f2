"""Small convolutional classifiers (timm ResNets of reduced width) for patch-level tasks.

The baseline beside the ViT methods in :mod:`napari_medssl.engine.mammo_train`: a ResNet with basic blocks,
a 3-layer "deep tiered" stem and average-pool downsampling (timm's ``resnet10t`` design), and fewer channels,
so that it trains on one CPU core. It has no self-supervised objective (no ``pretrain_loss``): it is trained
from scratch, supervised only. Inputs of any size (global average pooling); ``input_size`` is ``None``.

| name | blocks per stage | channels | params (1 channel in, 2 classes) |
|---|---|---|---|
| ``cnn_tiny`` | 1, 1, 1, 1 | 24, 48, 96, 192 | 0.69 M |
| ``cnn_small`` | 2, 2, 2, 2 | 32, 64, 128, 256 | 2.8 M |

Axis legend: B batch, C channels, Y X space, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from napari_medssl.models.registry import register_model

__all__ = ["cnn_small", "cnn_tiny", "resnet_classifier"]


def resnet_classifier(
    layers: Sequence[int],
    channels: Sequence[int],
    in_chans: int = 1,
    num_classes: int = 2,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """A timm ResNet (basic blocks, deep-tiered stem, avg-down) with ``channels`` per stage.

    ``num_classes=0``: no head, ``forward`` returns pooled features ``(B, channels[-1])``; else logits
    ``(B, K)``. The module carries the attributes :func:`~napari_medssl.models.spec.build_spec` reads.
    """
    from timm.models.resnet import BasicBlock, ResNet

    if len(layers) != len(channels):
        raise ValueError(f"one channel count per stage: layers {list(layers)}, channels {list(channels)}")
    model = ResNet(
        BasicBlock,
        list(layers),
        channels=tuple(channels),
        num_classes=num_classes,
        in_chans=in_chans,
        stem_width=max(8, channels[0] // 2),
        stem_type="deep_tiered",
        avg_down=True,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    model.spatial_dims = 2
    model.in_chans = in_chans
    model.task = "classify" if num_classes > 0 else None
    model.input_size = None
    return model


@register_model
def cnn_tiny(**overrides) -> nn.Module:
    """ResNet of 4 stages × 1 basic block, 24–192 channels (≈ 0.69 M parameters)."""
    cfg = dict(layers=(1, 1, 1, 1), channels=(24, 48, 96, 192))
    return resnet_classifier(**{**cfg, **overrides})


@register_model
def cnn_small(**overrides) -> nn.Module:
    """ResNet of 4 stages × 2 basic blocks, 32–256 channels (≈ 2.8 M parameters)."""
    cfg = dict(layers=(2, 2, 2, 2), channels=(32, 64, 128, 256))
    return resnet_classifier(**{**cfg, **overrides})
