"""Token masking: MAE's random masking and MSMAE's attention-guided mask / throw / keep.

Randomness is injected (a noise tensor or a ``torch.Generator``) so masks are reproducible and testable.

Axis legend: B batch, N tokens (patches), E embedding, H heads.
"""

from __future__ import annotations

import torch

__all__ = ["attention_guided_masking", "attention_weights_from_cls", "random_masking"]


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform noise in [0, 1), drawn on the generator's device and moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking by sorting noise.

    The ``int(N · (1 − mask_ratio))`` tokens with the smallest noise are kept, in ascending-noise order.

    Args:
        x: tokens ``(B, N, E)``.
        mask_ratio: fraction of tokens to mask, in [0, 1).
        noise: ``(B, N)`` scores to sort (small = keep); drawn uniformly when omitted.
        generator: random source for the noise when ``noise`` is omitted.

    Returns:
        ``x_kept (B, K, E)``, ``mask (B, N)`` float with 1 = masked, ``ids_restore (B, N)`` (the position of
        each token in the sorted order: unshuffles ``cat([kept, masked])``), ``ids_keep (B, K)``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, n, e = x.shape
    len_keep = int(n * (1 - mask_ratio))
    if noise is None:
        noise = _uniform((b, n), x.device, generator)
    elif noise.shape != (b, n):
        raise ValueError(f"noise must have shape (B, N) = {(b, n)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, e))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore, ids_keep


def attention_guided_masking(
    weights: torch.Tensor,
    mask_ratio: float = 0.45,
    throw_ratio: float = 0.30,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """MSMAE's attention-guided mask / throw / keep (Mao et al. 2023).

    Patches are drawn without replacement with probability ∝ weight (Gumbel top-k: the order of
    ``log w + Gumbel noise`` is a sample of sequential weighted draws). The first ``int(N · mask_ratio)`` drawn
    are masked (reconstructed), the next up to ``int(N · (mask_ratio + throw_ratio))`` are thrown away (neither
    encoded nor reconstructed), the rest are kept (encoded). High-weight patches are therefore masked most often.

    Args:
        weights: ``(B, N)`` non-negative patch weights (e.g. :func:`attention_weights_from_cls`). Zero-weight
            patches are drawn last; an all-zero row is treated as uniform.
        mask_ratio: fraction of patches masked.
        throw_ratio: fraction of patches thrown.
        generator: random source; the same seed gives the same pattern.

    Returns:
        dict with ``ids_keep (B, K)``, ``ids_mask (B, M)``, ``ids_throw (B, T)`` (each sorted ascending, exact
        counts for every sample) and ``labels (B, N)`` long: 0 keep, 1 mask, 2 throw.
    """
    if mask_ratio < 0 or throw_ratio < 0 or mask_ratio + throw_ratio >= 1:
        raise ValueError(
            f"need mask_ratio >= 0, throw_ratio >= 0 and mask_ratio + throw_ratio < 1; "
            f"got {mask_ratio} and {throw_ratio}"
        )
    if weights.ndim != 2:
        raise ValueError(f"weights must have shape (B, N), got {tuple(weights.shape)}")
    b, n = weights.shape
    n_mask = int(n * mask_ratio)
    n_drop = int(n * (mask_ratio + throw_ratio))  # masked + thrown, as in the reference code
    w = weights.detach().float().clamp_min(0)
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / n))
    u = _uniform((b, n), w.device, generator).clamp(1e-12, 1 - 1e-7)
    keys = w.clamp_min(1e-30).log() - torch.log(-torch.log(u))  # log w + Gumbel(0, 1)
    order = torch.argsort(keys, dim=1, descending=True)
    ids_mask = order[:, :n_mask].sort(dim=1).values
    ids_throw = order[:, n_mask:n_drop].sort(dim=1).values
    ids_keep = order[:, n_drop:].sort(dim=1).values
    labels = torch.zeros(b, n, dtype=torch.long, device=w.device)
    labels.scatter_(1, ids_mask, 1)
    labels.scatter_(1, ids_throw, 2)
    return {"ids_keep": ids_keep, "ids_mask": ids_mask, "ids_throw": ids_throw, "labels": labels}


def attention_weights_from_cls(attn: torch.Tensor) -> torch.Tensor:
    """MSMAE's patch weights from [CLS] attention maps: per-head min-max normalised, averaged over heads.

    Args:
        attn: ``(B, H, gh, gw)`` (e.g. ``VisionTransformer.cls_attention``).

    Returns:
        ``(B, N)`` weights in [0, 1], ``N = gh · gw`` row-major.
    """
    if attn.ndim != 4:
        raise ValueError(f"expected attention maps (B, H, gh, gw), got shape {tuple(attn.shape)}")
    flat = attn.flatten(2).float()  # (B, H, N)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).mean(dim=1)
