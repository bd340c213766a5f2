"""Multi-head self-attention: exact (fused SDPA) and three linear-complexity approximations.

Every kind maps tokens ``(B, N, E)`` to ``(B, N, E)`` the same way timm's ``Attention`` does: one ``qkv``
projection, attention per head (H heads of size D = E / H), one output projection ``proj``. The parameter
names match timm's, so an ``sdpa`` layer loads timm / DINO block weights and every kind can replace
``block.attn`` in a timm ``Block``. Build them with :func:`make_attention`.

- ``sdpa``: exact ``softmax(Q Kᵀ / √D) V`` by ``F.scaled_dot_product_attention`` (flash kernel, O(N) memory).
- ``nystrom``: Nyströmformer (Xiong et al., AAAI 2021, arXiv:2102.03902).
- ``performer``: FAVOR+ positive orthogonal random features (Choromanski et al., ICLR 2021, arXiv:2009.14794).
- ``linformer``: keys and values projected along the sequence (Wang et al. 2020, arXiv:2006.04768).

Axis legend: B batch, N tokens, E embedding, H heads, D head size, M landmarks / features / projected length.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_medssl.models.layers._attention_kernels import (
    FavorKernels,
    NystromKernels,
    intra_op_threads,
    iterative_pinv,
    segment_means,
    unpack_qkv,
)

__all__ = [
    "ATTENTION_KINDS",
    "LinformerAttention",
    "NystromAttention",
    "PerformerAttention",
    "SDPAAttention",
    "iterative_pinv",
    "make_attention",
    "segment_means",
    "unpack_qkv",
]


class _MultiHeadAttention(nn.Module):
    """Shared projections: ``qkv`` (E → 3E), optional per-head q/k norm, ``proj`` (E → E).

    Subclasses implement :meth:`attend`: packed ``qkv`` ``(B, N, 3, H, D)`` → per-head ``(B, N, H, D)``.
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

    def packed_qkv(self, x: Tensor) -> Tensor:
        """Queries, keys and values of tokens ``(B, N, E)`` packed as ``(B, N, 3, H, D)``."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, nn.Identity):
            return qkv
        return torch.stack([self.q_norm(qkv[:, :, 0]), self.k_norm(qkv[:, :, 1]), qkv[:, :, 2]], dim=2)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries, keys, values ``(B, H, N, D)`` each (strided views of one buffer)."""
        return unpack_qkv(self.packed_qkv(x))

    def attend(self, qkv: Tensor) -> Tensor:
        """Attention output ``(B, N, H, D)`` from packed ``qkv`` ``(B, N, 3, H, D)``."""
        raise NotImplementedError

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention over tokens ``x`` ``(B, N, E)`` → ``(B, N, E)``.

        ``attn_mask`` and ``is_causal`` are there for timm's ``Block``, which passes them; only ``sdpa``
        takes them.
        """
        if attn_mask is not None or is_causal:
            raise ValueError(f"{type(self).__name__} takes no attn_mask or is_causal; use the 'sdpa' kind")
        return self.output(self.attend(self.packed_qkv(x)))

    def output(self, out: Tensor) -> Tensor:
        """Output projection of the per-head result ``(B, N, H, D)`` → ``(B, N, E)``."""
        return self.proj_drop(self.proj(out.reshape(*out.shape[:2], self.dim)))


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

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention over tokens ``x`` ``(B, N, E)`` → ``(B, N, E)``; mask semantics of ``F.sdpa``."""
        return self.output(self.attend(self.packed_qkv(x), attn_mask, is_causal))

    def attend(self, qkv: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        p = self.attn_drop if self.training else 0.0
        q, k, v = unpack_qkv(qkv)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
        return out.transpose(1, 2)

    def attention_weights(self, x: Tensor) -> Tensor:
        """The explicit attention matrix ``softmax(Q Kᵀ / √D)`` ``(B, H, N, N)``, O(N²) memory (analysis)."""
        q, k, _ = self.project_qkv(x)
        return torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1)


