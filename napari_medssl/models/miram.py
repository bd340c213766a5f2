"""MIRAM: masked image reconstruction across multiple scales (Vo et al. 2025; no public code).

One ViT encoder sees the visible patches of a *low-resolution* view of the image (the input downsampled by an
integer ``scale``, 2 by default). Two decoders start from the same latent (encoded tokens + mask tokens on the
low-resolution patch grid):

- a standard transformer decoder (exact SDPA attention) reconstructs the low-resolution image (global semantics);
- a high-resolution decoder reconstructs the full-resolution image (detail) from ``scale²`` × more tokens
  (same patch size, twice the side): the low-resolution token grid is moved to the high-resolution grid by
  bilinear interpolation, and its blocks use a linear-complexity attention, ``hr_attention`` =
  ``"nystrom"`` (default, the paper's best), ``"performer"``, ``"linformer"`` or ``"sdpa"`` (exact, for
  comparison), built with :func:`~napari_medssl.models.layers.make_attention`.

The loss is the weighted sum of the MSE on the masked patches at both scales (a masked low-resolution patch
masks the ``scale × scale`` high-resolution patches it covers). Choices the paper leaves open and made here:
MAE's defaults (mask ratio 0.75, patch 16, decoder 512 × 8 for the paper-sized model), both decoders fed from
the encoder latent (in parallel, not in cascade), equal loss weights.

Fine-tuning: ``forward(x)`` takes the full-resolution input (``input_size``), makes the low-resolution view
itself and returns the encoder's classification logits (``num_classes > 0``) or pooled features.

Axis legend: B batch, C channels, Y X space, N patches, K kept tokens, E embedding, D decoder width.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from napari_medssl.models.layers import make_attention
from napari_medssl.models.layers.patch_embed import to_2tuple
from napari_medssl.models.layers.pos_embed import resize_pos_embed, sincos_2d
from napari_medssl.models.mae import patchify, unpatchify
from napari_medssl.models.masking import random_masking
from napari_medssl.models.registry import register_model
from napari_medssl.models.vit import VisionTransformer, init_vit_weights

__all__ = ["MIRAM", "DecoderBlock", "ScaleDecoder", "miram_base", "miram_tiny"]


class DecoderBlock(nn.Module):
    """Pre-norm transformer block ``x + attn(norm(x))``, ``x + mlp(norm(x))`` with a selectable attention kind.

    Args:
        dim: width ``D``.
        num_heads: heads.
        attention: kind for ``make_attention`` (``"sdpa"``, ``"nystrom"``, ``"performer"``, ``"linformer"``).
        attention_kw: the kind's options.
        mlp_ratio: MLP hidden size / ``D``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attention: str = "sdpa",
        attention_kw: dict[str, Any] | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = make_attention(attention, dim, num_heads, qkv_bias=True, **(attention_kw or {}))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ScaleDecoder(nn.Module):
    """MAE-style decoder for one scale: latent on the low-resolution grid -> pixel patches on ``grid``.

    Args:
        embed_dim: encoder token size ``E``.
        dim: decoder width ``D``.
        depth: decoder blocks.
        num_heads: decoder heads.
        grid: patch grid ``(gh, gw)`` this decoder predicts (at the model's ``input_size``).
        out_dim: values per predicted patch (``p·p·C``).
        attention: attention kind of the blocks (see ``make_attention``).
        attention_kw: the kind's options (``num_landmarks``, ``nb_features``, ``k``, ``seq_len`` ...).
        mlp_ratio: block MLP hidden size / ``D``.
    """

    def __init__(
        self,
        embed_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid: tuple[int, int],
        out_dim: int,
        attention: str = "sdpa",
        attention_kw: dict[str, Any] | None = None,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.attention = attention
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid, cls_token=True)[None])
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, attention, attention_kw, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)

    def forward(
        self,
        latent: torch.Tensor,
        ids_keep: torch.Tensor,
        low_grid: tuple[int, int],
        out_grid: tuple[int, int],
    ) -> torch.Tensor:
        """Decode.

        Args:
            latent: encoder output ``(B, 1 + K, E)``, [CLS] first.
            ids_keep: ``(B, K)`` low-resolution positions of the encoded patches.
            low_grid: the encoder's patch grid ``(gh, gw)``.
            out_grid: the grid to predict; when it differs from ``low_grid`` the token grid is resized to it by
                bilinear interpolation.

        Returns:
            ``(B, gh'·gw', p·p·C)`` predicted patches, row-major on ``out_grid``.
        """
        z = self.embed(latent)  # (B, 1 + K, D)
        b, _, d = z.shape
        n_low = low_grid[0] * low_grid[1]
        tokens = self.mask_token.to(z.dtype).expand(b, n_low, d).clone()
        tokens = tokens.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), z[:, 1:])  # (B, N_low, D)
        if tuple(out_grid) != tuple(low_grid):
            grid = tokens.transpose(1, 2).reshape(b, d, *low_grid)  # (B, D, gh, gw)
            grid = F.interpolate(grid, size=tuple(out_grid), mode="bilinear", align_corners=False)
            tokens = grid.flatten(2).transpose(1, 2)  # (B, N_out, D)
        pos = resize_pos_embed(self.pos_embed[:, 1:], self.grid, out_grid)
        h = torch.cat([z[:, :1] + self.pos_embed[:, :1], tokens + pos], dim=1)
        for blk in self.blocks:
            h = blk(h)
        return self.pred(self.norm(h[:, 1:]))


