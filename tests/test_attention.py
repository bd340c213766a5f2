"""Attention kinds: shapes at odd N, gradients, the fused Nyström kernels against the plain formula, and how
well the linear kinds approximate exact attention on tokens of a real mammogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import napari_medssl.models.layers._attention_kernels as kernels
from napari_medssl.models.layers import ATTENTION_KINDS, make_attention
from napari_medssl.models.layers.attention import iterative_pinv, segment_means

SMALL = {
    "nystrom": {"num_landmarks": 16},
    "performer": {"nb_features": 32},
    "linformer": {"k": 16, "seq_len": 64},
}


def image_tokens(data_dir: Path, dim: int = 64) -> torch.Tensor:
    """Tokens ``(1, 1024, dim)`` of a real mammogram: 8×8 patches of the image area-resized to 256², through a
    fixed random linear patch embedding, standardised per channel."""
    arr = np.asarray(Image.open(data_dir / "mammography_mias" / "mdb005.png").convert("L"), dtype=np.float32)
    img = F.interpolate(torch.from_numpy(arr / 255.0)[None, None], size=(256, 256), mode="area")
    patches = F.unfold(img, 8, stride=8).transpose(1, 2)  # (1, 1024, 64)
    embed = torch.randn(dim, 64, generator=torch.Generator().manual_seed(0)) / 8
    tokens = patches @ embed.T
    return (tokens - tokens.mean(1, keepdim=True)) / tokens.std(1, keepdim=True)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def test_kinds_registered():
    assert sorted(ATTENTION_KINDS) == ["linformer", "nystrom", "performer", "sdpa"]


CASES = [(kind, SMALL.get(kind, {})) for kind in sorted(ATTENTION_KINDS)]
CASES.append(("nystrom", {**SMALL["nystrom"], "conv_kernel": 5}))  # with the paper's depthwise-conv skip
CASES.append(("performer", {**SMALL["performer"], "qkv_bias": False}))


@pytest.mark.parametrize(("kind", "options"), CASES)
@pytest.mark.parametrize("n", [37, 1000])
def test_shape_and_backward_at_odd_lengths(kind, options, n):
    torch.manual_seed(0)
    layer = make_attention(kind, 32, 4, **options)
    x = torch.randn(3, n, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, n, 32)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # samples are independent: changing one sample leaves the others' outputs alone
    x2 = x.detach().clone()
    x2[0] += 1
    torch.testing.assert_close(layer(x2)[1:], y[1:].detach(), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown attention kind 'flash'"):
        make_attention("flash", 32, 4)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        make_attention("sdpa", 30, 4)
    with pytest.raises(ValueError, match=r"'nystrom' takes no option \['k'\]; accepted: .*'num_landmarks'"):
        make_attention("nystrom", 32, 4, k=8)
    with pytest.raises(ValueError, match="num_landmarks must be >= 1"):
        make_attention("nystrom", 32, 4, num_landmarks=0)
    with pytest.raises(ValueError, match="qk_norm=True is not supported by the 'performer' kind"):
        make_attention("performer", 32, 4, qk_norm=True)
    with pytest.raises(ValueError, match=r"\(B, N, 32\)"):
        make_attention("nystrom", 32, 4)(torch.randn(2, 100, 16))


def test_segment_means_split_every_token_once():
    x = torch.arange(10.0).view(10, 1)
    torch.testing.assert_close(segment_means(x, 3).flatten(), torch.tensor([1.5, 5.0, 8.0]))  # 4 + 3 + 3
    torch.testing.assert_close(segment_means(x, 5).flatten(), torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))
    assert segment_means(x, 16).flatten().tolist() == [i * 10 // 16 for i in range(16)]  # N < M: nearest


def test_iterative_pinv_inverts_softmax_kernel():
    a = torch.softmax(torch.randn(2, 16, 16, dtype=torch.float64), dim=-1)
    z = iterative_pinv(a, iterations=20)
    torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=1e-6, atol=1e-6)


def nystrom_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Nyströmformer eq. (15) the plain way: all three kernels as explicit matrices, autograd throughout."""
    q, k, v = layer.project_qkv(x)
    s, m = layer.scale, layer.num_landmarks
    q_land, k_land = segment_means(q, m), segment_means(k, m)
    kernel_1 = torch.softmax(s * q @ k_land.transpose(-1, -2), -1)
    kernel_2 = torch.softmax(s * q_land @ k_land.transpose(-1, -2), -1)
    kernel_3 = torch.softmax(s * q_land @ k.transpose(-1, -2), -1)
    out = kernel_1 @ (iterative_pinv(kernel_2, layer.pinv_iterations) @ (kernel_3 @ v))
    return layer.proj(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("n", [1000, 1024, 129])
def test_fused_nystrom_equals_plain_formula(n, monkeypatch):
    monkeypatch.setattr(kernels, "_BLOCK_ELEMENTS", 100 * 16)  # blocks of 100 tokens, a ragged last one
    torch.manual_seed(0)
    layer = make_attention("nystrom", 32, 4, num_landmarks=16).double()
    x = torch.randn(2, n, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, n, 32, dtype=torch.float64)
    layer(x).backward(g)
    fused = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    y_ref = nystrom_reference(layer, x)
    y_ref.backward(g)
    torch.testing.assert_close(layer(x), y_ref)
    for got, want in zip(fused, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, want)


def test_nystrom_is_exact_up_to_num_landmarks_tokens():
    torch.manual_seed(0)
    exact = make_attention("sdpa", 32, 4)
    nystrom = make_attention("nystrom", 32, 4, num_landmarks=16)
    nystrom.load_state_dict(exact.state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(nystrom(x), exact(x))


def performer_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FAVOR+ (eq. 4 with Lemma 1 features) the plain way, autograd throughout, same stabilisers."""
    q, k, v = layer.project_qkv(x)
    w, rs, eps = layer.features, layer.scale**0.5, layer.eps

    def exponent(t):
        return (rs * t) @ w.T - 0.5 * (rs * t).square().sum(-1, keepdim=True)

    wq, wk = exponent(q), exponent(k)
    phi_q = torch.exp(wq - wq.amax(-1, keepdim=True).detach()) + eps
    phi_k = torch.exp(wk - wk.amax((-1, -2), keepdim=True).detach()) + eps
    out = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / (phi_q @ phi_k.sum(-2).unsqueeze(-1))
    return layer.proj(out.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("n", [1000, 37])
def test_fused_performer_equals_plain_formula(n, monkeypatch):
    monkeypatch.setattr(kernels, "_BLOCK_ELEMENTS", 100 * 24)
    torch.manual_seed(0)
    layer = make_attention("performer", 32, 4, nb_features=24).double()
    x = torch.randn(2, n, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, n, 32, dtype=torch.float64)
    layer(x).backward(g)
    fused = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    y_ref = performer_reference(layer, x)
    y_ref.backward(g)
    torch.testing.assert_close(layer(x), y_ref)
    for got, want in zip(fused, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(got, want)


def test_nystrom_error_small_and_falling_with_landmarks(data_dir):
    tokens = image_tokens(data_dir)
    torch.manual_seed(0)
    exact = make_attention("sdpa", 64, 4)
    with torch.no_grad():
        y_exact = exact(tokens)
        # the attention is far from uniform, so the comparison means something
        assert relative_error(y_exact.mean(1, keepdim=True).expand_as(y_exact), y_exact) > 0.5
        errors = []
        for m in (16, 64, 256):
            nystrom = make_attention("nystrom", 64, 4, num_landmarks=m)
            nystrom.load_state_dict(exact.state_dict())  # same qkv / proj weights
            errors.append(relative_error(nystrom(tokens), y_exact))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.15, errors


def test_performer_approximates_better_with_more_features(data_dir):
    tokens = 0.5 * image_tokens(
        data_dir
    )  # smaller q·k: the regime where the random-feature kernel is accurate
    torch.manual_seed(0)
    exact = make_attention("sdpa", 64, 4)
    mean_errors = []
    with torch.no_grad():
        y_exact = exact(tokens)
        for nb_features in (16, 128, 512):
            errors = []
            for seed in range(3):
                performer = make_attention(
                    "performer", 64, 4, nb_features=nb_features, generator=torch.Generator().manual_seed(seed)
                )
                performer.load_state_dict(exact.state_dict(), strict=False)
                errors.append(relative_error(performer(tokens), y_exact))
            mean_errors.append(float(np.mean(errors)))
    assert mean_errors[0] > mean_errors[1] > mean_errors[2], mean_errors
    assert mean_errors[2] < 0.5 * mean_errors[0], mean_errors


def test_performer_features_orthogonal_and_redrawn():
    layer = make_attention("performer", 64, 2, nb_features=48, redraw_interval=2)
    w = layer.features.clone()  # (48, 32): one full block of 32 orthogonal rows, then 16 from a second block
    directions = w / w.norm(dim=1, keepdim=True)
    for block in (directions[:32], directions[32:]):
        torch.testing.assert_close(block @ block.T, torch.eye(len(block)), atol=1e-5, rtol=0)
    layer.train()
    x = torch.randn(1, 10, 64)
    layer(x)
    layer(x)
    torch.testing.assert_close(layer.features, w)
    layer(x)  # third call: redraw
    assert not torch.equal(layer.features, w)


def test_linformer_accepts_any_length_with_the_same_weights(data_dir):
    torch.manual_seed(0)
    layer = make_attention("linformer", 64, 4, k=32, seq_len=256)
    tokens = image_tokens(data_dir)  # 1024 tokens
    for n in (1024, 777, 256, 100):
        assert layer(tokens[:, :n]).shape == (1, n, 64)
    # at N = seq_len it is the paper's layer: softmax(s Q (E K)ᵀ) (F V)
    x = tokens[:, :256]
    q, k, v = layer.project_qkv(x)
    out = torch.softmax(layer.scale * q @ (layer.proj_k @ k).transpose(-1, -2), -1) @ (layer.proj_v @ v)
    torch.testing.assert_close(
        layer(x), layer.proj(out.transpose(1, 2).reshape(x.shape)), rtol=1e-4, atol=1e-5
    )


def test_sdpa_matches_explicit_weights_and_loads_timm_attention():
    timm_attention = pytest.importorskip("timm.layers").Attention
    torch.manual_seed(0)
    reference = timm_attention(32, num_heads=4, qkv_bias=True)
    layer = make_attention("sdpa", 32, 4)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
    weights = layer.attention_weights(x)
    assert weights.shape == (2, 4, 50, 50)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 50))


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_every_kind_replaces_the_attention_of_a_timm_block(kind):
    block = pytest.importorskip("timm.models.vision_transformer").Block(32, num_heads=4, qkv_bias=True)
    block.attn = make_attention(kind, 32, 4, **SMALL.get(kind, {}))
    x = torch.randn(2, 100, 32)
    assert block(x).shape == (2, 100, 32)
    if kind != "sdpa":
        with pytest.raises(ValueError, match="takes no attn_mask"):
            block(x, is_causal=True)


@pytest.mark.parametrize("kind", ["nystrom", "performer"])
def test_cpu_threads_only_change_speed_and_are_restored(kind):
    torch.manual_seed(0)
    one = make_attention(kind, 32, 4, **SMALL[kind])  # default cpu_threads=1
    default = make_attention(kind, 32, 4, **SMALL[kind], cpu_threads=None)
    default.load_state_dict(one.state_dict())
    x = torch.randn(2, 300, 32, requires_grad=True)
    threads = torch.get_num_threads()
    one(x).sum().backward()
    assert torch.get_num_threads() == threads
    grad_one, x.grad = x.grad, None
    default(x).sum().backward()
    torch.testing.assert_close(one(x), default(x))
    torch.testing.assert_close(grad_one, x.grad)
    with pytest.raises(ValueError, match="cpu_threads must be >= 1 or None"):
        make_attention(kind, 32, 4, cpu_threads=0)
