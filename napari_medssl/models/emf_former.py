"""EMF-former: an efficient, memory-friendly segmentation transformer (MICCAI 2024; no public code).

Three pieces from the paper, each a class here:

- :class:`DSPConv` (depthwise-shuffle-pointwise): depthwise ``3×3`` conv (strided where features are
  downsampled) → channel shuffle → grouped pointwise ``1×1`` conv. Used for the stem's second ×2 step (input
  ×4 smaller) and for every ×2 step between stages.
- :class:`VectorAggregationAttention` (VAA), O(N) time and memory. With ``q, k, v = x W_q, x W_k, x W_v``
  (``N×d`` each) and a learned scoring vector ``w``::

      α = softmax_N(q·w / √d)          (N)     one weight per token
      g = Σ_i α_i q_i                   (d)     the global context vector
      y_i = FC(g ⊙ k_i) + v_i           (N×d)   element-wise product, then the FC key-value interaction

  Nothing of size ``N×N`` or ``N×m`` is ever formed: every tensor is ``N×d``, ``N`` or ``d``.
- :class:`SerialMultiHeadAttention` (S-MHA): the channels are split into ``H`` heads that run one after
  another; head ``j`` sees its own channels plus head ``j−1``'s output, and skipped heads (``skip_heads``,
  default every second one) pass that sum through without attention, saving their compute and memory.

The segmenter is a four- (``tiny``: three-) stage hierarchy at 1/4 … 1/32 of the input with
``(S-MHA, Mix-FFN)`` blocks (the FFN carries a depthwise conv for locality), and a light decoder: every stage
projected to ``D`` channels, upsampled to 1/4 and summed, fused by a DSPConv; narrowed to a few channels before
it is upsampled and joined with the stem's 1/2-scale features; turned into logits at 1/2, upsampled, and
refined by a depthwise ``3×3`` + pointwise conv at full resolution that also sees the image. No wide tensor
exists at 1/2 or full resolution, which is where a U-Net spends its memory. The paper leaves widths, depths and
the decoder open: they are chosen here and are constructor parameters. Convolutions are 2D or 3D
(``spatial_dims``), so the 3D variant is the same code (its depthwise convs run channels-last, PyTorch's fast
CPU path for them). Inputs of any size are padded to a multiple of the total stride (16 ``tiny``, 32 otherwise)
and the logits are cropped back; the full-resolution head runs on the input's own extent (plus the one voxel its
``3×3`` conv reads), not on the padded grid, with the same numbers (to float rounding).

Sizes (``K = 3``, one input channel; FLOPs by ``FlopCounterMode``, one forward pass at batch 1 on a hippocampus
slice ``35×51`` (2D) or volume ``35×51×35`` (3D)):

| name | dims | depths | 2D params | 2D FLOPs | 3D params | 3D FLOPs |
|---|---|---|---|---|---|---|
| ``emfformer_tiny`` | 32, 64, 128 | 1, 2, 2 | 0.25 M | 0.013 G | 0.27 M | 0.13 G |
| ``emfformer_small`` | 48, 96, 192, 256 | 1, 2, 2, 2 | 1.31 M | 0.048 G | 1.36 M | 0.51 G |
| ``emfformer_base`` | 64, 128, 320, 512 | 2, 2, 4, 2 | 5.39 M | 0.16 G | 5.50 M | 1.31 G |

The zoo's ``emfformer_tiny_hippocampus`` adds ``detail_dim=12, subpixel=True, detail_blocks=2`` to the tiny
size (0.016 G in 2D; ``benchmarks/bench_segmenters.py --emf-set``).

Axis legend: B batch, C channels, Z Y X space, N tokens, E embedding (``d`` per head), H heads, K classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from napari_medssl.models.layers.spatial import (
    check_spatial_dims,
    conv_nd,
    crop_spatial,
    norm_nd,
    pad_to_multiple,
)
from napari_medssl.models.registry import register_model

__all__ = [
    "DSPConv",
    "DetailBlock",
    "EMFFormer",
    "SerialMultiHeadAttention",
    "VectorAggregationAttention",
    "channel_shuffle",
    "pixel_shuffle",
    "emfformer_base",
    "emfformer_small",
    "emfformer_tiny",
]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """3D maps in channels-last layout: PyTorch's CPU depthwise ``Conv3d`` is ~10× faster on it (oneDNN path)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.ndim == 5 else x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: ``(B, g·c, *S)`` channels reordered so group ``j`` takes every ``g``-th channel."""
    if groups == 1:
        return x
    b, c = x.shape[:2]
    return x.reshape(b, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def pixel_shuffle(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``(B, K·2^d, *S)`` → ``(B, K, *2S)``: channel ``k·2^d + j`` becomes sub-voxel ``j`` (row-major) of class ``k``."""
    if spatial_dims == 2:
        return F.pixel_shuffle(x, 2)
    b, c, z, h, w = x.shape
    x = x.reshape(b, c // 8, 2, 2, 2, z, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // 8, 2 * z, 2 * h, 2 * w)


class DSPConv(nn.Module):
    """Depthwise (``k``, stride ``s``) → norm → channel shuffle (``g``) → pointwise ``1×1`` (``g`` groups) → norm → GELU.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: 2 where it downsamples, 1 elsewhere.
        spatial_dims: 2 or 3.
        groups: pointwise groups ``g``; falls back to 1 when the channels do not divide.
        norm: see :func:`~napari_medssl.models.layers.spatial.norm_nd`.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 2,
        spatial_dims: int = 2,
        groups: int = 2,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.groups = groups if in_ch % groups == 0 and out_ch % groups == 0 else 1
        self.depthwise = conv(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)
        self.norm1 = norm_nd(norm, spatial_dims, in_ch)
        self.pointwise = conv(in_ch, out_ch, 1, groups=self.groups, bias=False)
        self.norm2 = norm_nd(norm, spatial_dims, out_ch)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channel_shuffle(self.norm1(self.depthwise(channels_last(x))), self.groups)
        return self.act(self.norm2(self.pointwise(x)))


class DetailBlock(nn.Module):
    """``x + pw₂(GELU(pw₁(GN(dw(x)))))``: a ConvNeXt-style residual block for the 1/2-resolution decoder.

    Depthwise ``k``, one-group GroupNorm (no batch statistics, so it may be recomputed in backward), pointwise
    expansion ×``r``, GELU, pointwise back; the last conv starts at zero, so the block starts as the identity.
    """

    def __init__(self, channels: int, spatial_dims: int, expand: int = 2, kernel: int = 3) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.dw = conv(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = nn.GroupNorm(1, channels)
        self.pw1 = conv(channels, channels * expand, 1)
        self.act = nn.GELU()
        self.pw2 = conv(channels * expand, channels, 1)
        nn.init.zeros_(self.pw2.weight)
        nn.init.zeros_(self.pw2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dw(channels_last(x))))))