class NystromAttention(_MultiHeadAttention):
    """Nyströmformer: softmax attention through M landmarks (Xiong et al. 2021).

    With landmarks ``Q̃, K̃`` (segment means of Q and K, eq. 12 of the paper) and ``s = 1/√D``, eq. (15):

        ``Ŝ V = softmax(s Q K̃ᵀ) · pinv(softmax(s Q̃ K̃ᵀ)) · (softmax(s Q̃ Kᵀ) V)``

    evaluated right to left, so the cost is O(N M D). The pseudo-inverse is the paper's iteration (eq. 16,
    :func:`iterative_pinv`). Built for CPU speed and memory: one fused autograd function
    (:class:`NystromKernels`) runs the qkv projection and the two N × M kernels block by block, forward and
    backward, and folds each block's dQ, dK, dV straight into the projection's gradients, so neither an
    N × M matrix nor the (N × 3E) gradient of qkv is ever stored; the layer's peak memory is below that of
    exact fused attention (see ``benchmarks/README.md``).
    Any N works: the landmarks are means of segments that split the N tokens exactly (:func:`segment_means`);
    when N ≤ M the layer computes exact attention (the approximation would not save anything).

    Args:
        dim: embedding size E.
        num_heads: H.
        num_landmarks: M.
        pinv_iterations: iterations of :func:`iterative_pinv` (paper: 6).
        conv_kernel: if set, the paper's skip connection: a depthwise convolution of V along the token axis
            (one kernel of this odd length per head) added to the output. ``None`` (default) leaves it out.
        cpu_threads: intra-op threads for the fused kernels on CPU (default 1: their many mid-size ops lose
            more to thread synchronisation than they gain, see :func:`intra_op_threads`); ``None`` uses
            PyTorch's setting. The output projection always uses PyTorch's setting.
        **kwargs: ``qkv_bias``, ``proj_bias``, ``proj_drop`` (``qk_norm`` is not supported: the projection
            is fused into the kernels).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_landmarks: int = 64,
        pinv_iterations: int = 6,
        conv_kernel: int | None = None,
        cpu_threads: int | None = 1,
        **kwargs,
    ) -> None:
        _refuse_qk_norm("nystrom", kwargs)
        super().__init__(dim, num_heads, **kwargs)
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if conv_kernel is not None and (conv_kernel < 1 or conv_kernel % 2 == 0):
            raise ValueError(f"conv_kernel must be a positive odd length or None, got {conv_kernel}")
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.cpu_threads = _check_threads(cpu_threads)
        self.conv = None
        if conv_kernel is not None:
            h = num_heads
            self.conv = nn.Conv2d(h, h, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=h, bias=False)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention over tokens ``x`` ``(B, N, E)`` → ``(B, N, E)`` (``attn_mask``: base class)."""
        if attn_mask is not None or is_causal or x.ndim != 3 or x.shape[1] <= self.num_landmarks:
            return super().forward(x, attn_mask, is_causal)  # validation, or exact attention for N ≤ M
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected tokens of shape (B, N, {self.dim}), got {tuple(x.shape)}")
        args = (self.num_heads, self.num_landmarks, self.pinv_iterations, self.scale, self.cpu_threads)
        with intra_op_threads(self.cpu_threads, x.device):
            out = NystromKernels.apply(x, self.qkv.weight, self.qkv.bias, *args)  # (B, N, H, D)
        if self.conv is not None:
            e = self.dim
            bias = None if self.qkv.bias is None else self.qkv.bias[2 * e :]
            v = F.linear(x, self.qkv.weight[2 * e :], bias).unflatten(-1, (self.num_heads, self.head_dim))
            out = out + self.conv(v.transpose(1, 2)).transpose(1, 2)
        return self.output(out)

    def attend(self, qkv: Tensor) -> Tensor:
        """Exact attention (used for N ≤ M), plus the convolution skip if any."""
        out = F.scaled_dot_product_attention(*unpack_qkv(qkv)).transpose(1, 2)
        if self.conv is not None:
            out = out + self.conv(qkv[:, :, 2].transpose(1, 2)).transpose(1, 2)
        return out


def _check_threads(threads: int | None) -> int | None:
    if threads is not None and threads < 1:
        raise ValueError(f"cpu_threads must be >= 1 or None, got {threads}")
    return threads


def _refuse_qk_norm(kind: str, kwargs: dict) -> None:
    if kwargs.get("qk_norm"):
        raise ValueError(f"qk_norm=True is not supported by the {kind!r} kind; use 'sdpa' or 'linformer'")


