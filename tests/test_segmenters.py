"""The four segmenter families (unet, emfformer, mim, dinocnn): protocol, shapes, gradients, EMF-former parts."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from napari_medssl.models import create_model, load_model, save_model
from napari_medssl.models.emf_former import (
    DSPConv,
    SerialMultiHeadAttention,
    VectorAggregationAttention,
    channel_shuffle,
    pixel_shuffle,
)
from napari_medssl.transforms import normalize_intensity

# Narrower than the registered tiny sizes where 3D would be slow on 2 cores; the code paths are the same.
LIGHT = {
    "unet_tiny": {"base_width": 8},
    "mim_tiny": {"conv_dims": (8, 16, 32), "embed_dim": 48, "depth": 2, "num_heads": 2, "decoder_dim": 48},
}
# (name, spatial_dims override or None, input shape): odd hippocampus sizes, 2D slice and 3D volume
CASES = [
    ("unet_tiny", 2, (2, 1, 35, 51)),
    ("unet_tiny", 3, (1, 1, 35, 51, 35)),
    ("emfformer_tiny", 2, (2, 1, 35, 51)),
    ("emfformer_tiny", 3, (1, 1, 35, 51, 35)),
    ("mim_tiny", None, (1, 1, 35, 51, 35)),
    ("dinocnn_tiny", None, (2, 1, 35, 51)),
]


def _build(name: str, dims: int | None, light: bool = False, **kw):
    torch.manual_seed(0)
    if light and dims != 2:
        kw = {**LIGHT.get(name, {}), **kw}
    return create_model(name, spatial_dims=dims, **kw) if dims else create_model(name, **kw)


@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=[f"{c[0]}-{len(c[2]) - 2}d" for c in CASES])
def test_forward_backward_shapes_and_gradients(name, dims, shape):
    model = _build(name, dims, light=True).train()
    assert model.task == "segment" and model.input_size is None
    assert model.spatial_dims == len(shape) - 2 and model.in_chans == 1 and model.num_classes == 3
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    logits = model(x)
    assert logits.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, (x[:, 0] * 3).long().clamp(max=2))
    if hasattr(model, "pretrain_loss"):  # MiM: the reconstruction decoder and predictor train in pre-training
        loss = loss + model.pretrain_loss(x, generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad
    assert sum(float(p.grad.abs().sum()) for _, p in trainable) > 0


@pytest.mark.parametrize("name", ["unet_tiny", "emfformer_tiny"])
def test_padding_is_cropped_back_exactly(name):
    """A sized-to-multiple input gives the same logits as the same image padded by the caller, cropped."""
    model = _build(name, 2).eval()
    x = torch.rand(1, 1, 35, 51, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model(x)
        b = model(torch.nn.functional.pad(x, (0, 13, 0, 13)))[..., :35, :51]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dims", [2, 3])
def test_emfformer_decoder_options_subpixel_and_detail_blocks(dims):
    """The sub-pixel term and the detail blocks start as no-ops (same logits as without them) and train."""
    shape = (1, 1, *(35, 51, 35)[-dims:])
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(5))
    sub = _build("emfformer_tiny", dims, subpixel=True, detail_blocks=2).eval()
    plain = _build("emfformer_tiny", dims).eval()
    new = ("head_sub", "detail_blocks")
    plain.load_state_dict({k: v for k, v in sub.state_dict().items() if not k.startswith(new)})
    with torch.no_grad():
        torch.testing.assert_close(sub(x), plain(x))
    sub.train()
    sub(x).square().mean().backward()
    assert sub.head_sub.weight.grad.abs().sum() > 0
    assert all(b.pw2.weight.grad.abs().sum() > 0 for b in sub.detail_blocks)
    assert sub.head_sub.out_channels == 3 * 2**dims and len(sub.detail_blocks) == 2


def test_pixel_shuffle_puts_channel_j_at_sub_voxel_j():
    for dims in (2, 3):
        k, n = 2, 2**dims
        x = torch.arange(k * n, dtype=torch.float32).view(1, k * n, *([1] * dims)).repeat(1, 1, *([3] * dims))
        y = pixel_shuffle(x, dims)
        assert y.shape == (1, k, *([6] * dims))
        for cls in range(k):  # the first 2×…×2 block of class cls holds its channels in row-major order
            block = y[0, cls][(slice(0, 2),) * dims].flatten()
            assert block.tolist() == list(range(cls * n, (cls + 1) * n))


@pytest.mark.parametrize("dims", [2, 3])
def test_emfformer_full_resolution_head_runs_on_the_input_extent_with_the_padded_grids_numbers(dims):
    """The full-resolution maps cover the input plus one voxel, not the grid padded to 16: same logits (to rounding)."""
    model = _build("emfformer_tiny", dims).eval()
    shape = (35, 51, 35)[-dims:]
    x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    seen = []
    model.head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[2:])))
    with torch.no_grad():
        a = model(x)
        b = model(torch.nn.functional.pad(x, [p for s in reversed(shape) for p in (0, -s % 16)]))
    assert seen == [tuple(s + 1 for s in shape), tuple(s + (-s % 16) for s in shape)]
    torch.testing.assert_close(a, b[(..., *(slice(0, s) for s in shape))], rtol=1e-5, atol=1e-5)


def test_real_hippocampus_volume_and_slices(data_dir):
    path = sorted((data_dir / "hippocampus" / "imagesTr").glob("*.nii.gz"))[1]
    volume = normalize_intensity(
        np.asarray(nib.load(path).dataobj)
    )  # (34, 52, 35): odd, not a multiple of 16
    x3 = torch.from_numpy(volume)[None, None]
    x2 = torch.from_numpy(np.moveaxis(volume, 2, 0).copy())[:4, None]  # four 2D slices
    with torch.no_grad():
        for name, dims, x in (("unet_tiny", 3, x3), ("emfformer_tiny", 3, x3), ("mim_tiny", None, x3)):
            out = _build(name, dims, light=True).eval()(x)
            assert out.shape == (1, 3, *volume.shape) and torch.isfinite(out).all(), name
        for name, dims in (("emfformer_tiny", 2), ("dinocnn_tiny", None)):
            out = _build(name, dims).eval()(x2)
            assert out.shape == (4, 3, *volume.shape[:2]) and torch.isfinite(out).all(), name


def test_unet_norm_choice_and_bad_values():
    assert isinstance(create_model("unet_tiny", norm="batch").encoders[0][1], torch.nn.BatchNorm2d)
    assert isinstance(create_model("unet_tiny", spatial_dims=3).encoders[0][1], torch.nn.InstanceNorm3d)
    assert create_model("unet_small").encoders[0][0].out_channels == 32
    assert create_model("unet_base").encoders[0][0].out_channels == 64
    with pytest.raises(ValueError, match="norm"):
        create_model("unet_tiny", norm="layer")
    with pytest.raises(ValueError, match="spatial_dims"):
        create_model("emfformer_tiny", spatial_dims=4)
    with pytest.raises(ValueError, match="spatial_dims must be 3"):
        create_model("mim_tiny", spatial_dims=2)
    with pytest.raises(ValueError, match="input channel"):
        create_model("unet_tiny")(torch.zeros(1, 2, 16, 16))


def test_checkpoint_round_trip(tmp_path):
    model = _build("emfformer_tiny", 3).eval()
    path = save_model(model, tmp_path / "emf.safetensors")
    again = load_model(path).eval()
    x = torch.rand(1, 1, 17, 20, 19)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    dsp = DSPConv(8, 16, stride=2, groups=2)
    assert dsp.depthwise.groups == 8 and dsp.pointwise.groups == 2
    assert dsp(torch.rand(2, 8, 13, 9)).shape == (2, 16, 7, 5)


def test_serial_heads_see_the_previous_head_and_skipped_heads_pass_through():
    attn = SerialMultiHeadAttention(dim=32, num_heads=4)  # heads 1 and 3 skipped by default
    assert attn.skip == [1, 3] and sorted(attn.heads) == ["0", "2"]
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(32))
        attn.proj.bias.zero_()
    x = torch.randn(2, 10, 32)
    out = attn(x)
    d = 8
    head0 = attn.heads["0"](x[..., :d])
    torch.testing.assert_close(out[..., :d], head0)
    torch.testing.assert_close(out[..., d : 2 * d], x[..., d : 2 * d] + head0)  # skipped: input + previous
    torch.testing.assert_close(
        out[..., 2 * d : 3 * d], attn.heads["2"](x[..., 2 * d : 3 * d] + out[..., d : 2 * d])
    )
    # serial: perturbing head 0's channels changes every later head's output
    x2 = x.clone()
    x2[..., :d] += 1.0
    changed = (attn(x2) - out).abs().amax(dim=(0, 1)).reshape(4, d).amax(dim=1)
    assert (changed > 1e-4).all()
    with pytest.raises(ValueError, match="skip_heads"):
        SerialMultiHeadAttention(32, 4, skip_heads=(0,))


def _saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (parameters excluded), counting each storage once."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return total


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_vaa_memory_is_linear_in_tokens_and_never_n_by_n():
    torch.manual_seed(0)
    d = 16
    vaa = VectorAggregationAttention(d)
    sizes = (1024, 2048, 4096)
    saved = [_saved_bytes(vaa, torch.randn(1, n, d, requires_grad=True)) for n in sizes]
    # exactly linear: equal increments per added token, and a negligible constant part
    assert saved[2] - saved[1] == 2 * (saved[1] - saved[0])
    assert saved[0] == pytest.approx(saved[1] / 2, rel=0.02)
    n = 4096
    for module in (vaa, SerialMultiHeadAttention(4 * d, 4)):
        x = torch.randn(1, n, module.qkv.in_features if hasattr(module, "qkv") else 4 * d, requires_grad=True)
        with _LargestTensor() as probe:
            module(x).sum().backward()
        assert probe.largest <= 3 * n * x.shape[-1], probe.largest  # the qkv projection, never N×N (16.7 M)

    def softmax_attention(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ x

    with _LargestTensor() as probe:  # the probe does see an N×N matrix when there is one
        softmax_attention(torch.randn(1, n, d))
    assert probe.largest >= n * n


def test_emfformer_is_cheaper_than_unet():
    """FLOPs and saved activations of emfformer_tiny vs unet_tiny on a 35×51 slice (a floor; see benchmarks)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops, saved = {}, {}
    for name in ("unet_tiny", "emfformer_tiny"):
        with torch.device("meta"):  # FLOPs from shapes alone
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                _build(name, 2)(torch.zeros(1, 1, 35, 51))
        flops[name] = counter.get_total_flops()
        saved[name] = _saved_bytes(_build(name, 2), torch.rand(1, 1, 35, 51))
    assert flops["emfformer_tiny"] <= flops["unet_tiny"] / 3
    assert saved["emfformer_tiny"] <= saved["unet_tiny"] / 2


