"""Saliency for ViT classifiers and how faithful it is: Grad-CAM, attention rollout, deletion/insertion AUC.

- :func:`grad_cam` — class-specific Grad-CAM (Selvaraju et al. 2017) on the tokens entering the last block:
  per channel the mean gradient of the class logit over the patches weights the patch activations; ReLU.
- :func:`attention_rollout` — Abnar & Zuidema 2020: per block the head-averaged attention plus the identity
  (the residual), rows renormalised, multiplied through the blocks; the [CLS] row over the patches.
- :func:`raw_attention` — the last block's [CLS] attention averaged over heads (what the DINO overlay shows).
- :func:`deletion_insertion` — Petsiuk et al. 2018 (RISE): patches are removed from the image (replaced by a
  blurred copy) most salient first, or inserted into the blurred copy most salient first; the area under the
  class-probability curve is small for deletion and large for insertion when the map is faithful.

All maps are ``(B, gh, gw)`` on the ViT's patch grid, non-negative; pure torch, no Qt. A model here is a ViT
classifier (``task == "classify"``): a :class:`~napari_medssl.models.vit.VisionTransformer` or a model with a
ViT ``backbone`` whose forward runs it (DINO fine-tuned).

Axis legend: B batch, C channels, Y X space, N tokens, E embedding, H heads, K classes, S steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "attention_rollout",
    "deletion_insertion",
    "grad_cam",
    "patch_pixels",
    "random_maps",
    "raw_attention",
]


def _vit(model: nn.Module) -> nn.Module:
    """The ViT that sees the image: MIRAM's ``encoder``, a ``backbone`` (DINO), or the model itself."""
    vit = model.encoder if hasattr(model, "encoder_view") else getattr(model, "backbone", model)
    if not hasattr(vit, "blocks") or not hasattr(vit, "grid_size"):
        raise ValueError(f"saliency maps need a ViT-based model, got {type(model).__name__}")
    return vit


def _view(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the ViT sees of ``x`` (MIRAM's encoder a down-sampled view; others ``x`` itself)."""
    view = getattr(model, "encoder_view", None)
    return view(x) if callable(view) else x


def patch_pixels(model: nn.Module, x: torch.Tensor) -> int:
    """Input pixels one cell of the saliency grid covers along each side."""
    return int(_vit(model).patch_size) * max(1, round(x.shape[-1] / _view(model, x).shape[-1]))


def _check_classifier(model: nn.Module) -> None:
    if model.spec.task != "classify":
        raise ValueError(
            f"Grad-CAM needs a classifier (task 'classify'); {type(model).__name__} is a "
            f"{model.spec.task or 'model without a task'!r}"
        )


def _targets(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(logits.shape[0])
    if ((t < 0) | (t >= logits.shape[1])).any():
        raise ValueError(f"target class out of range: the model has {logits.shape[1]} classes")
    return t


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None) -> torch.Tensor:
    """Class-specific Grad-CAM on the patch tokens entering the last block.

    Args:
        model: a ViT classifier (eval mode is used; the mode is restored).
        x: ``(B, C, Y, X)`` inputs.
        target: class per image (int or ``(B,)``); ``None``: the predicted class.

    Returns:
        ``(B, gh, gw)`` float32, ≥ 0 (all zeros where no patch argues for the class).
    """
    _check_classifier(model)
    vit = _vit(model)
    grid = vit.grid_size(_view(model, x))
    store: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, args: tuple) -> None:
        args[0].retain_grad()
        store["tokens"] = args[0]

    was_training = model.training
    model.eval()
    handle = vit.blocks[-1].register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            inp = x.detach().clone().requires_grad_(True)
            logits = model(inp)
            t = _targets(logits, target)
            logits.gather(1, t[:, None]).sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    acts = store["tokens"][:, 1:].detach()  # (B, N, E), [CLS] dropped
    grads = store["tokens"].grad[:, 1:]
    weights = grads.mean(dim=1, keepdim=True)  # (B, 1, E)
    cam = F.relu((weights * acts).sum(dim=-1))  # (B, N)
    return cam.reshape(x.shape[0], *grid).float()


def _block_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Full softmax attention of a timm ``Block`` on its input tokens: ``(B, M, E) -> (B, H, M, M)``."""
    attn = block.attn
    b, m, _ = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(b, m, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def attention_rollout(model: nn.Module, x: torch.Tensor, discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout: ``(B, C, Y, X) -> (B, gh, gw)`` (the [CLS] row of the rolled-out attention).

    Args:
        model: a ViT (any task) or a model with a ViT ``backbone``.
        x: ``(B, C, Y, X)``.
        discard_ratio: per block, zero this fraction of the smallest head-averaged weights (not the
            [CLS] column) before adding the identity (jacobgil's variant); 0 keeps all.

    Memory is ``O(N²)`` per block: meant for the classifier's own input size.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    vit = _vit(model)
    view = _view(model, x)
    grid = vit.grid_size(view)
    was_training = vit.training
    vit.eval()
    try:
        tokens = vit.prepare_tokens(view)
        m = tokens.shape[1]
        eye = torch.eye(m, device=x.device)
        result = eye.expand(x.shape[0], m, m).clone()
        for blk in vit.blocks:
            a = _block_attention(blk, tokens).mean(dim=1)  # (B, M, M)
            if discard_ratio > 0:
                flat = a[:, :, 1:].reshape(a.shape[0], -1)
                k = int(flat.shape[1] * discard_ratio)
                if k:
                    idx = flat.topk(k, dim=1, largest=False).indices
                    flat = flat.scatter(1, idx, 0.0)
                    a = torch.cat([a[:, :, :1], flat.reshape(a.shape[0], m, m - 1)], dim=2)
            a = (a + eye) / 2
            a = a / a.sum(dim=-1, keepdim=True)
            result = a @ result
            tokens = blk(tokens)
    finally:
        vit.train(was_training)
    return result[:, 0, 1:].reshape(x.shape[0], *grid).float()


@torch.no_grad()
def raw_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last block's [CLS]→patch attention, mean over heads: ``(B, C, Y, X) -> (B, gh, gw)``."""
    from napari_medssl.models.attention import attention_grid

    return attention_grid(model, x)[0].mean(dim=1).float()


def random_maps(shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random saliency maps of ``shape`` (uniform noise: a random patch order), ``(n, *shape)``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand((n, *shape), generator=gen)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(x.shape[1], 1)[:, None]  # (C, 1, 2r+1)
    y = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k[:, :, None, :], groups=x.shape[1])
    return F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k[:, :, :, None], groups=x.shape[1])