class PerformerAttention(_MultiHeadAttention):
    """Performer: FAVOR+ with positive orthogonal random features (Choromanski et al. 2021).

    The softmax kernel ``exp(qᵀk)`` on ``q = s^½ Q_i, k = s^½ K_j`` (``s = 1/√D``) is estimated by
    ``φ(q)ᵀφ(k)`` with the positive random features of Lemma 1,

        ``φ(x) = exp(W x − ‖x‖²/2) / √M``,  rows of W ∈ R^{M×D} orthogonal Gaussian (Sec. 2.4),

    and attention is ``D̂⁻¹ (φ(Q) (φ(K)ᵀ V))`` with ``D̂ = diag(φ(Q) (φ(K)ᵀ 1_N))`` (eq. 4): O(N M D).
    Numerically stable: each query's features are divided by their largest value and all keys' features by
    one shared largest value per (batch, head); both factors cancel in the normalisation ``D̂⁻¹``. One fused
    autograd function (:class:`FavorKernels`) runs projection and kernel block by block, so neither an
    (N × M) feature matrix nor the (N × 3E) gradient of qkv is stored.

    Args:
        dim: embedding size E.
        num_heads: H.
        nb_features: M; default ``round(D ln D)`` as in the paper.
        redraw_interval: in training, draw new features every this many forward calls (``None``: never).
        generator: random generator for the first draw (reproducible layers).
        cpu_threads: intra-op threads for the fused kernels on CPU (default 1, as for ``nystrom``); ``None``
            uses PyTorch's setting.
        **kwargs: ``qkv_bias``, ``proj_bias``, ``proj_drop`` (``qk_norm`` is not supported: the projection
            is fused into the kernels).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        nb_features: int | None = None,
        redraw_interval: int | None = None,
        generator: torch.Generator | None = None,
        cpu_threads: int | None = 1,
        **kwargs,
    ) -> None:
        _refuse_qk_norm("performer", kwargs)
        super().__init__(dim, num_heads, **kwargs)
        d = self.head_dim
        self.nb_features = nb_features or max(1, round(d * math.log(d)))
        if self.nb_features < 1:
            raise ValueError(f"nb_features must be >= 1, got {nb_features}")
        if redraw_interval is not None and redraw_interval < 1:
            raise ValueError(f"redraw_interval must be >= 1 or None, got {redraw_interval}")
        self.redraw_interval = redraw_interval
        self.cpu_threads = _check_threads(cpu_threads)
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

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Self-attention over tokens ``x`` ``(B, N, E)`` → ``(B, N, E)`` (``attn_mask``: base class)."""
        if attn_mask is not None or is_causal or x.ndim != 3 or x.shape[-1] != self.dim:
            return super().forward(x, attn_mask, is_causal)  # raises the ValueError
        if self.training and self.redraw_interval is not None:
            if self.calls.item() > 0 and self.calls.item() % self.redraw_interval == 0:
                self.redraw_features()
            self.calls += 1
        features = self.features.to(x.dtype)
        args = (self.num_heads, features, self.scale**0.5, self.eps, self.cpu_threads)
        with intra_op_threads(self.cpu_threads, x.device):
            out = FavorKernels.apply(x, self.qkv.weight, self.qkv.bias, *args)  # (B, N, H, D)
        return self.output(out)


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

    def attend(self, qkv: Tensor) -> Tensor:
        q, k, v = unpack_qkv(qkv)
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        k_low = self.proj_k @ segment_means(k, self.seq_len)  # E P_N K: (B, H, k, D)
        v_low = proj_v @ segment_means(v, self.seq_len)  # F P_N V: (B, H, k, D)
        return F.scaled_dot_product_attention(q, k_low, v_low).transpose(1, 2)


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
        **kwargs: shared ``qkv_bias`` (True), ``qk_norm``, ``proj_bias``, ``proj_drop``, ``norm_layer``, and
            the kind's own options: sdpa ``attn_drop``; nystrom ``num_landmarks`` (64),
            ``pinv_iterations`` (6), ``conv_kernel`` (None), ``cpu_threads`` (1); performer ``nb_features``
            (D ln D), ``redraw_interval``, ``generator``, ``cpu_threads`` (1); linformer ``k`` (256),
            ``seq_len`` (1024), ``share_kv``.

    Raises:
        ValueError: unknown kind, an option the kind does not take, or inconsistent sizes.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {sorted(ATTENTION_KINDS)}")
    cls = ATTENTION_KINDS[kind]
    accepted = {
        name
        for c in (cls, _MultiHeadAttention)
        for name, param in inspect.signature(c.__init__).parameters.items()
        if param.kind is param.KEYWORD_ONLY or param.kind is param.POSITIONAL_OR_KEYWORD
    } - {"self", "dim", "num_heads"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"attention kind {kind!r} takes no option {unknown}; accepted: {sorted(accepted)}")
    return cls(dim, num_heads, **kwargs)
