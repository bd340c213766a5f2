"""Multi-head self-attention: exact (fused SDPA) and three linear-complexity approximations.

Every kind maps tokens ``(B, N, E)`` to ``(B, N, E)`` the same way timm's ``Attention`` does: one ``qkv``
projection, attention per head (H heads of size D = E / H), one output projection ``proj``. The parameter
names match timm's, so an ``sdpa`` layer loads timm / DINO block weights and every kind can replace
``block.attn`` in a timm ``Block``. Build them with :func:`make_attention`.

- ``sdpa``: exact ``softmax(Q Kᵀ / √D) V`` through ``F.scaled_dot_product_attention`` (flash kernel, O(N) memory).
- ``nystrom``: Nyströmformer (Xiong et al., AAAI 2021, arXiv:2102.03902).
- ``performer``: FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021, arXiv:2009.14794).
- ``linformer``: low-rank projection of keys and values along the sequence (Wang et al. 2020, arXiv:2006.04768).

Axis legend: B batch, N tokens, E embedding, H heads, D head size, M landmarks / features / projected length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_KINDS",
    "LinformerAttention",
    "NystromAttention",
    "PerformerAttention",
    "SDPAAttention",
    "iterative_pinv",
    "make_attention",
    "segment_means",
]


def segment_means(x: Tensor, m: int) -> Tensor:
    """Means of ``m`` contiguous segments of the token axis, for any number of tokens.

    For ``N >= m`` the tokens are split exactly into ``m`` segments whose lengths differ by at most one
    (the first ``N mod m`` segments hold one token more), so every token counts once. For ``N < m`` the
    segments are single tokens picked by nearest-neighbour upsampling (token ``floor(i N / m)`` for segment i).
    Views and means only: the input is never padded or copied.

    Args:
        x: tokens ``(..., N, D)``; may be a strided view.
        m: number of segments.

    Returns:
        ``(..., m, D)``.
    """
    n = x.shape[-2]
    if n < m:
        idx = torch.arange(m, device=x.device) * n // m
        return x.index_select(-2, idx)
    size, rest = divmod(n, m)
    if rest == 0:
        return x.unflatten(-2, (m, size)).mean(-2)
    split = rest * (size + 1)
    long_segments = x[..., :split, :].unflatten(-2, (rest, size + 1)).mean(-2)
    short_segments = x[..., split:, :].unflatten(-2, (m - rest, size)).mean(-2)
    return torch.cat([long_segments, short_segments], dim=-2)


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of square matrices by the iteration of Razavi et al. (2014).

    Nyströmformer eq. (16): ``Z_{j+1} = ¼ Z_j (13 I − A Z_j (15 I − A Z_j (7 I − A Z_j)))`` from
    ``Z_0 = Aᵀ / (‖A‖₁ ‖A‖∞)``, which converges for any A because σ(A Z_0) ⊂ (0, 1]. The norms are taken
    per matrix. Only matrix products, so it is differentiable and fast on small (M × M) matrices.

    Args:
        a: ``(..., M, M)``.
        iterations: number of iterations (the paper uses 6).

    Returns:
        ``(..., M, M)``, approximately ``pinv(a)``.
    """
    abs_a = a.abs()
    norm_1 = abs_a.sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    norm_inf = abs_a.sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class _MultiHeadAttention(nn.Module):
    """Shared projections: ``qkv`` (E → 3E), optional per-head q/k norm, ``proj`` (E → E).

    Subclasses implement :meth:`attend` on per-head tensors ``(B, H, N, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        norm = norm_layer or nn.LayerNorm
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys, values ``(B, H, N, D)`` each (strided views of one buffer)."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention output per head ``(B, H, N, D)`` from ``q, k, v`` ``(B, H, N, D)``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """Self-attention over tokens ``x`` ``(B, N, E)`` → ``(B, N, E)``."""
        b, n, _ = x.shape
        out = self.attend(*self.project_qkv(x))
        out = out.transpose(1, 2).reshape(b, n, self.dim)
        return self.proj_drop(self.proj(out))


class SDPAAttention(_MultiHeadAttention):
    """Exact attention ``softmax(Q Kᵀ / √D) V`` (Vaswani et al. 2017, eq. 1) with PyTorch's fused kernel.

    Args:
        dim: embedding size E.
        num_heads: H.
        attn_drop: dropout on the attention weights (training only).
        **kwargs: ``qkv_bias``, ``qk_norm``, ``proj_bias``, ``proj_drop``, ``norm_layer``.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_drop: float = 0.0, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.attn_drop = attn_drop

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = self.attn_drop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    def attention_weights(self, x: Tensor) -> Tensor:
        """The explicit attention matrix ``softmax(Q Kᵀ / √D)`` ``(B, H, N, N)``: O(N²) memory, for analysis."""
        q, k, _ = self.project_qkv(x)
        return torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)


