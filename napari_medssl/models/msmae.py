"""Medical supervised masked autoencoder, MSMAE (Mao et al. 2023, https://arxiv.org/abs/2305.05871).

An :class:`~napari_medssl.models.mae.MAE` whose masking follows the model's own supervised attention:

- Weights: the last block's [CLS]→patch attention, per-head min-max normalised and averaged over heads
  (:func:`~napari_medssl.models.masking.attention_weights_from_cls`).
- Mask / throw / keep: patches are drawn without replacement with probability ∝ weight; 45 % are masked and
  reconstructed, 30 % thrown away (neither encoded nor reconstructed), 25 % encoded.
- Pre-training loss: reconstruction of the masked patches + 0.1 × cross-entropy of the head on [CLS].
  The first ``random_frac`` of training uses plain random masking (ratio 0.75), as the reference code does.
- Fine-tuning: ``forward`` in train mode applies the same mask-and-throw, so only 25 % of the tokens pass the
  encoder (the source of the paper's FLOP savings); eval mode uses all tokens.

Where the weight maps come from (the reference stores one map per training image and recomputes them every few
epochs; a model cannot know which dataset item a batch holds): callers that keep per-sample maps pass them as
``weights``. Otherwise, with ``guide="prior"`` (default), the model keeps an attention prior, the mean weight
map of a batch, recomputed from its own ``cls_attention`` on the batch after each refresh point of
:meth:`MSMAE.on_train_step` (every ``refresh_every`` of training): between refreshes masking costs nothing
extra. ``guide="image"`` recomputes each batch's own maps on every training call (exact per image, but an extra
no-grad encoder pass per step).

Axis legend: B batch, C channels, Y X space, N patches, E embedding, H heads, K classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from napari_medssl.models.mae import _BASE, _BASE_DEC, _TINY, _TINY_DEC, MAE
from napari_medssl.models.masking import attention_guided_masking, attention_weights_from_cls
from napari_medssl.models.registry import register_model

__all__ = ["MSMAE", "msmae_base", "msmae_tiny"]

_GUIDES = ("prior", "image")


class MSMAE(MAE):
    """MSMAE on the project's ViT (a :class:`MAE` with attention-guided masking and a [CLS] supervision term).

    Args:
        mask_ratio: fraction of patches masked and reconstructed in the guided phase.
        throw_ratio: fraction of patches thrown away.
        random_mask_ratio: mask ratio of the random-masking phase.
        random_frac: fraction of training (by ``on_train_step``) that uses random masking.
        refresh_every: fraction of training between refreshes of the attention prior.
        cls_weight: weight of the cross-entropy term.
        guide: ``"prior"`` or ``"image"`` (see the module docstring).
        **mae_kwargs: :class:`MAE` / ``VisionTransformer`` arguments. ``num_classes > 0`` enables the
            supervised term (and the classification head used in fine-tuning).
    """

    def __init__(
        self,
        mask_ratio: float = 0.45,
        throw_ratio: float = 0.30,
        random_mask_ratio: float = 0.75,
        random_frac: float = 0.4,
        refresh_every: float = 0.1,
        cls_weight: float = 0.1,
        guide: str = "prior",
        **mae_kwargs,
    ) -> None:
        super().__init__(mask_ratio=random_mask_ratio, **mae_kwargs)
        if mask_ratio <= 0 or throw_ratio < 0 or mask_ratio + throw_ratio >= 1:
            raise ValueError(
                f"need mask_ratio > 0, throw_ratio >= 0, mask_ratio + throw_ratio < 1; got {mask_ratio}, {throw_ratio}"
            )
        if guide not in _GUIDES:
            raise ValueError(f"guide must be one of {_GUIDES}, got {guide!r}")
        if not 0.0 <= random_frac <= 1.0 or not 0.0 < refresh_every <= 1.0:
            raise ValueError(
                f"random_frac must be in [0, 1] and refresh_every in (0, 1]; got {random_frac}, {refresh_every}"
            )
        self.guided_mask_ratio = mask_ratio
        self.throw_ratio = throw_ratio
        self.random_frac = random_frac
        self.refresh_every = refresh_every
        self.cls_weight = cls_weight
        self.guide = guide
        self.masking = "random"  # pre-training phase: "random" then "guided" (set by on_train_step)
        self.refresh_due = True
        self.register_buffer("attn_prior", torch.ones(1, 1, *self.base_grid), persistent=False)

    # -- schedule -------------------------------------------------------------------------------------------
    def on_train_step(self, step: int, total_steps: int) -> None:
        """Called after each optimiser step: switch random → guided masking, mark refresh points."""
        total = max(int(total_steps), 1)
        switch = math.ceil(self.random_frac * total)
        self.masking = "guided" if step >= switch else "random"
        interval = max(1, round(self.refresh_every * total))
        if step % interval == 0 or step == switch:
            self.refresh_due = True

    # -- weights --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def own_weights(self, x: torch.Tensor) -> torch.Tensor:
        """This model's MSMAE weights for ``(B, C, Y, X)``: ``(B, gh, gw)`` in [0, 1] (eval-mode attention)."""
        was_training = self.training
        self.eval()
        try:
            attn = self.cls_attention(x)  # (B, H, gh, gw)
        finally:
            self.train(was_training)
        return attention_weights_from_cls(attn).reshape(x.shape[0], *attn.shape[-2:])

    def guide_weights(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(B, N)`` weights that guide masking of ``x`` (see the module docstring for the sources)."""
        b = x.shape[0]
        grid = self.grid_size(x)
        n = grid[0] * grid[1]
        if weights is not None:
            if weights.shape not in ((b, n), (b, *grid)):
                raise ValueError(f"weights must have shape (B, N) = {(b, n)} or (B, gh, gw) = {(b, *grid)}")
            return weights.reshape(b, n).to(x.device)
        if self.guide == "image" or self.refresh_due:
            w = self.own_weights(x)  # (B, gh, gw)
            if self.guide == "prior":
                mean = w.mean(dim=0, keepdim=True)[:, None]  # (1, 1, gh, gw)
                self.attn_prior = F.interpolate(
                    mean, size=self.base_grid, mode="bilinear", align_corners=False
                )
                self.refresh_due = False
            return w.reshape(b, n)
        prior = F.interpolate(self.attn_prior, size=grid, mode="bilinear", align_corners=False)
        return prior.reshape(1, n).expand(b, -1)

    # -- objectives -----------------------------------------------------------------------------------------
    def encode_guided(
        self, x: torch.Tensor, weights: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mask-and-throw then encode the kept 25 %: ``latent (B, 1 + K, E)`` and the masking dict."""
        w = self.guide_weights(x, weights)
        parts = attention_guided_masking(w, self.guided_mask_ratio, self.throw_ratio, generator=generator)
        parts = {k: v.to(x.device) for k, v in parts.items()}
        return self.encode_visible(self.embed_patches(x), parts["ids_keep"]), parts

    def pretrain_loss(
        self, x: torch.Tensor, y: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Reconstruction of the masked patches + ``cls_weight`` × cross-entropy on [CLS].

        Args:
            x: ``(B, C, Y, X)``.
            y: ``(B,)`` class indices; negative entries are unlabelled. Without ``y`` (or without a head) the
                supervised term is left out.
            weights: optional per-sample guide maps ``(B, gh, gw)``; they force guided masking.

        Returns:
            ``loss`` (to optimise), ``recon`` and ``cls`` (detached parts).
        """
        if self.masking == "random" and weights is None:
            latent, _, ids_keep, ids_mask = self.forward_encoder(x, self.mask_ratio)
        else:
            latent, parts = self.encode_guided(x, weights)
            ids_keep, ids_mask = parts["ids_keep"], parts["ids_mask"]
        pred = self.forward_decoder(latent, ids_keep, ids_mask, self.grid_size(x))
        recon = self.forward_loss(x, pred[:, ids_keep.shape[1] :], ids_mask)
        cls = recon.new_zeros(())
        if y is not None and self.num_classes > 0:
            y = y.to(x.device).long()
            labelled = y >= 0
            if labelled.any():
                logits = self.forward_head(latent)
                cls = F.cross_entropy(logits[labelled], y[labelled])
        loss = recon + self.cls_weight * cls
        return {"loss": loss, "recon": recon.detach(), "cls": cls.detach()}

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Train mode: mask-and-throw, 25 % of the tokens through the encoder. Eval mode: all tokens.

        Returns logits ``(B, K)`` (or pooled features ``(B, E)`` without a head).
        """
        if not self.training:
            return super().forward(x)
        latent, _ = self.encode_guided(x, weights)
        return self.forward_head(latent)

    # -- display --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def masking_pattern(self, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The overlay: this model's weight map and a sampled pattern for ``(B, C, Y, X)``.

        Returns:
            ``weights (B, gh, gw)`` in [0, 1] and ``labels (B, gh, gw)`` long: 0 keep, 1 mask, 2 throw.
        """
        w = self.own_weights(x)
        gen = torch.Generator(device=w.device).manual_seed(int(seed))
        parts = attention_guided_masking(
            w.flatten(1), self.guided_mask_ratio, self.throw_ratio, generator=gen
        )
        return w, parts["labels"].reshape(w.shape)


@register_model
def msmae_tiny(**overrides) -> MSMAE:
    """MSMAE for 2 CPU cores: ViT E 192, depth 6, 3 heads, patch 8 on 64²; decoder 128 × 2 blocks."""
    return MSMAE(**{**_TINY, **_TINY_DEC, **overrides})


@register_model
def msmae_base(**overrides) -> MSMAE:
    """The paper's MSMAE: ViT-B/16 at 224², decoder 512 × 8 blocks."""
    return MSMAE(**{**_BASE, **_BASE_DEC, **overrides})
