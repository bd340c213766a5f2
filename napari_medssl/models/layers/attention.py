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
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

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


def segment_means(x: Tensor, m: int) -> Tensor:
    """Means of ``m`` contiguous segments of the token axis, for any number of tokens.

    For ``N >= m`` the tokens are split exactly into ``m`` segments whose lengths differ by at most one
    (the first ``N mod m`` segments hold one token more), so every token counts once. For ``N < m`` the
    segments are single tokens picked by nearest-neighbour upsampling (segment i is token ``floor(i N / m)``).
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
    ``Z_0 = Aᵀ / (‖A‖₁ ‖A‖∞)``, which converges for any A (the nonzero eigenvalues of A Z_0 lie in (0, 1]).
    Norms are taken per matrix. Only matrix products: differentiable and fast on small (M × M) matrices.

    Args:
        a: ``(..., M, M)``.
        iterations: number of iterations (the paper uses 6).

    Returns:
        ``(..., M, M)``, approximately ``pinv(a)``.
    """
    shape, m = a.shape, a.shape[-1]
    a = a.reshape(-1, m, m)
    abs_a = a.abs()
    norm_1 = abs_a.sum(-2).amax(-1)[:, None, None]
    norm_inf = abs_a.sum(-1).amax(-1)[:, None, None]
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)
    eye = torch.eye(m, dtype=a.dtype, device=a.device).expand_as(a)
    for _ in range(iterations):  # few, fused batched products: the matrices are small, the op count matters
        az = torch.bmm(a, z)
        t = torch.baddbmm(15 * eye, az, 7 * eye - az, alpha=-1)
        t = torch.baddbmm(3.25 * eye, az, t, alpha=-0.25)  # ¼ (13 I − A Z t)
        z = torch.bmm(z, t)
    return z.reshape(shape)