def _check_geometry(
    img_size: int | Sequence[int], scale: int, patch_size: int, mask_ratio: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate MIRAM's scale, mask ratio and image size; return the ``(high, low)`` resolution sizes."""
    if not isinstance(scale, int) or scale < 2:
        raise ValueError(
            f"scale must be an int >= 2 (high-resolution side / low-resolution side), got {scale!r}"
        )
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    high = to_2tuple(img_size if isinstance(img_size, int) else tuple(img_size), "img_size")
    if high[0] % (scale * patch_size) or high[1] % (scale * patch_size):
        raise ValueError(
            f"img_size {high} must be a multiple of scale × patch_size = {scale * patch_size} on both sides"
        )
    return high, (high[0] // scale, high[1] // scale)


class MIRAM(nn.Module):
    """Multi-scale masked autoencoder with a linear-attention high-resolution decoder.

    Args:
        img_size: full-resolution input size ``(Y, X)`` (``input_size``); the encoder sees ``img_size / scale``.
        scale: integer down-sampling factor of the low-resolution view (2: the high-resolution decoder
            predicts 4× the tokens).
        patch_size: patch side ``p`` at both scales.
        in_chans: image channels ``C``.
        embed_dim, depth, num_heads, mlp_ratio: encoder ViT size.
        num_classes: ``K`` of the fine-tuning head (on the encoder); 0 for pretraining.
        global_pool: ``"token"`` or ``"avg"`` pooling for features and the head.
        drop_path_rate: encoder stochastic depth.
        decoder_embed_dim, decoder_depth, decoder_num_heads: low-resolution decoder (exact attention).
        hr_decoder_embed_dim, hr_decoder_depth, hr_decoder_num_heads: high-resolution decoder.
        hr_attention: ``"nystrom"``, ``"performer"``, ``"linformer"`` or ``"sdpa"``.
        hr_attention_kw: options of that kind; Linformer defaults to ``seq_len`` = the high-resolution token
            count (+1 for [CLS]) and ``k`` = a quarter of it.
        mask_ratio: fraction of low-resolution patches masked.
        norm_pix_loss: regress per-patch normalised pixels.
        low_weight, high_weight: weights of the two reconstruction losses.
    """

    spatial_dims = 2

    def __init__(
        self,
        img_size: int | Sequence[int] = 128,
        scale: int = 2,
        patch_size: int = 8,
        in_chans: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        global_pool: str = "token",
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        hr_decoder_embed_dim: int = 128,
        hr_decoder_depth: int = 2,
        hr_decoder_num_heads: int = 4,
        hr_attention: str = "nystrom",
        hr_attention_kw: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        low_weight: float = 1.0,
        high_weight: float = 1.0,
    ) -> None:
        super().__init__()
        high, low = _check_geometry(img_size, scale, patch_size, mask_ratio)
        self.input_size = high
        self.low_size = low
        self.scale = scale
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.task = "classify" if num_classes > 0 else "pretrain"
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.low_weight = low_weight
        self.high_weight = high_weight
        self.encoder = VisionTransformer(
            img_size=low,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            global_pool=global_pool,
            drop_path_rate=drop_path_rate,
        )
        self._build_decoders(
            embed_dim,
            mlp_ratio,
            (decoder_embed_dim, decoder_depth, decoder_num_heads),
            (hr_decoder_embed_dim, hr_decoder_depth, hr_decoder_num_heads),
            hr_attention,
            hr_attention_kw,
        )

    def _build_decoders(
        self,
        embed_dim: int,
        mlp_ratio: float,
        low_dims: tuple[int, int, int],
        high_dims: tuple[int, int, int],
        hr_attention: str,
        hr_attention_kw: dict[str, Any] | None,
    ) -> None:
        """Create the low-resolution (exact attention) then the high-resolution decoder, each given as
        ``(embed_dim, depth, num_heads)``, and initialise both (this order: seeded runs rely on it)."""
        low_grid = self.encoder.base_grid
        high_grid = (low_grid[0] * self.scale, low_grid[1] * self.scale)
        out_dim = self.patch_size**2 * self.in_chans
        self.decoder = ScaleDecoder(embed_dim, *low_dims, low_grid, out_dim, "sdpa", None, mlp_ratio)
        hr_kw = dict(hr_attention_kw or {})
        if hr_attention == "linformer":
            hr_kw.setdefault("seq_len", 1 + high_grid[0] * high_grid[1])
            hr_kw.setdefault("k", max(1, hr_kw["seq_len"] // 4))
        self.hr_attention = hr_attention
        self.hr_decoder = ScaleDecoder(
            embed_dim, *high_dims, high_grid, out_dim, hr_attention, hr_kw, mlp_ratio
        )
        init_vit_weights(self.decoder)
        init_vit_weights(self.hr_decoder)

    # -- views ----------------------------------------------------------------------------------------------
    @property
    def backbone(self) -> VisionTransformer:
        """The encoder ViT (it sees the low-resolution view; see :meth:`encoder_view`)."""
        return self.encoder

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad ``(B, C, Y, X)`` at the bottom/right to multiples of ``scale · p``."""
        m = self.scale * self.patch_size
        dy, dx = -x.shape[-2] % m, -x.shape[-1] % m
        return F.pad(x, (0, dx, 0, dy)) if dy or dx else x

    def encoder_view(self, x: torch.Tensor) -> torch.Tensor:
        """The low-resolution view the encoder sees: ``(B, C, Y, X) -> (B, C, Y/s, X/s)`` (area average)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected a (B, {self.in_chans}, Y, X) image tensor, got shape {tuple(x.shape)}"
            )
        return F.avg_pool2d(self.pad(x), self.scale)

    # -- fine-tuning / features -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder tokens on the low-resolution view, ``(B, C, Y, X) -> (B, 1 + N_low, E)``."""
        return self.encoder.forward_features(self.encoder_view(x))

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, 1 + N, E) -> (B, K)`` logits, or pooled ``(B, E)``."""
        return self.encoder.forward_head(feats, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution ``(B, C, Y, X)`` -> logits ``(B, K)`` (classify) or pooled features ``(B, E)``."""
        return self.forward_head(self.forward_features(x))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last-block [CLS]→patch attention on the low-resolution view, ``(B, H, gh, gw)``; each
        cell covers ``scale · p`` input pixels."""
        return self.encoder.cls_attention(self.encoder_view(x))

    # -- pretraining ----------------------------------------------------------------------------------------
    def _targets(self, img: torch.Tensor) -> torch.Tensor:
        target = patchify(img, self.patch_size)  # (B, N, p·p·C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_pretrain(
        self,
        x: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Mask, encode the low-resolution view, decode both scales.

        Args:
            x: full-resolution images ``(B, C, Y, X)``.
            mask_ratio: defaults to the model's.
            noise: ``(B, N_low)`` masking scores (small = kept), for reproducible or guided masks.
            generator: random source of the noise.

        Returns:
            ``pred_low (B, N_low, p·p·C)``, ``pred_high (B, N_high, p·p·C)``, ``mask_low (B, N_low)`` and
            ``mask_high (B, N_high)`` (1 = masked), ``low_grid``, ``high_grid``, ``low`` (the view) and ``high``
            (the padded input).
        """
        high = self.pad(x)
        low = self.encoder_view(x)
        enc = self.encoder
        low_grid = enc.grid_size(low)
        high_grid = (low_grid[0] * self.scale, low_grid[1] * self.scale)
        tokens = enc.embed_patches(low)  # (B, N_low, E)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        kept, mask_low, _, ids_keep = random_masking(tokens, ratio, noise=noise, generator=generator)
        latent = enc.encode(torch.cat([enc.cls_tokens(tokens.shape[0]), kept], dim=1))  # (B, 1 + K, E)
        pred_low = self.decoder(latent, ids_keep, low_grid, low_grid)
        pred_high = self.hr_decoder(latent, ids_keep, low_grid, high_grid)
        mask_grid = mask_low.reshape(-1, 1, *low_grid)
        mask_high = mask_grid.repeat_interleave(self.scale, -2).repeat_interleave(self.scale, -1).flatten(1)
        return {
            "pred_low": pred_low,
            "pred_high": pred_high,
            "mask_low": mask_low,
            "mask_high": mask_high,
            "low_grid": low_grid,
            "high_grid": high_grid,
            "low": low,
            "high": high,
        }

    @staticmethod
    def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def pretrain_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """``low_weight · MSE_low + high_weight · MSE_high`` on masked patches; ``y`` is ignored.

        Returns:
            ``{"loss", "loss_low", "loss_high"}`` (the parts detached).
        """
        out = self.forward_pretrain(x, noise=noise, generator=generator)
        loss_low = self._masked_mse(out["pred_low"], self._targets(out["low"]), out["mask_low"])
        loss_high = self._masked_mse(out["pred_high"], self._targets(out["high"]), out["mask_high"])
        loss = self.low_weight * loss_low + self.high_weight * loss_high
        return {"loss": loss, "loss_low": loss_low.detach(), "loss_high": loss_high.detach()}

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, mask_ratio: float | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Both reconstructions for display, at the input's size ``(B, C, Y, X)``.

        Returns:
            ``low`` (the low-resolution view, upsampled), ``reconstruction_low`` (upsampled),
            ``reconstruction_high``, ``mask (B, 1, Y, X)`` (1 = masked) and ``pasted`` (the high-resolution
            reconstruction with the visible patches of the input pasted in). With ``norm_pix_loss`` the
            predictions are de-normalised with each patch's true mean and spread.
        """
        was_training = self.training
        self.eval()
        try:
            gen = torch.Generator(device=x.device).manual_seed(int(seed))
            out = self.forward_pretrain(x, mask_ratio=mask_ratio, generator=gen)
            y, xw = x.shape[-2:]
            p = self.patch_size

            def image(pred: torch.Tensor, ref: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
                if self.norm_pix_loss:
                    t = patchify(ref, p)
                    pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
                return unpatchify(pred, p, grid)

            up = partial(F.interpolate, scale_factor=self.scale, mode="nearest")
            rec_low = up(image(out["pred_low"], out["low"], out["low_grid"]))[..., :y, :xw]
            rec_high = image(out["pred_high"], out["high"], out["high_grid"])[..., :y, :xw]
            mask_patches = out["mask_high"][:, :, None].expand(-1, -1, p * p)  # (B, N_high, p·p)
            mask = unpatchify(mask_patches, p, out["high_grid"])[..., :y, :xw]
            return {
                "low": up(out["low"])[..., :y, :xw],
                "reconstruction_low": rec_low,
                "reconstruction_high": rec_high,
                "mask": mask,
                "pasted": x * (1 - mask) + rec_high * mask,
            }
        finally:
            self.train(was_training)


_TINY = dict(img_size=128, scale=2, patch_size=8, embed_dim=192, depth=6, num_heads=3)
_BASE = dict(
    img_size=448,
    scale=2,
    patch_size=16,
    embed_dim=768,
    depth=12,
    num_heads=12,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    hr_decoder_embed_dim=512,
    hr_decoder_depth=8,
    hr_decoder_num_heads=16,
    norm_pix_loss=True,
)


@register_model
def miram_tiny(**overrides: Any) -> MIRAM:
    """MIRAM for 2 CPU cores: ViT E 192, depth 6, patch 8 on the 64² view of a 128² input; decoders 128 × 2."""
    return MIRAM(**{**_TINY, **overrides})


@register_model
def miram_base(**overrides: Any) -> MIRAM:
    """Paper-sized MIRAM: ViT-B/16 on the 224² view of a 448² input; decoders 512 × 8 (MAE's), norm_pix_loss."""
    return MIRAM(**{**_BASE, **overrides})