class NystromAttention(_MultiHeadAttention):
    """Nyströmformer: softmax attention through M landmarks (Xiong et al. 2021).

    With landmarks ``Q̃, K̃`` (segment means of Q and K, eq. 12 of the paper) and ``s = 1/√D``, eq. (15):

        ``Ŝ V = softmax(s Q K̃ᵀ) · pinv(softmax(s Q̃ K̃ᵀ)) · (softmax(s Q̃ Kᵀ) V)``

    evaluated right to left: ``softmax(s Q̃ Kᵀ) V`` and ``softmax(s Q K̃ᵀ) W`` are two calls of the fused SDPA
    kernel (M queries over N keys, N queries over M keys), so no N × M matrix is ever stored, forward or
    backward; only the M × M kernel and its iterative pseudo-inverse (eq. 16) are explicit. Cost O(N M D).
    Any N works: the landmarks are means of segments that split the N tokens exactly (:func:`segment_means`);
    when N ≤ M the layer computes exact attention (the approximation would not save anything).

    Args:
        dim: embedding size E.
        num_heads: H.
        num_landmarks: M.
        pinv_iterations: iterations of :func:`iterative_pinv` (paper: 6).
        conv_kernel: if set, the paper's skip connection: a depthwise convolution of V along the token axis
            (one kernel of this odd length per head) added to the output. ``None`` (default) leaves it out.
        **kwargs: ``qkv_bias``, ``qk_norm``, ``proj_bias``, ``proj_drop``, ``norm_layer``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if conv_kernel is not None and (conv_kernel < 1 or conv_kernel % 2 == 0):
            raise ValueError(f"conv_kernel must be a positive odd length or None, got {conv_kernel}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.conv = None
        if conv_kernel is not None:
            h = num_heads
            self.conv = nn.Conv2d(h, h, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=h, bias=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        m = self.num_landmarks
        if q.shape[-2] <= m:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            q_land, k_land = segment_means(q, m), segment_means(k, m)  # (B, H, M, D)
            kernel_2 = torch.softmax((q_land * self.scale) @ k_land.transpose(-1, -2), dim=-1)
            kernel_3_v = F.scaled_dot_product_attention(q_land, k, v)  # softmax(s Q̃ Kᵀ) V: (B, H, M, D)
            w = iterative_pinv(kernel_2, self.pinv_iterations) @ kernel_3_v
            out = F.scaled_dot_product_attention(q, k_land, w)  # softmax(s Q K̃ᵀ) W: (B, H, N, D)
        if self.conv is not None:
            out = out + self.conv(v)
        return out


class PerformerAttention(_MultiHeadAttention):
    """Performer: FAVOR+ with positive orthogonal random features (Choromanski et al. 2021).

    The softmax kernel ``exp(qᵀk)`` on ``q = s^½ Q_i, k = s^½ K_j`` (``s = 1/√D``) is estimated by
    ``φ(q)ᵀφ(k)`` with the positive random features of Lemma 1,

        ``φ(x) = exp(W x − ‖x‖²/2) / √M``,  rows of W ∈ R^{M×D} orthogonal Gaussian (Sec. 2.4),

    and attention is ``D̂⁻¹ (φ(Q) (φ(K)ᵀ V))`` with ``D̂ = diag(φ(Q) (φ(K)ᵀ 1_N))`` (eq. 4): O(N M D).
    Numerically stable: each query's features are divided by their largest value and all keys' features by
    one shared largest value per (batch, head); both factors cancel in the normalisation ``D̂⁻¹``.

    Args:
        dim: embedding size E.
        num_heads: H.
        nb_features: M; default ``round(D ln D)`` as in the paper.
        redraw_interval: in training, draw new features every this many forward calls (``None``: never).
        generator: random generator for the first draw (reproducible layers).
        **kwargs: ``qkv_bias``, ``qk_norm``, ``proj_bias``, ``proj_drop``, ``norm_layer``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        nb_features: int | None = None,
        redraw_interval: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        d = self.head_dim
        self.nb_features = nb_features or max(1, round(d * math.log(d)))
        if self.nb_features < 1:
            raise ValueError(f"nb_features must be >= 1, got {nb_features}")
        if redraw_interval is not None and redraw_interval < 1:
            raise ValueError(f"redraw_interval must be >= 1 or None, got {redraw_interval}")
        self.redraw_interval = redraw_interval
        self.eps = 1e-6
        self.register_buffer("features", torch.empty(self.nb_features, d))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.redraw_features(generator)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw new orthogonal Gaussian features W ``(M, D)``: QR blocks, rows scaled to chi(D) norms."""
        m, d = self.nb_features, self.head_dim
        blocks = []
        for _ in range(math.ceil(m / d)):
            g = torch.randn(d, d, generator=generator)
            blocks.append(torch.linalg.qr(g).Q.T)
        w = torch.cat(blocks)[:m]
        norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
        self.features.copy_(w * norms)

    def _feature_map(self, x: Tensor, is_query: bool) -> Tensor:
        """φ(x) ``(B, H, N, M)`` for x ``(B, H, N, D)`` already scaled by ``s^½``, up to a cancelling factor."""
        wx = x @ self.features.to(x.dtype).T
        wx = wx - 0.5 * x.square().sum(-1, keepdim=True)
        if is_query:
            peak = wx.amax(-1, keepdim=True)
        else:
            peak = wx.amax((-1, -2), keepdim=True)
        return torch.exp(wx - peak.detach()) + self.eps

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.training and self.redraw_interval is not None:
            if self.calls.item() % self.redraw_interval == 0 and self.calls.item() > 0:
                self.redraw_features()
            self.calls += 1
        root_scale = self.scale**0.5
        q_feat = self._feature_map(q * root_scale, is_query=True)  # (B, H, N, M)
        k_feat = self._feature_map(k * root_scale, is_query=False)  # (B, H, N, M)
        kv = k_feat.transpose(-1, -2) @ v  # φ(K)ᵀ V: (B, H, M, D)
        normaliser = q_feat @ k_feat.sum(-2).unsqueeze(-1)  # φ(Q) φ(K)ᵀ 1: (B, H, N, 1)
        return (q_feat @ kv) / normaliser


class LinformerAttention(_MultiHeadAttention):
    """Linformer: keys and values projected along the sequence to k rows (Wang et al. 2020).

    Eq. (7) of the paper: ``softmax(s Q (E K)ᵀ) (F V)`` with learned ``E, F ∈ R^{k×L}`` (shared across
    heads, the paper's head-wise sharing), computed with the fused SDPA kernel: O(N k D).

    Any sequence length: the paper's E is tied to one length L. Here E and F are defined on ``seq_len`` = L
    positions and a sequence of N tokens is first reduced to L rows by :func:`segment_means` (exact,
    equal-as-possible segments when N ≥ L; nearest-token upsampling when N < L), i.e. the projection used is
    ``E_N = E P_N`` with ``P_N`` the (L × N) segment-mean matrix. At N = L it is exactly the paper's layer,
    it costs O(N D) extra, and the same weights serve every image size.

    Args:
        dim: embedding size E.
        num_heads: H.
        k: projected length.
        seq_len: L, the length on which E and F are learned.
        share_kv: use one projection for keys and values (the paper's key-value sharing).
        **kwargs: ``qkv_bias``, ``qk_norm``, ``proj_bias``, ``proj_drop``, ``norm_layer``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        k: int = 256,
        seq_len: int = 1024,
        share_kv: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(dim, num_heads, **kwargs)
        if k < 1 or seq_len < 1:
            raise ValueError(f"k and seq_len must be >= 1, got k={k}, seq_len={seq_len}")
        self.k = k
        self.seq_len = seq_len
        self.proj_k = nn.Parameter(torch.randn(k, seq_len) / math.sqrt(k))  # E ~ N(0, 1/k) (Sec. 4)
        self.proj_v = None if share_kv else nn.Parameter(torch.randn(k, seq_len) / math.sqrt(k))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        k_low = self.proj_k @ segment_means(k, self.seq_len)  # E P_N K: (B, H, k, D)
        v_low = proj_v @ segment_means(v, self.seq_len)  # F P_N V: (B, H, k, D)
        return F.scaled_dot_product_attention(q, k_low, v_low)


ATTENTION_KINDS: dict[str, type[_MultiHeadAttention]] = {
    "sdpa": SDPAAttention,
    "nystrom": NystromAttention,
    "performer": PerformerAttention,
    "linformer": LinformerAttention,
}


def make_attention(kind: str, dim: int, num_heads: int, **kwargs) -> _MultiHeadAttention:
    """Build a self-attention layer mapping tokens ``(B, N, dim)`` → ``(B, N, dim)``.

    Args:
        kind: ``"sdpa"`` (exact), ``"nystrom"``, ``"performer"`` or ``"linformer"``.
        dim: embedding size E (a multiple of ``num_heads``).
        num_heads: H.
        **kwargs: shared ``qkv_bias`` (True), ``qk_norm``, ``proj_bias``, ``proj_drop``, ``norm_layer``, and the
            kind's own options: sdpa ``attn_drop``; nystrom ``num_landmarks`` (64), ``pinv_iterations`` (6),
            ``conv_kernel`` (None); performer ``nb_features``, ``redraw_interval``, ``generator``;
            linformer ``k`` (256), ``seq_len`` (1024), ``share_kv``.

    Raises:
        ValueError: unknown kind, an option the kind does not take, or inconsistent sizes.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {sorted(ATTENTION_KINDS)}")
    try:
        return ATTENTION_KINDS[kind](dim, num_heads, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad options for attention kind {kind!r}: {err}") from err
