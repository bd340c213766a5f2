"""MAE and MSMAE: patchify, loss, reconstruction picture, MSMAE schedule and token budget, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from napari_medssl.models import create_model, load_model, read_checkpoint, save_model
from napari_medssl.models.mae import patchify, unpatchify

SMALL = dict(embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def mammograms(data_dir: Path, size: tuple[int, int], names=("mdb005.png", "mdb010.png")) -> torch.Tensor:
    """Real mini-MIAS mammograms as ``(B, 1, Y, X)`` in [0, 1], area-resized."""
    imgs = [
        np.asarray(Image.open(data_dir / "mammography_mias" / n), dtype=np.float32) / 255.0 for n in names
    ]
    return F.interpolate(torch.from_numpy(np.stack(imgs))[:, None], size=size, mode="area")


def test_patchify_roundtrip_any_channels_non_square():
    x = torch.rand(2, 3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(p[0, 1].reshape(8, 8, 3).permute(2, 0, 1), x[0, :, 0:8, 8:16])  # row-major patches
    assert torch.equal(unpatchify(p, 8, (2, 3)), x)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(torch.rand(1, 1, 10, 16), 8)


def test_loss_is_on_masked_patches_only_and_norm_pix(data_dir):
    torch.manual_seed(0)
    model = create_model("mae_tiny", **SMALL).eval()
    x = mammograms(data_dir, (64, 64))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(0))
    latent, mask, ids_keep, ids_mask = model.forward_encoder(x, 0.75, noise=noise)
    assert latent.shape == (2, 1 + 16, 64) and mask.sum() == 2 * 48
    assert torch.equal(mask.gather(1, ids_mask), torch.ones(2, 48))
    target = model.patch_targets(x).gather(1, ids_mask[..., None].expand(-1, -1, 64))
    assert model.forward_loss(x, target, ids_mask) == 0  # perfect masked prediction: zero loss
    model.norm_pix_loss = True
    t = model.patch_targets(x)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 64), atol=1e-4)
    raw = model.patchify(x)
    textured = raw.var(-1) > 1e-3  # patches with texture get unit spread; flat ones stay near 0
    assert textured.any() and torch.allclose(t.std(-1)[textured], torch.ones(int(textured.sum())), atol=0.01)
    assert torch.allclose(
        t * (raw.var(-1, keepdim=True) + 1e-6).sqrt() + raw.mean(-1, keepdim=True), raw, atol=1e-5
    )


def test_reconstruct_picture(data_dir):
    torch.manual_seed(0)
    model = create_model("mae_tiny", **SMALL, img_size=(64, 96))
    x = mammograms(data_dir, (60, 90))  # not patch multiples: padded inside, cropped back
    out = model.reconstruct(x, mask_ratio=0.75, seed=1)
    assert out["reconstruction"].shape == x.shape and out["pasted"].shape == x.shape
    assert out["mask"].shape == (2, 1, 60, 90)
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    full = model.reconstruct(mammograms(data_dir, (64, 96)), seed=1)["mask"]
    assert full.mean() == 0.75  # exact: 72 of 96 patches
    visible = out["mask"].expand_as(x) == 0
    assert torch.equal(out["pasted"][visible], x[visible])
    assert torch.equal(out["pasted"][~visible], out["reconstruction"][~visible])
    assert torch.equal(model.reconstruct(x, seed=1)["mask"], out["mask"])
    assert not torch.equal(model.reconstruct(x, seed=2)["mask"], out["mask"])
    assert model.training  # the train/eval mode is restored


def test_mae_learns_real_images(data_dir):
    torch.manual_seed(0)
    model = create_model("mae_tiny", **SMALL)
    x = mammograms(data_dir, (64, 64), ("mdb005.png", "mdb010.png", "mdb012.png", "mdb021.png"))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = model.pretrain_loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_mae_fine_tune_forward_is_classification():
    model = create_model("mae_tiny", num_classes=4, **SMALL).eval()
    x = torch.rand(3, 1, 64, 64)
    assert model.task == "classify"
    assert torch.equal(model(x), model.forward_head(model.forward_features(x)))
    assert model(x).shape == (3, 4)


def test_msmae_schedule_and_refresh(data_dir):
    torch.manual_seed(0)
    model = create_model("msmae_tiny", num_classes=2, **SMALL)
    x = mammograms(data_dir, (64, 64))
    y = torch.tensor([0, 1])
    assert model.masking == "random"
    model.on_train_step(39, 100)
    assert model.masking == "random"  # first 40 %: random masking 0.75
    model.on_train_step(40, 100)
    assert model.masking == "guided" and model.refresh_due
    out = model.pretrain_loss(x, y)
    assert set(out) >= {"loss", "recon", "cls"}
    assert torch.allclose(out["loss"], out["recon"] + 0.1 * out["cls"])
    assert not model.refresh_due  # the prior was refreshed from this batch's own attention
    expected = model.own_weights(x).mean(0)
    assert torch.allclose(model.attn_prior[0, 0], expected, atol=1e-6)
    model.on_train_step(41, 100)
    assert not model.refresh_due  # refresh every 10 % of training: next at step 50
    model.on_train_step(50, 100)
    assert model.refresh_due
    no_label = model.pretrain_loss(x)
    assert no_label["cls"] == 0 and torch.equal(no_label["loss"], no_label["recon"] + 0)


def test_msmae_image_guide_uses_each_batch_own_attention(data_dir):
    torch.manual_seed(0)
    model = create_model("msmae_tiny", guide="image", **SMALL)
    x = mammograms(data_dir, (64, 64))
    own = model.own_weights(x).flatten(1)
    assert torch.equal(model.guide_weights(x), own)
    assert torch.equal(model.attn_prior, torch.ones(1, 1, 8, 8))  # the prior is not used in this mode
    model.on_train_step(50, 100)
    assert model.pretrain_loss(x)["loss"].isfinite()
    with pytest.raises(ValueError, match="guide"):
        create_model("msmae_tiny", guide="mean")


def test_msmae_weights_argument_guides_the_mask(data_dir):
    torch.manual_seed(0)
    model = create_model("msmae_tiny", **SMALL)
    x = mammograms(data_dir, (64, 64))
    weights = torch.zeros(2, 8, 8)
    weights[:, :4] = 1.0  # only the top half may be masked or thrown (48 drawn, 32 positive weights ...)
    enc_inputs = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: enc_inputs.append(a[0].shape))
    latent, parts = model.encode_guided(x, weights, generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert enc_inputs == [(2, 1 + 16, 64)]
    mask_rows = parts["ids_mask"] // 8
    assert (mask_rows < 4).all()  # the 28 masked patches all come from the weighted half
    assert model.pretrain_loss(x, weights=weights)["loss"].isfinite()


def test_msmae_fine_tune_uses_quarter_of_tokens_and_flops(data_dir):
    torch.manual_seed(0)
    model = create_model("msmae_tiny", num_classes=3)
    x = mammograms(data_dir, (64, 64))
    model.train()
    model(x)  # first call refreshes the attention prior
    seen = []
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with FlopCounterMode(display=False) as masked:
        logits = model(x)
    model.eval()
    with FlopCounterMode(display=False) as full:
        eval_logits = model(x)
    hook.remove()
    assert torch.allclose(eval_logits, model.forward_head(model.forward_features(x)))
    assert logits.shape == (2, 3)
    assert seen == [1 + 16, 1 + 64]  # train: [CLS] + 25 % of 64 patches; eval: all tokens
    ratio = masked.get_total_flops() / full.get_total_flops()
    assert ratio <= 0.30, ratio


def test_msmae_masking_pattern(data_dir):
    model = create_model("msmae_tiny", **SMALL)
    x = mammograms(data_dir, (64, 64))
    weights, labels = model.masking_pattern(x, seed=3)
    assert weights.shape == labels.shape == (2, 8, 8)
    assert weights.min() >= 0 and weights.max() <= 1
    counts = [(labels == v).sum((1, 2)).tolist() for v in (0, 1, 2)]
    assert counts == [[16, 16], [28, 28], [20, 20]]
    assert torch.equal(model.masking_pattern(x, seed=3)[1], labels)


@pytest.mark.parametrize("name", ["mae_tiny", "msmae_tiny"])
def test_safetensors_round_trip_and_pickle_refused(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, in_chans=2, **SMALL).eval()
    path = save_model(model, tmp_path / "m.safetensors", extra={"classes": ["a", "b"]})
    back = load_model(path).eval()
    x = torch.rand(1, 2, 64, 64)
    assert torch.equal(back(x), model(x))
    assert back.config == model.config and back.checkpoint_extra == {"classes": ["a", "b"]}
    pickled = tmp_path / "m.pth"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="safetensors"):
        load_model(pickled)
    with pytest.raises(ValueError, match="safetensors"):
        read_checkpoint(pickled)
