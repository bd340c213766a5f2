"""Masked autoencoder (He et al. 2022, https://arxiv.org/abs/2111.06377).

Patchify, keep a random 25 % of the patch tokens, encode only those with the ViT, and let a light transformer
decoder reconstruct the masked patches; the loss is the MSE on masked patches (optionally on per-patch
normalised pixels, ``norm_pix_loss``). :class:`MAE` *is* a :class:`VisionTransformer` (same parameter names
as the official MAE checkpoints: the encoder at the top level, ``decoder_*`` beside it), so fine-tuning is the
inherited ``forward`` → ``forward_features`` → ``forward_head`` classification when ``num_classes > 0``.

Axis legend: B batch, C channels, Y X space, N patches, K kept tokens, M decoded tokens, E embedding.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from napari_medssl.models.layers.pos_embed import resize_pos_embed, sincos_2d
from napari_medssl.models.masking import random_masking
from napari_medssl.models.registry import register_model
from napari_medssl.models.vit import VisionTransformer, init_vit_weights

__all__ = ["MAE", "mae_base", "mae_tiny", "patchify", "unpatchify"]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, Y, X) -> (B, N, p·p·C)``, patches row-major, pixels ordered (row, column, channel) like MAE.

    ``Y`` and ``X`` must be multiples of ``p`` (pad first, see ``PatchEmbed.pad``).
    """
    b, c, y, x = imgs.shape
    p = patch_size
    if y % p or x % p:
        raise ValueError(f"image size {(y, x)} is not a multiple of the patch size {p}")
    gh, gw = y // p, x // p
    out = imgs.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return out.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, N, p·p·C) -> (B, C, gh·p, gw·p)``."""
    b, n, d = patches.shape
    p = patch_size
    gh, gw = grid
    if n != gh * gw or d % (p * p):
        raise ValueError(f"cannot unpatchify {tuple(patches.shape)} onto grid {grid} with patch {p}")
    c = d // (p * p)
    out = patches.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return out.reshape(b, c, gh * p, gw * p)


class MAE(VisionTransformer):
    """Masked autoencoder on the project's ViT.

    Args:
        decoder_embed_dim: decoder token size.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder heads.
        mask_ratio: fraction of patches masked in pre-training.
        norm_pix_loss: regress per-patch normalised pixels (better features, worse pictures).
        **vit_kwargs: :class:`VisionTransformer` arguments (``img_size``, ``patch_size``, ``in_chans``,
            ``embed_dim``, ``depth``, ``num_heads``, ``num_classes`` ...).
    """

    def __init__(
        self,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        **vit_kwargs,
    ) -> None:
        super().__init__(**vit_kwargs)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        mlp_ratio = self.blocks[0].mlp.fc1.out_features / self.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_2d(decoder_embed_dim, self.base_grid, cls_token=True)[None]
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_vit_weights(part)  # the encoder was initialised by VisionTransformer
        nn.init.normal_(self.mask_token, std=0.02)

    # -- MAE steps ------------------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, C, Y, X) -> (B, N, p·p·C)`` after zero-padding to patch multiples."""
        return patchify(self.patch_embed.pad(imgs), self.patch_size)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(B, N, p·p·C) -> (B, C, gh·p, gw·p)``."""
        return unpatchify(patches, self.patch_size, grid)

    def encode_visible(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode [CLS] + the kept patch tokens: ``(B, N, E), (B, K) -> (B, 1 + K, E)`` normed."""
        e = tokens.shape[-1]
        kept = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, e))
        return self.encode(torch.cat([self.cls_tokens(tokens.shape[0]), kept], dim=1))

    def forward_encoder(
        self,
        x: torch.Tensor,
        mask_ratio: float,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Random masking then encoding: ``(B, C, Y, X) -> latent (B, 1 + K, E), mask (B, N), ids_keep, ids_mask``."""
        tokens = self.embed_patches(x)  # (B, N, E)
        _, mask, ids_restore, ids_keep = random_masking(tokens, mask_ratio, noise=noise, generator=generator)
        ids_mask = torch.argsort(ids_restore, dim=1)[:, ids_keep.shape[1] :]  # (B, N − K)
        return self.encode_visible(tokens, ids_keep), mask, ids_keep, ids_mask

    def forward_decoder(
        self, latent: torch.Tensor, ids_keep: torch.Tensor, ids_target: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Decode the kept tokens plus mask tokens at ``ids_target``.

        Patches in neither set (MSMAE's thrown ones) take no part. Token order is irrelevant to the decoder
        (no causal mask), so this equals MAE's unshuffle-then-decode on the same token set.

        Args:
            latent: encoder output ``(B, 1 + K, E)``.
            ids_keep: ``(B, K)`` positions of the encoded patches.
            ids_target: ``(B, M)`` positions to reconstruct.
            grid: ``(gh, gw)``.

        Returns:
            ``(B, K + M, p·p·C)`` predictions: the kept positions first, then ``ids_target``.
        """
        z = self.decoder_embed(latent)  # (B, 1 + K, D)
        b, _, d = z.shape
        pos_cls = self.decoder_pos_embed[:, :1]
        pos = resize_pos_embed(self.decoder_pos_embed[:, 1:], self.base_grid, grid).expand(b, -1, -1)
        vis = z[:, 1:] + torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        masked = self.mask_token + torch.gather(pos, 1, ids_target.unsqueeze(-1).expand(-1, -1, d))
        h = torch.cat([z[:, :1] + pos_cls, vis, masked], dim=1)
        for blk in self.decoder_blocks:
            h = blk(h)
        return self.decoder_pred(self.decoder_norm(h[:, 1:]))

    def patch_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Regression targets ``(B, N, p·p·C)``: pixels, or per-patch normalised with ``norm_pix_loss``."""
        target = self.patchify(x)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward_loss(self, x: torch.Tensor, pred: torch.Tensor, ids_target: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the patches at ``ids_target``.

        Args:
            x: images ``(B, C, Y, X)``.
            pred: ``(B, M, p·p·C)`` predictions for ``ids_target``.
            ids_target: ``(B, M)`` reconstructed positions.
        """
        target = self.patch_targets(x)
        target = torch.gather(target, 1, ids_target.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
        return ((pred - target) ** 2).mean()

    def pretrain_loss(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Self-supervised objective on a batch ``(B, C, Y, X)``; ``y`` is ignored. Keys: ``loss``."""
        latent, _, ids_keep, ids_mask = self.forward_encoder(x, self.mask_ratio)
        pred = self.forward_decoder(latent, ids_keep, ids_mask, self.grid_size(x))
        loss = self.forward_loss(x, pred[:, ids_keep.shape[1] :], ids_mask)
        return {"loss": loss, "recon": loss.detach()}

    # -- display --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """MAE's picture: the reconstruction, the mask and the reconstruction with visible patches pasted.

        With ``norm_pix_loss`` the predictions are de-normalised with each patch's true mean and spread (the
        usual way to show such models; those statistics come from the original image).

        Args:
            x: ``(B, C, Y, X)``.
            mask_ratio: fraction of patches hidden.
            seed: seed of the random mask.

        Returns:
            ``reconstruction (B, C, Y, X)``, ``mask (B, 1, Y, X)`` (1 = masked) and ``pasted (B, C, Y, X)``.
        """
        was_training = self.training
        self.eval()
        try:
            gen = torch.Generator(device=x.device).manual_seed(int(seed))
            grid = self.grid_size(x)
            latent, mask, ids_keep, ids_mask = self.forward_encoder(x, mask_ratio, generator=gen)
            pred = self.forward_decoder(latent, ids_keep, ids_mask, grid)  # (B, N, D) in [keep, mask] order
            order = torch.cat([ids_keep, ids_mask], dim=1)
            full = torch.empty_like(pred).scatter_(1, order.unsqueeze(-1).expand_as(pred), pred)
            if self.norm_pix_loss:
                target = self.patchify(x)
                full = full * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
            y, xw = x.shape[-2:]
            recon = self.unpatchify(full, grid)[..., :y, :xw]
            mask_px = mask[:, :, None].expand(-1, -1, self.patch_size**2)  # (B, N, p·p)
            mask_img = self.unpatchify(mask_px, grid)[..., :y, :xw]
            pasted = x * (1 - mask_img) + recon * mask_img
            return {"reconstruction": recon, "mask": mask_img, "pasted": pasted}
        finally:
            self.train(was_training)


_TINY = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
_TINY_DEC = dict(decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)
_BASE = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
_BASE_DEC = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


@register_model
def mae_tiny(**overrides) -> MAE:
    """MAE for 2 CPU cores: ViT E 192, depth 6, 3 heads, patch 8 on 64²; decoder 128 × 2 blocks."""
    return MAE(**{**_TINY, **_TINY_DEC, **overrides})


@register_model
def mae_base(**overrides) -> MAE:
    """The paper's MAE ViT-B/16 at 224² with the 512-wide, 8-block decoder and ``norm_pix_loss``."""
    return MAE(**{**_BASE, **_BASE_DEC, "norm_pix_loss": True, **overrides})
