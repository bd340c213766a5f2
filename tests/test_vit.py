"""The ViT backbone: registry contract, shapes, position embeddings, cheap [CLS] attention, DINO masks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from napari_medssl.models import create_model, list_models
from napari_medssl.models.attention import mass_threshold_masks
from napari_medssl.models.layers.pos_embed import resize_pos_embed, sincos_2d
from napari_medssl.models.vit import VisionTransformer

FAMILIES = ("vit", "mae", "msmae")
# Shrinks paper-sized builders so every registered model runs forward/backward in a fraction of a second.
SHRINK = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
SHRINK_DEC = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def mammogram(data_dir: Path, size: tuple[int, int], name: str = "mdb005.png") -> torch.Tensor:
    """A real mini-MIAS mammogram as ``(1, 1, Y, X)`` in [0, 1], area-resized."""
    arr = np.asarray(Image.open(data_dir / "mammography_mias" / name), dtype=np.float32) / 255.0
    return F.interpolate(torch.from_numpy(arr)[None, None], size=size, mode="area")


def small_overrides(name: str) -> dict:
    if name.endswith("_tiny"):
        return {}
    return {**SHRINK, **(SHRINK_DEC if not name.startswith("vit_") else {})}


def registered() -> list[str]:
    return [n for fam in FAMILIES for n in list_models(fam)]


def test_families_registered():
    names = registered()
    for fam in FAMILIES:
        assert {f"{fam}_tiny"} <= set(names), names
    assert {"vit_small", "mae_base", "msmae_base"} <= set(names)


@pytest.mark.parametrize("name", registered())
def test_forward_backward_every_parameter_gets_gradient(name, data_dir):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **small_overrides(name))
    assert model.task == "classify" and model.spatial_dims == 2 and model.num_classes == 3
    assert model.in_chans == 1 and model.config["name"] == name
    x = mammogram(data_dir, model.input_size).repeat(2, 1, 1, 1)
    y = torch.tensor([0, 2])
    model.train()
    logits = model(x)
    assert logits.shape == (2, 3)
    loss = F.cross_entropy(logits, y)
    if hasattr(model, "pretrain_loss"):
        if hasattr(model, "on_train_step"):
            model.on_train_step(1, 1)  # MSMAE: guided phase
        parts = model.pretrain_loss(x, y)
        assert parts["loss"].ndim == 0
        loss = loss + parts["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def test_paper_sizes():
    with torch.device("meta"):
        vit_s = create_model("vit_small")
        mae_b = create_model("mae_base")
        msmae_b = create_model("msmae_base")
    enc = sum(p.numel() for n, p in mae_b.named_parameters() if not n.startswith(("decoder", "mask_token")))
    assert 85e6 < enc < 87e6  # ViT-B/16 encoder
    assert (mae_b.embed_dim, mae_b.depth, mae_b.patch_size, mae_b.input_size) == (768, 12, 16, (224, 224))
    assert mae_b.decoder_embed.out_features == 512 and len(mae_b.decoder_blocks) == 8
    assert len(msmae_b.decoder_blocks) == 8
    assert (vit_s.embed_dim, vit_s.num_heads, vit_s.depth) == (384, 6, 12)


def test_protocol_attributes_and_shapes():
    model = create_model("vit_tiny", in_chans=3, img_size=(64, 96))
    assert model.task == "pretrain" and model.num_classes == 0
    assert model.input_size == (64, 96) and model.patch_size == 8
    assert (model.embed_dim, model.num_heads) == (192, 3)
    x = torch.rand(2, 3, 64, 96)
    assert model.grid_size(x) == (8, 12)
    assert model.prepare_tokens(x).shape == (2, 97, 192)
    feats = model.forward_features(x)
    assert feats.shape == (2, 97, 192)
    assert model(x).shape == (2, 192)  # no head: pooled features
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])


def test_timm_compatible_parameter_names():
    keys = set(create_model("vit_tiny", num_classes=2).state_dict())
    for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.5.attn.qkv.weight", "norm.weight"):
        assert k in keys
    assert "head.weight" in keys


def test_other_sizes_interpolate_and_pad():
    model = create_model("vit_tiny").eval()
    x = torch.rand(1, 1, 48, 80)
    assert model.forward_features(x).shape == (1, 1 + 6 * 10, 192)
    odd = torch.rand(1, 1, 50, 70)  # not multiples of 8: zero-padded to 56 × 72
    assert model.grid_size(odd) == (7, 9)
    padded = F.pad(odd, (0, 2, 0, 6))
    assert torch.allclose(model.forward_features(odd), model.forward_features(padded))


def test_sincos_table_and_resize():
    table = sincos_2d(16, (4, 6), cls_token=True)
    assert table.shape == (25, 16)
    assert torch.equal(table[0], torch.zeros(16))
    assert torch.allclose(table[1:].pow(2).sum(-1), torch.full((24,), 8.0))  # 8 (sin, cos) pairs
    patches = table[1:][None]
    assert resize_pos_embed(patches, (4, 6), (4, 6)) is patches
    assert resize_pos_embed(patches, (4, 6), (8, 3)).shape == (1, 24, 16)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(global_pool="max")
    with pytest.raises(ValueError, match="img_size"):
        VisionTransformer(img_size=(64, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, Y, X\)"):
        VisionTransformer()(torch.rand(1, 3, 64, 64))


def explicit_cls_attention(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The full softmax(QKᵀ/√d) of the last block on a copy of the model, [CLS] row, patches only."""
    ref = copy.deepcopy(model)
    captured = {}

    class Capture(torch.nn.Module):
        def forward(self, attn):  # timm's explicit path applies attn_drop to softmax(QKᵀ/√d)
            captured["attn"] = attn
            return attn

    last = ref.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop = Capture()
    with torch.no_grad():
        ref.forward_features(x)
    full = captured["attn"]  # (B, H, 1 + N, 1 + N)
    assert full.shape[-1] == full.shape[-2] == 1 + x.shape[-2] // 8 * (x.shape[-1] // 8)
    gh, gw = model.grid_size(x)
    return full[:, :, 0, 1:].reshape(x.shape[0], -1, gh, gw)


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_cls_attention_equals_explicit_on_real_image(size, data_dir):
    torch.manual_seed(0)
    model = create_model("vit_tiny").eval()
    x = torch.cat([mammogram(data_dir, size, "mdb005.png"), mammogram(data_dir, size, "mdb010.png")])
    cheap = model.cls_attention(x)
    assert cheap.shape == (2, 3, size[0] // 8, size[1] // 8)
    ref = explicit_cls_attention(model, x)
    assert torch.allclose(cheap, ref, atol=1e-6, rtol=1e-5)
    assert (cheap.flatten(2).sum(-1) < 1).all()  # the [CLS]→[CLS] share is dropped, as in DINO


def test_cls_attention_keeps_fused_kernel_and_costs_less(monkeypatch):
    model = create_model("vit_tiny").eval()
    assert all(b.attn.fused_attn for b in model.blocks)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    x = torch.rand(1, 1, 128, 128)
    model.cls_attention(x)
    assert len(calls) == model.depth - 1  # every block but the last ran the fused kernel
    assert all(b.attn.fused_attn for b in model.blocks)
    with FlopCounterMode(display=False) as cheap:
        model.cls_attention(x)
    with FlopCounterMode(display=False) as full:
        model.forward_features(x)
    assert cheap.get_total_flops() < full.get_total_flops()


def dino_reference_masks(attn: np.ndarray, threshold: float) -> np.ndarray:
    """DINO's visualize_attention.py recipe for one image: (H, N) → (H, N) bool."""
    out = np.zeros_like(attn, dtype=bool)
    for h, a in enumerate(attn):
        idx = np.argsort(a)
        val = a[idx] / a.sum()
        cum = np.cumsum(val)
        out[h, idx] = cum > (1 - threshold)
    return out


def test_mass_threshold_masks_match_dino_recipe(data_dir):
    torch.manual_seed(0)
    model = create_model("vit_tiny").eval()
    attn = model.cls_attention(mammogram(data_dir, (64, 64)))
    masks = mass_threshold_masks(attn, 0.6)
    assert masks.shape == attn.shape and masks.dtype == torch.bool
    ref = dino_reference_masks(attn[0].flatten(1).double().numpy(), 0.6)
    assert np.array_equal(masks[0].flatten(1).numpy(), ref)
    flat = attn[0].flatten(1)
    for h in range(flat.shape[0]):
        kept = flat[h][masks[0, h].flatten()]
        share = kept.sum() / flat[h].sum()
        assert share >= 0.6 - 1e-6  # holds the mass ...
        assert (kept.sum() - kept.min()) / flat[h].sum() < 0.6  # ... and is the smallest such set
    with pytest.raises(ValueError, match="threshold"):
        mass_threshold_masks(attn, 1.5)
