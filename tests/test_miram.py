"""MIRAM: low-resolution encoder, two decoders (the high-resolution one with linear attention), fine-tuning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from napari_medssl.models import create_model, load_model, save_model
from napari_medssl.models.attention import attention_maps
from napari_medssl.models.layers import ATTENTION_KINDS
from napari_medssl.models.mae import patchify
from napari_medssl.models.miram import MIRAM

SMALL = dict(depth=2, decoder_depth=1, hr_decoder_depth=1)  # tiny config, fewer blocks: fast tests


def mammograms(data_dir: Path, n: int, size: int) -> torch.Tensor:
    """``n`` real mini-MIAS mammograms, area-downsampled to ``size``², in [0, 1]: ``(n, 1, size, size)``."""
    files = sorted((data_dir / "mammography_mias").glob("mdb*.png"))[:n]
    imgs = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
    return F.interpolate(torch.from_numpy(np.stack(imgs))[:, None], size=(size, size), mode="area")


@pytest.fixture(scope="module")
def images(data_dir: Path) -> torch.Tensor:
    return mammograms(data_dir, 3, 128)


def test_registered_sizes() -> None:
    tiny = create_model("miram_tiny", depth=1)
    assert (tiny.task, tiny.spatial_dims, tiny.in_chans, tiny.num_classes) == ("pretrain", 2, 1, 0)
    assert tiny.input_size == (128, 128) and tiny.low_size == (64, 64) and tiny.patch_size == 8
    assert tiny.encoder.embed_dim == 192 and tiny.hr_attention == "nystrom"
    base = create_model("miram_base", depth=1, decoder_depth=1, hr_decoder_depth=1)
    assert base.input_size == (448, 448) and base.low_size == (224, 224) and base.patch_size == 16
    assert base.encoder.embed_dim == 768 and base.backbone is base.encoder


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_every_hr_attention_kind_trains(kind: str, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model("miram_tiny", hr_attention=kind, **SMALL)
    assert all(isinstance(b.attn, ATTENTION_KINDS[kind]) for b in model.hr_decoder.blocks)
    assert all(isinstance(b.attn, ATTENTION_KINDS["sdpa"]) for b in model.decoder.blocks)
    out = model.pretrain_loss(images, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "loss_low", "loss_high"}
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(out["loss"].detach(), out["loss_low"] + out["loss_high"])
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_high_resolution_decoder_sees_four_times_the_tokens(images: torch.Tensor) -> None:
    model = create_model("miram_tiny", **SMALL)
    seen = {}

    def hook(name):
        return lambda module, args: seen.__setitem__(name, args[0].shape[1])

    model.decoder.blocks[0].register_forward_pre_hook(hook("low"))
    model.hr_decoder.blocks[0].register_forward_pre_hook(hook("high"))
    model.pretrain_loss(images)
    assert seen["low"] == 1 + 8 * 8 and seen["high"] == 1 + 16 * 16  # [CLS] + patch grid
    assert seen["high"] - 1 >= 4 * (seen["low"] - 1)


def test_masks_at_both_scales_agree(images: torch.Tensor) -> None:
    model = create_model("miram_tiny", **SMALL)
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    out = model.forward_pretrain(images, noise=noise)
    assert out["mask_low"].sum(1).tolist() == [48.0] * 3  # 0.75 of 64 patches, per image
    assert out["mask_high"].sum(1).tolist() == [192.0] * 3
    low_px = F.interpolate(out["mask_low"].reshape(3, 1, 8, 8), scale_factor=16)
    high_px = F.interpolate(out["mask_high"].reshape(3, 1, 16, 16), scale_factor=8)
    # A masked low-resolution patch hides the same pixels as its 2 × 2 high-resolution patches.
    assert torch.equal(low_px, high_px)
    again = model.forward_pretrain(images, noise=noise)
    assert torch.equal(again["mask_low"], out["mask_low"])
    torch.testing.assert_close(out["low"], F.avg_pool2d(images, 2))
    assert out["pred_low"].shape == (3, 64, 64) and out["pred_high"].shape == (3, 256, 64)


def test_loss_is_on_masked_patches_only(images: torch.Tensor) -> None:
    model = create_model("miram_tiny", **SMALL).eval()
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(1))
    out = model.forward_pretrain(images, noise=noise)
    target = patchify(out["high"], 8)
    expected = (((out["pred_high"] - target) ** 2).mean(-1) * out["mask_high"]).sum() / out["mask_high"].sum()
    loss = model.pretrain_loss(images, noise=noise)
    torch.testing.assert_close(loss["loss_high"], expected.detach())


def test_reconstruction_loss_falls_on_real_images(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = create_model("miram_tiny", **SMALL)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(4):
        loss = model.pretrain_loss(images[:2], generator=torch.Generator().manual_seed(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_classification_uses_the_low_resolution_view(images: torch.Tensor) -> None:
    model = create_model("miram_tiny", num_classes=2, **SMALL).eval()
    assert model.task == "classify" and model.num_classes == 2
    logits = model(images)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, model.encoder(F.avg_pool2d(images, 2)))
    F.cross_entropy(logits, torch.tensor([0, 1, 1])).backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert create_model("miram_tiny", **SMALL)(images).shape == (3, 192)  # pooled features without a head


def test_attention_maps_cover_the_input(images: torch.Tensor) -> None:
    model = create_model("miram_tiny", **SMALL)
    cls = model.cls_attention(images)
    assert cls.shape == (3, 3, 8, 8)
    maps = attention_maps(model, images, normalize=False)
    assert maps.shape == (3, 3, 128, 128)
    torch.testing.assert_close(maps, cls.repeat_interleave(16, -2).repeat_interleave(16, -1))


def test_reconstruct_for_display(images: torch.Tensor) -> None:
    model = create_model("miram_tiny", **SMALL)
    rec = model.reconstruct(images, seed=3)
    assert all(v.shape == images.shape for v in rec.values())
    visible = rec["mask"] == 0
    assert torch.equal(rec["pasted"][visible], images[visible])
    assert rec["mask"].mean().item() == pytest.approx(0.75)
    assert torch.equal(model.reconstruct(images, seed=3)["mask"], rec["mask"])


def test_save_and_load_round_trip(tmp_path: Path, images: torch.Tensor) -> None:
    model = create_model("miram_tiny", hr_attention="linformer", num_classes=2, **SMALL).eval()
    again = load_model(save_model(model, tmp_path / "miram.safetensors")).eval()
    assert again.hr_attention == "linformer"
    torch.testing.assert_close(again(images), model(images))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scale=1), "scale"),
        (dict(img_size=100), "multiple"),
        (dict(hr_attention="flash"), "nystrom"),
        (dict(mask_ratio=1.0), "mask_ratio"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MIRAM(depth=1, **kwargs)