def test_dinocnn_uses_the_overlay_attention_maps_of_a_frozen_backbone(tmp_path):
    from napari_medssl.models.attention import attention_maps

    torch.manual_seed(0)
    dino = create_model("dino_tiny")
    path = save_model(dino, tmp_path / "dino.safetensors")
    model = create_model("dinocnn_tiny", dino_checkpoint=str(path)).train()
    for key, value in dino.backbone.state_dict().items():  # the checkpoint's teacher ViT is the backbone
        torch.testing.assert_close(model.dino.state_dict()[key], value)
    assert not model.dino.training and not any(p.requires_grad for p in model.dino.parameters())
    x = torch.rand(2, 1, 35, 51)
    resized = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.interpolate(
        attention_maps(dino, resized, upsample=True), size=(35, 51), mode="bilinear", align_corners=False
    )
    maps = model.attention(x)
    assert maps.shape == (2, dino.backbone.num_heads, 35, 51)
    torch.testing.assert_close(maps, expected)
    assert maps.amax() > maps.amin()  # real maps, not a constant
    with torch.no_grad():  # forward(x) computes exactly those maps itself
        torch.testing.assert_close(model.eval()(x), model(x, maps))
    with pytest.raises(FileNotFoundError, match="dino_checkpoint"):
        create_model("dinocnn_tiny", dino_checkpoint=str(tmp_path / "missing.safetensors"))