@torch.no_grad()
def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    saliency: torch.Tensor,
    target: int,
    blur_sigma: float = 4.0,
    batch_size: int = 65,
    patches_per_step: int = 1,
) -> dict[str, Any]:
    """Deletion and insertion curves of one image under one saliency map, patch by patch.

    Args:
        model: a classifier (eval mode).
        x: ``(1, C, Y, X)`` one image (Y, X multiples of the patch size).
        saliency: ``(gh, gw)`` map on the patch grid; patches are taken most salient first (ties by index).
        target: the class whose softmax probability is tracked.
        blur_sigma: the baseline is the image blurred with this sigma (pixels).
        batch_size: perturbed images per forward pass.
        patches_per_step: patches removed/inserted per step (1: every patch; more: a coarser, cheaper curve).

    Returns:
        ``{"deletion": (S,) probabilities, "insertion": (S,), "deletion_auc", "insertion_auc"}`` with
        ``S = ceil(gh·gw / patches_per_step) + 1`` steps (none … all patches); AUCs by the trapezoid rule over
        the fraction of patches taken.
    """
    p = patch_pixels(model, x)
    gh, gw = saliency.shape[-2:]
    if (x.shape[-2], x.shape[-1]) != (gh * p, gw * p):
        raise ValueError(f"image {tuple(x.shape[-2:])} does not match the map {(gh, gw)} with {p}-px patches")
    n = gh * gw
    order = torch.argsort(saliency.reshape(-1).float(), descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    counts = torch.cat([torch.arange(0, n, max(1, int(patches_per_step))), torch.tensor([n])])  # (S,)
    steps = counts[:, None]
    taken = (rank[None] < steps).float().reshape(len(counts), 1, gh, gw)  # (S, 1, gh, gw): 1 = taken
    taken = taken.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1).to(x.device, x.dtype)
    base = _blur(x, blur_sigma)
    curves = {}
    for name, images in (
        ("deletion", lambda t: x * (1 - t) + base * t),
        ("insertion", lambda t: base * (1 - t) + x * t),
    ):
        probs = []
        for i in range(0, len(counts), batch_size):
            probs.append(model(images(taken[i : i + batch_size])).softmax(dim=1)[:, target].float().cpu())
        curves[name] = torch.cat(probs)
    frac = counts.float() / n
    return {
        **curves,
        "deletion_auc": float(torch.trapezoid(curves["deletion"], frac)),
        "insertion_auc": float(torch.trapezoid(curves["insertion"], frac)),
    }