class VectorAggregationAttention(nn.Module):
    """Vector Aggregation Attention on ``(B, N, d)`` tokens: O(N·d²) time, O(N·d) memory (module docstring).

    Args:
        dim: token size ``d``.
        qkv_bias: bias in the query/key/value projection.
    """

    def __init__(self, dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.score = nn.Parameter(torch.zeros(dim))
        self.fc = nn.Linear(dim, dim)
        trunc_normal_(self.score, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, d) each
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        alpha = torch.softmax(q @ self.score * self.scale, dim=1)  # (B, N)
        g = torch.einsum("bn,bnd->bd", alpha, q).unsqueeze(1)  # (B, 1, d): the global context vector
        return self.fc(g * k) + v  # (B, N, d)


class SerialMultiHeadAttention(nn.Module):
    """Heads run in series on channel groups; head ``j`` sees its channels plus head ``j−1``'s output.

    Args:
        dim: token size ``E`` (divisible by ``num_heads``).
        num_heads: ``H``.
        skip_heads: indices of heads that pass their input through without attention; ``None`` skips every
            second head (1, 3, …). Head 0 always attends.
    """

    def __init__(self, dim: int, num_heads: int, skip_heads: Sequence[int] | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        skip = set(range(1, num_heads, 2) if skip_heads is None else skip_heads)
        if 0 in skip or not skip <= set(range(num_heads)):
            raise ValueError(f"skip_heads must be head indices in 1..{num_heads - 1}, got {sorted(skip)}")
        self.head_dim = dim // num_heads
        self.skip = sorted(skip)
        self.heads = nn.ModuleDict(
            {str(j): VectorAggregationAttention(self.head_dim) for j in range(num_heads) if j not in skip}
        )
        self.num_heads = num_heads
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        prev = None
        for j, chunk in enumerate(x.split(self.head_dim, dim=-1)):  # (B, N, d) each
            inp = chunk if prev is None else chunk + prev
            prev = self.heads[str(j)](inp) if str(j) in self.heads else inp
            outs.append(prev)
        return self.proj(torch.cat(outs, dim=-1))


class MixFFN(nn.Module):
    """Linear ``E → rE`` → depthwise ``3`` conv on the token grid → GELU → linear ``rE → E``."""

    def __init__(self, dim: int, mlp_ratio: float, spatial_dims: int) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = conv_nd(spatial_dims)(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.fc1(x).transpose(1, 2).reshape(b, -1, *grid)  # (B, rE, *grid)
        h = self.act(self.dwconv(channels_last(h))).flatten(2).transpose(1, 2)  # (B, N, rE)
        return self.fc2(h)


class EMFBlock(nn.Module):
    """Pre-norm transformer block: ``x + S-MHA(LN x)``, then ``x + MixFFN(LN x)`` on ``(B, N, E)`` tokens.

    Args:
        recompute_ffn: in training, keep only the block's input for the Mix-FFN branch and recompute its
            ``rE``-wide hidden maps (the widest activations of the block) during backward, instead of storing
            them. Same parameters and results; less training memory for one extra FFN forward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        spatial_dims: int,
        skip_heads: Sequence[int] | None = None,
        recompute_ffn: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SerialMultiHeadAttention(dim, num_heads, skip_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, mlp_ratio, spatial_dims)
        self.recompute_ffn = recompute_ffn

    def _ffn_branch(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        return self.ffn(self.norm2(x), grid)

    def forward(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.recompute_ffn and self.training and torch.is_grad_enabled():
            return x + checkpoint(self._ffn_branch, x, grid, use_reentrant=False)
        return x + self._ffn_branch(x, grid)


class EMFFormer(nn.Module):
    """EMF-former segmenter: ``(B, C, *spatial) -> (B, K, *spatial)`` logits for any spatial size.

    Args:
        spatial_dims: 2 (``Y X``) or 3 (``Z Y X``).
        in_chans: image channels ``C``.
        num_classes: ``K``.
        dims: channels per stage (stage ``i`` at 1/``4·2^i`` of the input).
        depths: transformer blocks per stage.
        head_dim: channels per attention head (``H = dim / head_dim`` per stage).
        skip_heads: heads skipped in every S-MHA (``None``: every second one).
        mlp_ratio: FFN hidden size / ``E``.
        decoder_dim: ``D``, the decoder's width at 1/4.
        detail_dim: the decoder's width at 1/2 (joined with the stem's features there).
        subpixel: add a learned sub-pixel term to the ×2 upsampling of the half-resolution logits: a pointwise
            conv to ``K·2^dims`` channels at 1/2, rearranged to full resolution (pixel shuffle), so each
            full-resolution voxel gets its own read-out of the 1/2-scale features instead of only an
            interpolation of its neighbours' logits. Starts at zero (the model starts as without it); costs
            ``K`` maps' worth at 1/2 and at full resolution.
        detail_blocks: :class:`DetailBlock` s after the 1/2-resolution fusion (more capacity where the
            boundaries are decided); recomputed in backward with ``recompute_head``, so they add one map each,
            not their hidden maps, to what training keeps.
        norm: norm of the convolutional parts (``"batch"``, ``"instance"``, ``"group"``).
        recompute_ffn: recompute each block's Mix-FFN hidden maps in backward instead of storing them (see
            :class:`EMFBlock`); training-time memory only, the weights and outputs are the same.
        recompute_head: likewise for everything after the half-resolution features (logits, ×2, sub-pixel
            term, full-resolution head; it has no norm layers, so recomputing it changes no statistics): the
            full-resolution maps are not kept for backward.
    """

    task = "segment"
    input_size = None

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        num_classes: int = 3,
        dims: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (1, 2, 2),
        head_dim: int = 16,
        skip_heads: Sequence[int] | None = None,
        mlp_ratio: float = 2.0,
        decoder_dim: int = 32,
        detail_dim: int = 8,
        subpixel: bool = False,
        detail_blocks: int = 0,
        norm: str = "batch",
        recompute_ffn: bool = True,
        recompute_head: bool = True,
    ) -> None:
        super().__init__()
        self.recompute_head = recompute_head
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans and num_classes must be >= 1, got {in_chans} and {num_classes}")
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims and depths need one entry per stage, got {list(dims)} and {list(depths)}")
        if any(d % head_dim for d in dims):
            raise ValueError(
                f"every stage width in dims {list(dims)} must be divisible by head_dim {head_dim}"
            )
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.multiple = 4 * 2 ** (len(dims) - 1)
        conv = conv_nd(spatial_dims)
        half = max(dims[0] // 4, 8)
        self.stem = nn.Sequential(
            conv(in_chans, half, 3, stride=2, padding=1, bias=False),
            norm_nd(norm, spatial_dims, half),
            nn.GELU(),
        )
        self.downs = nn.ModuleList(
            DSPConv(c_in, c_out, 2, spatial_dims, norm=norm) for c_in, c_out in zip([half, *dims[:-1]], dims)
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(
                EMFBlock(d, d // head_dim, mlp_ratio, spatial_dims, skip_heads, recompute_ffn)
                for _ in range(n)
            )
            for d, n in zip(dims, depths)
        )
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.lateral = nn.ModuleList(conv(d, decoder_dim, 1) for d in dims)
        self.fuse = DSPConv(decoder_dim, decoder_dim, 1, spatial_dims, norm=norm)
        self.reduce = conv(decoder_dim, detail_dim, 1)
        self.stem_skip = conv(half, detail_dim, 1)
        self.refine = DSPConv(detail_dim, detail_dim, 1, spatial_dims, groups=1, norm=norm)
        self.detail_blocks = nn.ModuleList(
            DetailBlock(detail_dim, spatial_dims) for _ in range(detail_blocks)
        )
        self.head_half = conv(detail_dim, num_classes, 1)
        self.head_sub = conv(detail_dim, num_classes * 2**spatial_dims, 1) if subpixel else None
        joined = num_classes + in_chans
        self.head = nn.Sequential(
            conv(joined, joined, 3, padding=1, groups=joined), conv(joined, num_classes, 1)
        )
        self.apply(self._init_weights)
        if self.head_sub is not None:  # the sub-pixel term starts at zero
            nn.init.zeros_(self.head_sub.weight)
            nn.init.zeros_(self.head_sub.bias)
        if spatial_dims == 3:  # oneDNN's fast depthwise Conv3d wants channels-last weights and inputs
            for m in self.modules():
                if isinstance(m, nn.Conv3d) and m.groups == m.in_channels > 1:
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _up(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        return (
            x
            if tuple(x.shape[2:]) == tuple(size)
            else F.interpolate(x, size=size, mode=mode, align_corners=False)
        )

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Padded ``(B, C, *S)`` → stem features at 1/2 and one ``(B, dims[i], *S/(4·2^i))`` map per stage."""
        half = self.stem(x)
        feats = []
        h = half
        for down, blocks, norm in zip(self.downs, self.stages, self.stage_norms):
            h = down(h)
            grid = tuple(h.shape[2:])
            t = h.flatten(2).transpose(1, 2)  # (B, N, E)
            for blk in blocks:
                t = blk(t, grid)
            h = norm(t).transpose(1, 2).reshape(h.shape)
            feats.append(h)
        return half, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` → ``(B, K, *spatial)`` logits."""
        if x.shape[1:2] != (self.in_chans,):
            raise ValueError(f"expected {self.in_chans} input channel(s), got shape {tuple(x.shape)}")
        x, spatial = pad_to_multiple(x, self.multiple, self.spatial_dims)
        half, feats = self.forward_features(x)
        quarter = feats[0].shape[2:]
        y = sum(self._up(lat(f), quarter) for lat, f in zip(self.lateral, feats))  # (B, D, *S/4)
        y = self.reduce(self.fuse(y))  # (B, detail, *S/4)
        y = self.refine(self._up(y, half.shape[2:]) + self.stem_skip(half))  # (B, detail, *S/2)
        recompute = self.recompute_head and self.training and torch.is_grad_enabled()
        for blk in self.detail_blocks:
            y = checkpoint(blk, y, use_reentrant=False) if recompute else blk(y)
        if recompute:  # no batch norms in there: recomputing changes no running statistics
            return crop_spatial(
                checkpoint(self._full_resolution, y, x, spatial, use_reentrant=False), spatial
            )
        return crop_spatial(self._full_resolution(y, x, spatial), spatial)

    def _full_resolution(self, y: torch.Tensor, x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
        """Half-resolution features ``y`` → logits → ×2 → refined with the image ``x`` (padded), over the input.

        Only the input's own extent plus one voxel is computed at full resolution (the 3×3 head still sees the
        neighbours it would see on the whole padded grid), and only the half-resolution voxels that the ×2
        interpolation reads there are used: the same numbers as on the padded grid (to float rounding), on up
        to half (2D) or a third (3D) of its voxels for sizes just above a multiple of 16, the full-resolution
        maps being the largest of the network.
        """
        keep = tuple(min(s + 1, p) for s, p in zip(spatial, x.shape[2:]))
        # output j reads half-resolution voxels floor(j/2 - 1/4) and one more: ceil(keep/2) + 1 of them suffice
        y = crop_spatial(y, tuple(min(-(-k // 2) + 1, h) for k, h in zip(keep, y.shape[2:])))
        mode = "trilinear" if self.spatial_dims == 3 else "bilinear"
        logits = F.interpolate(self.head_half(y), scale_factor=2, mode=mode, align_corners=False)
        logits = crop_spatial(logits, keep)  # (B, K, *keep)
        if self.head_sub is not None:
            logits = logits + crop_spatial(pixel_shuffle(self.head_sub(y), self.spatial_dims), keep)
        x = crop_spatial(x, keep)
        return logits + self.head(channels_last(torch.cat([logits, x], dim=1)))


_SIZES = {
    "tiny": {"dims": (32, 64, 128), "depths": (1, 2, 2), "decoder_dim": 32, "detail_dim": 8},
    "small": {"dims": (48, 96, 192, 256), "depths": (1, 2, 2, 2), "decoder_dim": 96, "detail_dim": 12},
    "base": {
        "dims": (64, 128, 320, 512),
        "depths": (2, 2, 4, 2),
        "head_dim": 32,
        "decoder_dim": 128,
        "detail_dim": 16,
    },
}


def _emfformer(size: str, **overrides) -> EMFFormer:
    return EMFFormer(**{**_SIZES[size], **overrides})


@register_model
def emfformer_tiny(**overrides) -> EMFFormer:
    """EMF-former, three stages (32/64/128 wide), 2D by default; ``spatial_dims=3`` for volumes."""
    return _emfformer("tiny", **overrides)


@register_model
def emfformer_small(**overrides) -> EMFFormer:
    """EMF-former, four stages (48/96/192/256 wide)."""
    return _emfformer("small", **overrides)


@register_model
def emfformer_base(**overrides) -> EMFFormer:
    """EMF-former, four stages (64/128/320/512 wide), the paper-sized one."""
    return _emfformer("base", **overrides)