# stage 0's Mix-FFN alone stores three (B, 2E, N) hidden maps (E = 32, N = 12×16); the head stores at least the
# joined logits + image and its depthwise output, (B, K + C, 36, 52) each, over the input's extent
RECOMPUTED = {"recompute_ffn": 3 * 2 * 64 * 12 * 16 * 4, "recompute_head": 2 * 2 * 4 * 36 * 52 * 4}


@pytest.mark.parametrize("flag", sorted(RECOMPUTED))
def test_emfformer_recomputation_same_gradients_less_saved_memory(flag):
    """``recompute_ffn``/``recompute_head`` (defaults) give the same outputs and gradients, keep fewer bytes."""
    x = torch.rand(2, 1, 35, 51)
    models, grads, saved = [], [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = _build("emfformer_tiny", 2, subpixel=True, detail_blocks=1, **{flag: recompute}).train()
        torch.nn.init.normal_(model.head_sub.weight, std=0.1)  # a trained-looking sub-pixel term and block
        torch.nn.init.normal_(model.detail_blocks[0].pw2.weight, std=0.1)
        xr = x.clone().requires_grad_()
        model(xr).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [xr.grad])
        saved.append(_saved_bytes(model, x))
        models.append(model)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert saved[0] - saved[1] >= RECOMPUTED[flag], (saved, RECOMPUTED[flag])
    models[1].eval()
    with torch.no_grad():
        torch.testing.assert_close(models[0].eval()(x), models[1](x))
