"""DINO: projection head, multi-crop views, loss, EMA teacher, attention maps and official checkpoints."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT

from napari_medssl.models import create_model, dino, load_model, save_model
from napari_medssl.models.attention import attention_maps
from napari_medssl.models.dino import (
    DINO,
    dino_loss,
    multi_crop,
    random_resized_crops,
)
from napari_medssl.models.dino_import import load_dino_checkpoint
from napari_medssl.models.layers.pos_embed import resize_pos_embed
from napari_medssl.models.vit import VisionTransformer


def mammograms(data_dir: Path, n: int, size: int) -> torch.Tensor:
    """``n`` real mini-MIAS mammograms, area-downsampled to ``size``², in [0, 1]: ``(n, 1, size, size)``."""
    files = sorted((data_dir / "mammography_mias").glob("mdb*.png"))[:n]
    imgs = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
    x = torch.from_numpy(np.stack(imgs))[:, None]
    return F.interpolate(x, size=(size, size), mode="area")


@pytest.fixture(scope="module")
def images(data_dir: Path) -> torch.Tensor:
    return mammograms(data_dir, 4, 64)


@pytest.fixture(scope="module")
def tiny_dino() -> DINO:
    torch.manual_seed(0)
    return create_model("dino_tiny", depth=2, out_dim=256, hidden_dim=128, bottleneck_dim=64, n_local_crops=2)


def test_registered_sizes() -> None:
    assert dino._SMALL["depth"] == 12 and dino._SMALL["out_dim"] == 65536
    small = create_model("dino_small", out_dim=256, depth=1)
    assert small.backbone.num_heads == 6 and small.backbone.embed_dim == 384 and small.patch_size == 16
    assert small.input_size == (224, 224) and small.local_size == (96, 96) and small.n_local_crops == 8
    tiny = create_model("dino_tiny")
    assert (tiny.task, tiny.spatial_dims, tiny.in_chans, tiny.num_classes) == ("pretrain", 2, 1, 0)
    assert tiny.input_size == (64, 64) and tiny.backbone is tiny.teacher


def test_pretrain_loss_backward_every_trained_parameter(tiny_dino: DINO, images: torch.Tensor) -> None:
    model = tiny_dino
    model.zero_grad(set_to_none=True)
    out = model.pretrain_loss(images, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert 0 < out["teacher_entropy"] <= np.log(256) + 1e-4
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith(("teacher.", "teacher_head.")):
            assert not p.requires_grad and p.grad is None, name
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("teacher")}
    assert frozen == {"student_head.last_layer.parametrizations.weight.original0"}  # norm_last_layer gain


def test_batchnorm_head_keeps_alike_images_apart(data_dir: Path) -> None:
    """``head_use_bn``: BatchNorm in both heads, the teacher's head on batch statistics; on 16 real mammograms a
    fresh model's centred teacher output is then far from uniform (without it: almost uniform)."""
    x = mammograms(data_dir, 16, 64)
    entropy = {}
    for bn in (False, True):
        torch.manual_seed(0)
        model = create_model("dino_tiny", depth=2, out_dim=256, head_use_bn=bn).train()
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.teacher_head.modules()) == bn
        assert model.teacher_head.training == bn and not model.teacher.training
        with torch.no_grad():
            t = model.teacher_head(model.teacher.forward_head(model.teacher.forward_features(x)))
            q = torch.softmax((t - t.mean(0)) / 0.04, -1)  # centred on this batch, sharpened
            entropy[bn] = float(-(q * q.clamp_min(1e-12).log()).sum(-1).mean())
        out = model.pretrain_loss(x, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
        if bn:
            model.on_train_step(1, 10)  # the EMA reaches the BatchNorm affine parameters too
    assert entropy[False] > 0.97 * np.log(256) and entropy[True] < 0.85 * np.log(256), entropy


def test_teacher_is_ema_of_student(tiny_dino: DINO, images: torch.Tensor) -> None:
    model = tiny_dino
    model.train()
    assert model.student.training and not model.teacher.training and not model.teacher_head.training
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt.zero_grad()
    model.pretrain_loss(images, generator=torch.Generator().manual_seed(2))["loss"].backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    model.on_train_step(5, 10)
    m = model.momentum
    assert m == pytest.approx(1 - (1 - 0.996) * 0.5)  # cosine half-way
    changed = 0
    for name, p in model.teacher.named_parameters():
        expected = m * before[name] + (1 - m) * student[name].detach()
        torch.testing.assert_close(p.detach(), expected)
        changed += int(not torch.equal(p.detach(), before[name]))
    assert changed > 0
    assert model.teacher_temp == pytest.approx(0.07)  # warm-up (30 %) is over at step 5 of 10
    model.on_train_step(10, 10)
    assert model.momentum == pytest.approx(1.0)


def test_teacher_temperature_schedule() -> None:
    model = DINO(depth=1, out_dim=64, hidden_dim=32, bottleneck_dim=16, warmup_teacher_frac=0.5)
    assert model.teacher_temp == pytest.approx(0.04)
    model.on_train_step(25, 100)
    assert model.teacher_temp == pytest.approx(0.055)
    model.on_train_step(60, 100)
    assert model.teacher_temp == pytest.approx(0.07)


def test_center_is_ema_of_teacher_outputs(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = DINO(depth=1, out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local_crops=1)
    gen_seed = 3
    views = multi_crop(images, 64, model.local_size, 1, generator=torch.Generator().manual_seed(gen_seed))
    with torch.no_grad():
        t = model.teacher_head(model.teacher(torch.cat(views[:2])))
    model.eval()
    model.pretrain_loss(images, generator=torch.Generator().manual_seed(gen_seed))
    assert torch.count_nonzero(model.center) == 0  # eval mode: centre untouched
    model.train()
    model.pretrain_loss(images, generator=torch.Generator().manual_seed(gen_seed))
    torch.testing.assert_close(model.center, 0.1 * t.mean(dim=0, keepdim=True))


def test_dino_loss_equals_teacher_entropy_when_student_matches() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2 * 3, 10, generator=g)
    center = torch.randn(1, 10, generator=g)
    t0, t1 = teacher.chunk(2)
    # Student crop v predicts exactly the teacher's distribution of the other global crop.
    student = torch.cat([t1 - center, t0 - center]) * 0.1 / 0.04
    loss = dino_loss(student, teacher, center, n_crops=2, student_temp=0.1, teacher_temp=0.04)
    q = F.softmax((teacher - center) / 0.04, dim=-1)
    entropy = -(q * q.log()).sum(-1).mean()
    torch.testing.assert_close(loss, entropy)
    worse = dino_loss(student.flip(0), teacher, center, n_crops=2, student_temp=0.1, teacher_temp=0.04)
    assert worse > loss


def test_multi_crop_views(images: torch.Tensor) -> None:
    views = multi_crop(images, 64, 24, 3, generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(4, 1, 64, 64)] * 2 + [(4, 1, 24, 24)] * 3
    wide = multi_crop(images, (48, 80), (16, 32), 1, generator=torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in wide] == [(4, 1, 48, 80)] * 2 + [(4, 1, 16, 32)]
    assert all(v.min() >= 0 and v.max() <= 1 and v.dtype == images.dtype for v in views)
    again = multi_crop(images, 64, 24, 3, generator=torch.Generator().manual_seed(0))
    other = multi_crop(images, 64, 24, 3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not torch.allclose(views[0], other[0])
    assert not torch.allclose(views[0], views[1])  # the two global views differ


def test_full_scale_crop_is_the_image_or_its_mirror(images: torch.Tensor) -> None:
    crops = random_resized_crops(images, 64, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator())
    for crop, img in zip(crops, images):
        close = torch.allclose(crop, img, atol=1e-5) or torch.allclose(crop, img.flip(-1), atol=1e-5)
        assert close


def test_dino_loss_falls_on_fixed_real_crops(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = DINO(depth=2, out_dim=256, hidden_dim=128, bottleneck_dim=64, n_local_crops=2, drop_path_rate=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for step in range(1, 6):
        loss = model.pretrain_loss(images[:2], generator=torch.Generator().manual_seed(0))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_train_step(step, 100)
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


def test_classify_mode_trains_the_teacher(images: torch.Tensor) -> None:
    model = create_model("dino_tiny", num_classes=3, depth=2, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    assert model.task == "classify" and model.num_classes == 3
    model.train()
    assert model.teacher.training
    logits = model(images)
    assert logits.shape == (4, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad, name
    before = [p.detach().clone() for p in model.teacher.parameters()]
    model.on_train_step(1, 10)  # no EMA when fine-tuning
    assert all(torch.equal(a, b) for a, b in zip(before, model.teacher.parameters()))
    with pytest.raises(ValueError, match="num_classes=0"):
        model.pretrain_loss(images)


def test_save_and_load_round_trip(tmp_path: Path, images: torch.Tensor) -> None:
    model = create_model("dino_tiny", depth=1, out_dim=64, hidden_dim=32, bottleneck_dim=16).eval()
    path = save_model(model, tmp_path / "dino.safetensors")
    again = load_model(path).eval()
    torch.testing.assert_close(again(images), model(images))
    torch.testing.assert_close(again.center, model.center)


# -- attention maps -----------------------------------------------------------------------------------------
def test_attention_maps_are_the_upsampled_cls_attention(tiny_dino: DINO, data_dir: Path) -> None:
    x = mammograms(data_dir, 2, 80)[..., :60, :70]  # not a multiple of the patch size
    raw = attention_maps(tiny_dino, x, normalize=False)
    cls = tiny_dino.teacher.cls_attention(x)  # (B, H, 8, 9)
    assert cls.shape == (2, 3, 8, 9) and raw.shape == (2, 3, 60, 70)
    expected = cls.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)[..., :60, :70]
    torch.testing.assert_close(raw, expected)
    grid = attention_maps(tiny_dino, x, upsample=False, normalize=False)
    torch.testing.assert_close(grid, cls)
    norm = attention_maps(tiny_dino, x)
    assert torch.allclose(norm.amin(dim=(-2, -1)), torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(norm.amax(dim=(-2, -1)), torch.ones(2, 3), atol=1e-6)
    torch.testing.assert_close(attention_maps(tiny_dino.teacher, x), norm)  # a bare ViT works too
    assert tiny_dino.student.training  # the model's modes are restored
    with pytest.raises(ValueError, match="VisionTransformer"):
        attention_maps(torch.nn.Linear(2, 2), x)


# -- official checkpoints -----------------------------------------------------------------------------------
def timm_vit_small(depth: int = 2, img_size: int = 224) -> TimmViT:
    """A timm ViT-S/16 (DINO's ViT-S/16 layout: 384 wide, 6 heads, RGB), shortened to ``depth`` blocks."""
    torch.manual_seed(0)
    return TimmViT(img_size=img_size, patch_size=16, embed_dim=384, depth=depth, num_heads=6, num_classes=0)


def official_checkpoint(vit: TimmViT) -> dict:
    """The layout of DINO's ``*_full_checkpoint.pth``: prefixed student/teacher dicts with heads, plus args."""
    sd = vit.state_dict()
    head = {"head.mlp.0.weight": torch.randn(64, 384), "head.last_layer.weight_g": torch.ones(256, 1)}
    return {
        "student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()}
        | {f"module.{k}": v for k, v in head.items()},
        "teacher": {f"backbone.{k}": v for k, v in sd.items()} | head,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 65536)},
    }


def test_official_full_checkpoint_loads_into_dino(tmp_path: Path) -> None:
    ref = timm_vit_small()
    path = tmp_path / "dino_deitsmall16_full_checkpoint.pth"
    torch.save(official_checkpoint(ref), path)
    model = create_model("dino_small", depth=2, img_size=128, out_dim=64)
    report = load_dino_checkpoint(path, model)
    assert "head.mlp.0.weight" in report["dropped"]
    assert set(report["adapted"]) == {"pos_embed", "patch_embed.proj.weight"}
    sd = ref.state_dict()
    for vit in (model.teacher, model.student):  # teacher weights into both
        torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
        torch.testing.assert_close(
            vit.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True)
        )
        pos = resize_pos_embed(sd["pos_embed"][:, 1:], (14, 14), (8, 8))
        torch.testing.assert_close(vit.pos_embed, torch.cat([sd["pos_embed"][:, :1], pos], dim=1))


def test_official_weights_give_timm_features(tmp_path: Path) -> None:
    ref = timm_vit_small(img_size=64).eval()
    path = tmp_path / "teacher.safetensors"
    save_file(
        {f"teacher.module.backbone.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(path)
    )
    ours = VisionTransformer(
        img_size=64, patch_size=16, in_chans=3, embed_dim=384, depth=2, num_heads=6
    ).eval()
    report = load_dino_checkpoint(path, ours)
    assert report["adapted"] == [] and report["dropped"] == []
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-4)


def test_bare_backbone_file_and_errors(tmp_path: Path) -> None:
    ref = timm_vit_small()
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(ref.state_dict(), path)
    ours = create_model("vit_small", depth=2)
    load_dino_checkpoint(path, ours)
    torch.testing.assert_close(ours.norm.weight, ref.norm.weight)
    with pytest.raises(ValueError, match="patch_size=16"):
        load_dino_checkpoint(path, create_model("vit_small", depth=2, patch_size=8))
    with pytest.raises(ValueError, match="embed_dim=192"):
        load_dino_checkpoint(path, create_model("vit_tiny", depth=2, patch_size=16))
    with pytest.raises(ValueError, match="lacks"):
        load_dino_checkpoint(path, create_model("vit_small", depth=3))
    with pytest.raises(FileNotFoundError):
        load_dino_checkpoint(tmp_path / "missing.pth", ours)


class _Payload:
    """Unpickling this runs code: it would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    sd = timm_vit_small().state_dict()
    ours = create_model("vit_small", depth=2)
    torch_file = tmp_path / "evil.pth"
    torch.save({"teacher": sd, "payload": _Payload(marker)}, torch_file)
    plain_pickle = tmp_path / "evil.pkl"
    plain_pickle.write_bytes(pickle.dumps({"teacher": sd, "payload": _Payload(marker)}))
    for path in (torch_file, plain_pickle):
        with pytest.raises(ValueError, match="refused|not a safetensors or torch"):
            load_dino_checkpoint(path, ours)
    assert not marker.exists()
