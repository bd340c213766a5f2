"""Attention maps of a ViT for display and for models that feed on them: per-head [CLS]→patch maps and DINO's
mass-threshold masks.

:func:`attention_maps` is the one code path from a ViT's last-block [CLS] attention to per-head images (the
DINO-attention CNN's second input, the viewer's overlays); :func:`attention_grid` and :func:`shape_attention`
are its two halves (one forward pass, then shaping), and :func:`mass_threshold_masks` turns raw maps into
DINO's per-head masks (the smallest set of patches holding a fraction of the attention mass).

Axis legend: B batch, C channels, Y X space, H heads.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["attention_grid", "attention_maps", "mass_threshold_masks", "shape_attention"]


@torch.no_grad()
def attention_maps(
    model: nn.Module, x: torch.Tensor, upsample: bool = True, normalize: bool = True
) -> torch.Tensor:
    """Per-head [CLS]→patch attention of a ViT's last block, as images.

    The one code path for attention maps: the DINO-attention CNN's second input and the viewer's overlays.

    Args:
        model: a :class:`~napari_medssl.models.dino.DINO` (its ``backbone``, the teacher, is used), any model with a ViT ``backbone``, or a
            bare :class:`~napari_medssl.models.vit.VisionTransformer`. A model with an ``encoder_view`` method
            (MIRAM: its encoder sees a down-sampled view) is given that view of ``x``.
        x: ``(B, C, Y, X)`` images (any size; the ViT pads to patch multiples).
        upsample: repeat each patch value over the input pixels it covers (``p × p``, nearest, as DINO's script
            does) and crop to ``(Y, X)``; otherwise return the patch grid ``(gh, gw)``.
        normalize: min-max normalise each head's map to [0, 1] (the default: comparable across heads and image
            sizes). ``False`` returns the raw softmax weights (a head's map sums to slightly below 1, since the
            [CLS]→[CLS] weight is dropped); pass these to :func:`mass_threshold_masks`.

    Returns:
        ``(B, H, Y, X)`` (or ``(B, H, gh, gw)``) float32 maps, computed in eval mode at O(N) cost.
    """
    attn, pixels = attention_grid(model, x)
    return shape_attention(attn, pixels, tuple(x.shape[-2:]), upsample, normalize)


def attention_grid(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The raw per-head [CLS] attention on the patch grid, ``(B, H, gh, gw)`` softmax weights, and how many
    input pixels one patch covers along each side (one forward pass; see :func:`attention_maps`)."""
    vit = getattr(model, "backbone", model)
    if not hasattr(vit, "cls_attention"):
        raise ValueError(
            f"attention_maps needs a VisionTransformer or a model with a ViT `backbone`, got {type(model).__name__}"
        )
    view = getattr(model, "encoder_view", None)
    seen = view(x) if callable(view) else x
    was_training = vit.training
    vit.eval()
    try:
        attn = vit.cls_attention(seen).float()  # (B, H, gh, gw)
    finally:
        vit.train(was_training)
    return attn, vit.patch_size * max(1, round(x.shape[-1] / seen.shape[-1]))


def shape_attention(
    attn: torch.Tensor, pixels: int, size: tuple[int, int], upsample: bool = True, normalize: bool = True
) -> torch.Tensor:
    """:func:`attention_grid`'s output as :func:`attention_maps` returns it: min-max normalised per head and/or
    repeated over the ``pixels × pixels`` each patch covers, cropped to ``size`` ``(Y, X)``."""
    if normalize:
        lo = attn.amin(dim=(-2, -1), keepdim=True)
        hi = attn.amax(dim=(-2, -1), keepdim=True)
        attn = (attn - lo) / (hi - lo).clamp_min(1e-12)
    if upsample:
        attn = attn.repeat_interleave(pixels, dim=-2).repeat_interleave(pixels, dim=-1)
        attn = attn[..., : size[0], : size[1]]
    return attn


def mass_threshold_masks(attn: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """DINO's masks: per head, the smallest set of patches holding ``threshold`` of the attention mass.

    Args:
        attn: ``(B, H, gh, gw)`` non-negative maps (e.g. from :meth:`~napari_medssl.models.vit.VisionTransformer.cls_attention`);
            each head is normalised to sum 1 first.
        threshold: fraction of the mass to keep, in (0, 1].

    Returns:
        ``(B, H, gh, gw)`` bool, True on the kept patches. A patch is kept when the mass of the patches
        ranked strictly above it is below ``threshold``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if attn.ndim != 4:
        raise ValueError(f"expected attention maps (B, H, gh, gw), got shape {tuple(attn.shape)}")
    flat = attn.flatten(2).float()  # (B, H, N)
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    vals, order = flat.sort(dim=-1, descending=True)
    before = vals.cumsum(dim=-1) - vals  # mass ranked strictly above each patch
    keep_sorted = before < threshold
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.reshape(attn.shape)
