"""Fused CPU-friendly kernels behind the ``nystrom`` and ``performer`` attention kinds (private).

Each kind's qkv projection and attention run in one ``torch.autograd.Function`` that works block by block
over tokens, forward and backward, so no (N × M) matrix and no (N × 3E) gradient of qkv is ever stored,
and folds each block's dQ, dK, dV straight into the projection's gradients. The public layers and the
equations are in :mod:`napari_medssl.models.layers.attention`.

Axis legend: B batch, N tokens, E embedding, H heads, D head size, M landmarks / random features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


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


_BLOCK_ELEMENTS = 4096 * 64  # per (batch, head): the fused kernels' (tokens × M) temporaries stay this size


def _token_blocks(n: int, width: int) -> list[slice]:
    """Slices covering ``range(n)``: blocks of N/8 tokens (≥ 256), at most ``_BLOCK_ELEMENTS // width``.

    A block's (tokens × width) temporaries then stay a small fraction of one (N × D) tensor at any N.
    """
    size = max(1, min(max(n // 8, 256), _BLOCK_ELEMENTS // width))
    return [slice(start, start + size) for start in range(0, n, size)]


@contextmanager
def intra_op_threads(threads: int | None, device: torch.device) -> Iterator[None]:
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


class NystromKernels(torch.autograd.Function):
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
        with torch.enable_grad(), intra_op_threads(1, x.device):  # keep the small M × M graph of W
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
        with intra_op_threads(ctx.threads, grad_out.device):
            return *NystromKernels.gradients(ctx, grad_out), None, None, None, None, None

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
        with intra_op_threads(1, x.device):
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


def _favor_features(x: Tensor, features: Tensor, eps: float, peak: Tensor | None = None) -> Tensor:
    """Positive random features ``exp(W x − ‖x‖²/2 − peak) + eps`` ``(B, H, c, M)`` of ``x`` ``(B, H, c, D)``.

    ``peak=None``: each row's own maximum exponent (queries); otherwise a shared (B, H, 1, 1) one (keys).
    """
    wx = (x @ features.T).sub_(0.5 * x.square().sum(-1, keepdim=True))
    return wx.sub_(wx.amax(-1, keepdim=True) if peak is None else peak).exp_().add_(eps)


class FavorKernels(torch.autograd.Function):
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
        with intra_op_threads(ctx.threads, grad_out.device):
            return *FavorKernels.gradients(ctx, grad_out), None, None, None, None, None

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
