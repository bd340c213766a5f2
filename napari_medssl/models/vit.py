"""Vision Transformer backbone (Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929).

The one ViT every ViT-based family here builds on (MAE, MSMAE, DINO, MIRAM): timm's ``Block`` for the blocks,
a patch embedding for any number of channels, a [CLS] token and fixed 2D sin-cos position embeddings that are
resized (bicubic, as DINO does) for inputs of another size. Parameter names follow timm (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv``, ``norm``, ``head``) so official checkpoints map onto it.

Input sizes: any ``(Y, X)`` works. Sides that are not multiples of the patch size are zero-padded at the bottom
and right (:meth:`VisionTransformer.grid_size` reports the padded grid; crop maps upsampled by the patch size
back to ``[:Y, :X]``). ``model.input_size`` is the size the model was built and trained for.

Attention maps: :meth:`VisionTransformer.cls_attention` returns the last block's [CLS]→patch attention per head
at O(N) cost: every other block keeps PyTorch's fused kernel, and in the last block only the [CLS] query row
``softmax(q_cls · Kᵀ / √d)`` is formed, never the N×N matrix. :func:`napari_medssl.models.attention.mass_threshold_masks`
turns those maps into DINO's per-head masks.

Axis legend: B batch, C channels, Y X space, N tokens, E embedding, H heads, K classes.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from napari_medssl.models.attention import mass_threshold_masks  # noqa: F401 (re-exported: its old place)
from napari_medssl.models.layers.patch_embed import PatchEmbed, to_2tuple
from napari_medssl.models.layers.pos_embed import resize_pos_embed, sincos_2d
from napari_medssl.models.registry import register_model

__all__ = ["VisionTransformer", "mass_threshold_masks", "vit_small", "vit_tiny"]

_POOLS = ("token", "avg")


class VisionTransformer(nn.Module):
    """ViT encoder with a [CLS] token and an optional linear classification head.

    Args:
        img_size: training input size, int or ``(Y, X)`` (non-square allowed).
        patch_size: square patch side ``p``.
        in_chans: image channels ``C``.
        embed_dim: token size ``E`` (divisible by 4 for the sin-cos table and by ``num_heads``).
        depth: number of transformer blocks.
        num_heads: attention heads ``H``.
        mlp_ratio: MLP hidden size / ``E``.
        num_classes: ``K``; 0 means no head (``forward`` returns pooled features, task ``"pretrain"``).
        global_pool: ``"token"`` (the [CLS] token) or ``"avg"`` (mean of the patch tokens).
        drop_path_rate: stochastic depth, rising linearly to this value over the blocks.
        qkv_bias: bias in the query/key/value projection.
    """

    spatial_dims = 2

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int = 8,
        in_chans: int = 1,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        global_pool: str = "token",
        drop_path_rate: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int (square patches), got {patch_size!r}")
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool must be one of {_POOLS}, got {global_pool!r}")
        if embed_dim % num_heads or embed_dim % 4:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by 4 and by num_heads ({num_heads})")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.input_size = to_2tuple(img_size, "img_size")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.global_pool = global_pool
        self.task = "classify" if num_classes > 0 else "pretrain"

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.base_grid = self.patch_embed.grid_size(self.input_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos table, a buffer (saved in checkpoints, so learned tables from official weights load too).
        self.register_buffer("pos_embed", sincos_2d(embed_dim, self.base_grid, cls_token=True)[None])
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=r, norm_layer=norm_layer)
            for r in rates
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_vit_weights(self)

    # -- tokens ---------------------------------------------------------------------------------------------
    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(gh, gw)`` for a ``(B, C, Y, X)`` input (after padding to patch multiples)."""
        return self.patch_embed.grid_size((x.shape[-2], x.shape[-1]))

    def pos_embed_for(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Position embeddings for a patch grid: ``(cls (1, 1, E), patches (1, gh·gw, E))``."""
        return self.pos_embed[:, :1], resize_pos_embed(self.pos_embed[:, 1:], self.base_grid, grid)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their positions, no [CLS]: ``(B, C, Y, X) -> (B, N, E)``."""
        tokens = self.patch_embed(x)  # (B, N, E)
        return tokens + self.pos_embed_for(self.grid_size(x))[1]

    def cls_tokens(self, batch: int) -> torch.Tensor:
        """The [CLS] token with its position, ``(B, 1, E)``."""
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Y, X) -> (B, 1 + N, E)``: patch embedding + positions, [CLS] first."""
        patches = self.embed_patches(x)
        return torch.cat([self.cls_tokens(patches.shape[0]), patches], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run all blocks and the final norm on any token set ``(B, M, E)`` ([CLS] first) -> ``(B, M, E)``.

        MAE-style models call this on the [CLS] token plus the kept patch tokens only.
        """
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    # -- forward stages -------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, Y, X) -> (B, 1 + N, E)``, normed."""
        return self.encode(self.prepare_tokens(x))

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + N, E) -> (B, E)``: the [CLS] token or the mean of the patch tokens."""
        return feats[:, 0] if self.global_pool == "token" else feats[:, 1:].mean(dim=1)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, 1 + N, E) -> (B, K)`` logits, or the pooled ``(B, E)`` with ``pre_logits`` or no head."""
        pooled = self.pool(feats)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` (task ``"classify"``) or pooled features ``(B, E)`` (no head)."""
        return self.forward_head(self.forward_features(x))

    # -- attention maps -------------------------------------------------------------------------------------
    @torch.no_grad()
    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's [CLS]→patch attention per head, ``(B, C, Y, X) -> (B, H, gh, gw)``.

        Blocks before the last run unchanged (fused kernel). In the last block only ``qkv`` and the [CLS]
        query row ``softmax(q_cls · Kᵀ / √d)`` over all ``1 + N`` keys are computed: O(N), no N×N matrix.
        The [CLS]→[CLS] entry is dropped, so a head's map sums to slightly less than 1 (as in DINO).
        """
        grid = self.grid_size(x)
        tokens = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        return last_block_cls_attention(self.blocks[-1], tokens).reshape(x.shape[0], -1, *grid)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to keep out of weight decay (timm's convention)."""
        return {"cls_token", "pos_embed"}


def last_block_cls_attention(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[CLS]→patch attention of a timm ``Block`` on its input tokens ``(B, 1 + N, E) -> (B, H, N)``.

    Computes the block's ``qkv`` projection and the single [CLS] query row; no N×N matrix.
    """
    attn = block.attn
    b, n, _ = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q_cls = attn.q_norm(qkv[:, :1, 0].transpose(1, 2))  # (B, H, 1, d)
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # (B, H, 1 + N, d)
    logits = (q_cls.float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, H, 1, 1 + N)
    return logits.softmax(dim=-1)[:, :, 0, 1:]  # (B, H, N)


def init_vit_weights(model: nn.Module) -> None:
    """timm/MAE initialisation: truncated-normal linear weights, Xavier patch projection, zero biases."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d) and name.endswith("patch_embed.proj"):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            nn.init.zeros_(module.bias)
    for name, param in model.named_parameters():
        if name.endswith("cls_token") or name.endswith("mask_token"):
            nn.init.normal_(param, std=0.02)


def _vit(defaults: dict, overrides: dict) -> VisionTransformer:
    return VisionTransformer(**{**defaults, **overrides})


_TINY = dict(img_size=64, patch_size=8, embed_dim=192, depth=6, num_heads=3)
_SMALL = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register_model
def vit_tiny(**overrides) -> VisionTransformer:
    """Scratch-baseline ViT for 2 CPU cores: E 192, depth 6, 3 heads, patch 8 on 64² (overridable)."""
    return _vit(_TINY, overrides)


@register_model
def vit_small(**overrides) -> VisionTransformer:
    """ViT-S/16 at 224² (E 384, depth 12, 6 heads): the size of the official DINO ViT-S/16 weights."""
    return _vit(_SMALL, overrides)