def unpack_qkv(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views ``q, k, v`` ``(B, H, N, D)`` of packed ``(B, N, 3, H, D)``."""
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


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


_BLOCK_ELEMENTS = 4096 * 64  # per (batch, head): the fused kernels' (tokens × M) temporaries stay this size


def _token_blocks(n: int, width: int) -> list[slice]:
    """Slices covering ``range(n)``: blocks of N/8 tokens (≥ 256), at most ``_BLOCK_ELEMENTS // width``.

    A block's (tokens × width) temporaries then stay a small fraction of one (N × D) tensor at any N.
    """
    size = max(1, min(max(n // 8, 256), _BLOCK_ELEMENTS // width))
    return [slice(start, start + size) for start in range(0, n, size)]


@contextmanager
def _intra_op_threads(threads: int | None, device: torch.device) -> Iterator[None]:
    """Run the CPU ops inside on ``threads`` intra-op threads (``None``, or not on CPU: leave as set).

    The fused kernels below are many mid-size tensor ops; on a machine whose cores are shared, each op split
    over several threads waits at its end for the slowest one. Measured on 2 shared cores (load 5–9),
    Nyström at 16k tokens, forward + backward: 0.44 s with its kernels on one thread, 1.2–4.5 s on two.
    """
    before = torch.get_num_threads()
    if threads is None or device.type != "cpu" or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _landmark_mix(q_land: Tensor, k_land: Tensor, kv3: Tensor, scale: float, iterations: int) -> Tensor:
    """``W = pinv(softmax(s Q̃ K̃ᵀ)) · kv3`` ``(B, H, M, D)``, in at least float32 (small M × M graph)."""
    work = torch.promote_types(kv3.dtype, torch.float32)
    q_land, k_land = q_land.to(work), k_land.to(work)
    kernel_2 = torch.softmax(scale * q_land @ k_land.transpose(-1, -2), dim=-1)
    return (iterative_pinv(kernel_2, iterations) @ kv3.to(work)).to(kv3.dtype)


def _add_segment_grad(grad: Tensor, grad_means: Tensor) -> None:
    """In place: ``grad`` ``(..., N, D)`` += the gradient of :func:`segment_means` given ``grad_means``."""
    n, m = grad.shape[-2], grad_means.shape[-2]
    size, rest = divmod(n, m)
    split = rest * (size + 1)
    if rest:
        grad[..., :split, :].unflatten(-2, (rest, size + 1)).add_(
            grad_means[..., :rest, None, :] / (size + 1)
        )
    grad[..., split:, :].unflatten(-2, (m - rest, size)).add_(grad_means[..., rest:, None, :] / size)


class _QKVGrad:
    """Gradient of the ``qkv`` projection ``x ↦ x Wᵀ + b`` gathered from per-head blocks of dQ, dK, dV.

    The fused kernels call :meth:`add` with each block's gradient as soon as it is known, so dQ, dK and dV
    are never stored whole: only ``dx`` ``(B, N, E)`` (needed anyway) and the weight gradients are.
    """

    def __init__(self, x: Tensor, weight: Tensor, has_bias: bool, num_landmarks: int) -> None:
        self.x, self.e = x, x.shape[-1]
        self.weight = weight.view(3, self.e, self.e)  # rows of q, k, v
        self.dx = torch.zeros_like(x)
        self.dw = torch.zeros_like(self.weight)
        self.db = x.new_zeros(3, self.e) if has_bias else None
        self.num_landmarks = num_landmarks

    def add(self, part: int, sl: slice, grad: Tensor) -> None:
        """Tokens ``sl`` of dQ (part 0), dK (1) or dV (2), per head ``(B, H, c, D)``."""
        g = grad.transpose(1, 2).flatten(2)  # (B, c, E)
        self.dx[:, sl] += g @ self.weight[part]
        self.dw[part] += g.flatten(0, 1).T @ self.x[:, sl].flatten(0, 1)
        if self.db is not None:
            self.db[part] += g.sum((0, 1))

    def add_landmarks(self, part: int, grad_means: Tensor) -> None:
        """Gradient reaching dQ or dK through the landmarks (segment means) ``(B, H, M, D)``."""
        g = grad_means.transpose(1, 2).flatten(2)  # (B, M, E)
        _add_segment_grad(self.dx, g @ self.weight[part])
        x_means = segment_means(self.x, self.num_landmarks)  # (B, M, E)
        self.dw[part] += g.flatten(0, 1).T @ x_means.flatten(0, 1)
        if self.db is not None:
            self.db[part] += g.sum((0, 1))

    def result(self) -> tuple[Tensor, Tensor, Tensor | None]:
        db = None if self.db is None else self.db.flatten()
        return self.dx, self.dw.flatten(0, 1), db


class _NystromKernels(torch.autograd.Function):
    """Fused qkv projection + Nyström attention: tokens ``(B, N, E)`` → per-head output ``(B, N, H, D)``.

    Forward: ``qkv = x Wᵀ + b``, landmarks, ``kv3 = softmax(s Q̃ Kᵀ) V`` by an online (flash-style) softmax
    over key blocks, ``W`` from the pseudo-inverse, and ``softmax(s Q K̃ᵀ) W`` by the fused SDPA kernel.
    Saved: ``x``, ``qkv`` and (B, H, M, ·) tensors. Backward recomputes each (block × M) probability matrix
    and turns each block's dQ, dK, dV at once into ``dx`` and the weight gradients (:class:`_QKVGrad`): no
    N × M matrix and no (N × 3E) gradient is ever held.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        num_heads: int,
        num_landmarks: int,
        iterations: int,
        scale: float,
        threads: int | None,
    ) -> Tensor:
        b, n, e = x.shape
        qkv = F.linear(x, weight, bias).view(b, n, 3, num_heads, e // num_heads)
        q, k, v = unpack_qkv(qkv)  # (B, H, N, D) views
        q_land, k_land = segment_means(q, num_landmarks), segment_means(k, num_landmarks)
        q_land_s = q_land * scale
        run_max = q_land.new_full((*q_land.shape[:-1], 1), float("-inf"))
        denom = torch.zeros_like(run_max)
        kv3 = torch.zeros_like(q_land)
        for sl in _token_blocks(n, num_landmarks):
            logits = q_land_s @ k[..., sl, :].transpose(-1, -2)  # (B, H, M, c)
            new_max = torch.maximum(run_max, logits.amax(-1, keepdim=True))
            correction = torch.exp(run_max - new_max)
            p = logits.sub_(new_max).exp_()
            denom = denom * correction + p.sum(-1, keepdim=True)
            kv3 = kv3 * correction + p @ v[..., sl, :]
            run_max = new_max
        kv3 = kv3 / denom  # softmax(s Q̃ Kᵀ) V
        lse3 = run_max + denom.log()
        needs_grad = any(ctx.needs_input_grad[:3])
        with torch.enable_grad(), _intra_op_threads(1, x.device):  # keep the small M × M graph of W
            leaves = [t.detach().requires_grad_(needs_grad) for t in (q_land, k_land, kv3)]
            w_graph = _landmark_mix(*leaves, scale, iterations)
        w = w_graph.detach()
        out = F.scaled_dot_product_attention(q, k_land, w, scale=scale)  # softmax(s Q K̃ᵀ) W
        ctx.save_for_backward(x, weight, qkv, q_land, k_land, kv3, lse3, w)
        ctx.small_graph, ctx.scale, ctx.has_bias = (leaves, w_graph), scale, bias is not None
        ctx.threads = threads
        return out.transpose(1, 2).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        with _intra_op_threads(ctx.threads, grad_out.device):
            return *_NystromKernels.gradients(ctx, grad_out), None, None, None, None, None

    @staticmethod
    def gradients(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """dx, dW, db of the qkv projection."""
        x, weight, qkv, q_land, k_land, kv3, lse3, w = ctx.saved_tensors
        scale, n, m = ctx.scale, x.shape[1], q_land.shape[-2]
        q, k, v = unpack_qkv(qkv)
        grad_out = grad_out.transpose(1, 2)  # (B, H, N, D)
        grads = _QKVGrad(x, weight, ctx.has_bias, m)
        q_land_s, k_land_s = q_land * scale, k_land * scale
        dw, dk_land = torch.zeros_like(w), torch.zeros_like(k_land)
        blocks = _token_blocks(n, m)
        for sl in blocks:  # kernel 1: out = P W, P = softmax(s Q K̃ᵀ)
            q_c, do_c = q[..., sl, :], grad_out[..., sl, :]
            p = torch.softmax(q_c @ k_land_s.transpose(-1, -2), dim=-1)  # (B, H, c, M)
            dw += p.transpose(-1, -2) @ do_c
            dp = do_c @ w.transpose(-1, -2)
            ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p)  # dS / s
            grads.add(0, sl, ds @ k_land_s)
            dk_land += ds.transpose(-1, -2) @ q_c
        with _intra_op_threads(1, x.device):
            dq_land, dk_land_2, dkv3 = torch.autograd.grad(ctx.small_graph[1], ctx.small_graph[0], dw)
        dk_land = dk_land_2.add_(dk_land, alpha=scale)
        delta = (dkv3 * kv3).sum(-1, keepdim=True)  # rowsum(P3 ∘ dP3)
        dq_land_3 = torch.zeros_like(q_land)
        for sl in blocks:  # kernel 3: kv3 = P3 V, P3 = softmax(s Q̃ Kᵀ)
            k_c, v_c = k[..., sl, :], v[..., sl, :]
            p = (q_land_s @ k_c.transpose(-1, -2)).sub_(lse3).exp_()  # (B, H, M, c)
            grads.add(2, sl, p.transpose(-1, -2) @ dkv3)
            ds = (dkv3 @ v_c.transpose(-1, -2)).sub_(delta).mul_(p)  # dS / s
            grads.add(1, sl, ds.transpose(-1, -2) @ q_land_s)
            dq_land_3 += ds @ k_c
        grads.add_landmarks(0, dq_land.add_(dq_land_3, alpha=scale))
        grads.add_landmarks(1, dk_land)
        return grads.result()


class NystromAttention(_MultiHeadAttention):
    """Nyströmformer: softmax attention through M landmarks (Xiong et al. 2021).

    With landmarks ``Q̃, K̃`` (segment means of Q and K, eq. 12 of the paper) and ``s = 1/√D``, eq. (15):

        ``Ŝ V = softmax(s Q K̃ᵀ) · pinv(softmax(s Q̃ K̃ᵀ)) · (softmax(s Q̃ Kᵀ) V)``

    evaluated right to left, so the cost is O(N M D). The pseudo-inverse is the paper's iteration (eq. 16,
    :func:`iterative_pinv`). Built for CPU speed and memory: one fused autograd function
    (:class:`_NystromKernels`) runs the qkv projection and the two N × M kernels block by block, forward and
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
            more to thread synchronisation than they gain, see :func:`_intra_op_threads`); ``None`` uses
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
        with _intra_op_threads(self.cpu_threads, x.device):
            out = _NystromKernels.apply(x, self.qkv.weight, self.qkv.bias, *args)  # (B, N, H, D)
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


def _favor_features(x: Tensor, features: Tensor, eps: float, peak: Tensor | None = None) -> Tensor:
    """Positive random features ``exp(W x − ‖x‖²/2 − peak) + eps`` ``(B, H, c, M)`` of ``x`` ``(B, H, c, D)``.

    ``peak=None``: each row's own maximum exponent (queries); otherwise a shared (B, H, 1, 1) one (keys).
    """
    wx = (x @ features.T).sub_(0.5 * x.square().sum(-1, keepdim=True))
    return wx.sub_(wx.amax(-1, keepdim=True) if peak is None else peak).exp_().add_(eps)


class _FavorKernels(torch.autograd.Function):
    """Fused qkv projection + FAVOR+: tokens ``(B, N, E)`` → per-head output ``(B, N, H, D)``, block by block.

    Forward: ``qkv = x Wᵀ + b``, the keys' shared maximum exponent (one pass), ``φ(K)ᵀ V`` ``(M, D)`` and
    ``φ(K)ᵀ 1`` ``(M,)`` (second pass), then each query block's ``φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1)``. Backward
    recomputes the feature blocks and folds each block's dQ, dK, dV straight into the projection's gradients
    (:class:`_QKVGrad`); no (N × M) feature matrix is kept. The stabilising maxima are constants for the
    gradient (they cancel in the normalisation).
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        num_heads: int,
        features: Tensor,
        root_scale: float,
        eps: float,
        threads: int | None,
    ) -> Tensor:
        b, n, e = x.shape
        qkv = F.linear(x, weight, bias).view(b, n, 3, num_heads, e // num_heads)
        q, k, v = unpack_qkv(qkv)
        key_peak = q.new_full((b, num_heads, 1, 1), float("-inf"))
        blocks = _token_blocks(n, features.shape[0])
        for sl in blocks:
            k_c = root_scale * k[..., sl, :]
            wk = k_c @ features.T - 0.5 * k_c.square().sum(-1, keepdim=True)
            key_peak = torch.maximum(key_peak, wk.amax((-1, -2), keepdim=True))
        kv = q.new_zeros(b, num_heads, features.shape[0], e // num_heads)
        k_sum = q.new_zeros(b, num_heads, features.shape[0], 1)
        for sl in blocks:
            phi = _favor_features(root_scale * k[..., sl, :], features, eps, key_peak)
            kv += phi.transpose(-1, -2) @ v[..., sl, :]
            k_sum += phi.sum(-2).unsqueeze(-1)
        out = qkv.new_empty(b, n, num_heads, e // num_heads)
        for sl in blocks:
            phi = _favor_features(root_scale * q[..., sl, :], features, eps)
            out[:, sl] = ((phi @ kv) / (phi @ k_sum)).transpose(1, 2)
        ctx.save_for_backward(x, weight, qkv, features, key_peak, kv, k_sum, out)
        ctx.root_scale, ctx.eps, ctx.has_bias, ctx.threads = root_scale, eps, bias is not None, threads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        with _intra_op_threads(ctx.threads, grad_out.device):
            return *_FavorKernels.gradients(ctx, grad_out), None, None, None, None, None

    @staticmethod
    def gradients(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """dx, dW, db of the qkv projection."""
        x, weight, qkv, features, key_peak, kv, k_sum, out = ctx.saved_tensors
        rs, eps, n = ctx.root_scale, ctx.eps, x.shape[1]
        q, k, v = unpack_qkv(qkv)
        grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)  # (B, H, N, D)
        grads = _QKVGrad(x, weight, ctx.has_bias, 1)
        d_kv, d_k_sum = torch.zeros_like(kv), torch.zeros_like(k_sum)
        blocks = _token_blocks(n, features.shape[0])
        for sl in blocks:  # out = φ(Q) kv / (φ(Q) k_sum)
            q_c = rs * q[..., sl, :]
            phi = _favor_features(q_c, features, eps)
            g = grad_out[..., sl, :] / (phi @ k_sum)  # dO / denominator
            t = (g * out[..., sl, :]).sum(-1, keepdim=True)
            d_kv += phi.transpose(-1, -2) @ g
            d_k_sum -= phi.transpose(-1, -2) @ t
            d_wx = (g @ kv.transpose(-1, -2)).sub_(t @ k_sum.transpose(-1, -2)).mul_(phi.sub_(eps))
            grads.add(0, sl, rs * (d_wx @ features - d_wx.sum(-1, keepdim=True) * q_c))
        for sl in blocks:  # kv = φ(K)ᵀ V, k_sum = φ(K)ᵀ 1
            k_c = rs * k[..., sl, :]
            phi = _favor_features(k_c, features, eps, key_peak)
            grads.add(2, sl, phi @ d_kv)
            d_wx = (
                (v[..., sl, :] @ d_kv.transpose(-1, -2)).add_(d_k_sum.transpose(-1, -2)).mul_(phi.sub_(eps))
            )
            grads.add(1, sl, rs * (d_wx @ features - d_wx.sum(-1, keepdim=True) * k_c))
        return grads.result()


class PerformerAttention(_MultiHeadAttention):
    """Performer: FAVOR+ with positive orthogonal random features (Choromanski et al. 2021).

    The softmax kernel ``exp(qᵀk)`` on ``q = s^½ Q_i, k = s^½ K_j`` (``s = 1/√D``) is estimated by
    ``φ(q)ᵀφ(k)`` with the positive random features of Lemma 1,

        ``φ(x) = exp(W x − ‖x‖²/2) / √M``,  rows of W ∈ R^{M×D} orthogonal Gaussian (Sec. 2.4),

    and attention is ``D̂⁻¹ (φ(Q) (φ(K)ᵀ V))`` with ``D̂ = diag(φ(Q) (φ(K)ᵀ 1_N))`` (eq. 4): O(N M D).
    Numerically stable: each query's features are divided by their largest value and all keys' features by
    one shared largest value per (batch, head); both factors cancel in the normalisation ``D̂⁻¹``. One fused
    autograd function (:class:`_FavorKernels`) runs projection and kernel block by block, so neither an
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
        with _intra_op_threads(self.cpu_threads, x.device):
            out = _FavorKernels.apply(x, self.qkv.weight, self.qkv.bias, *args)  # (B, N, H, D)
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
