"""Random masking and MSMAE's attention-guided mask / throw / keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from napari_medssl.models.masking import (
    attention_guided_masking,
    attention_weights_from_cls,
    random_masking,
)


def mammogram_patch_weights(data_dir: Path, grid: int = 16) -> torch.Tensor:
    """Mean intensity per patch of a real mammogram on a ``grid × grid`` patch grid, min-max normalised."""
    arr = np.asarray(Image.open(data_dir / "mammography_mias" / "mdb005.png"), dtype=np.float32) / 255.0
    w = F.adaptive_avg_pool2d(torch.from_numpy(arr)[None, None], grid).flatten()
    return (w - w.min()) / (w.max() - w.min())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_masking_exact_counts_and_restore():
    x = torch.randn(3, 64, 8)
    kept, mask, ids_restore, ids_keep = random_masking(x, 0.75, generator=gen(0))
    assert kept.shape == (3, 16, 8) and ids_keep.shape == (3, 16)
    assert torch.equal(mask.sum(1), torch.full((3,), 48.0))
    assert torch.equal(kept, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 8)))
    assert (mask.gather(1, ids_keep) == 0).all()  # kept tokens are exactly the unmasked ones
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :16], ids_keep)
    shuffled = torch.gather(x, 1, ids_shuffle[..., None].expand(-1, -1, 8))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 8)), x)


def test_random_masking_reproducible_and_noise_injectable():
    x = torch.randn(2, 49, 4)
    a = random_masking(x, 0.6, generator=gen(7))[1]
    b = random_masking(x, 0.6, generator=gen(7))[1]
    c = random_masking(x, 0.6, generator=gen(8))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.arange(49.0).flip(0).expand(2, -1)  # the last tokens have the smallest noise: kept
    _, mask, _, ids_keep = random_masking(x, 0.6, noise=noise)
    assert ids_keep[0].sort().values.tolist() == list(range(49 - int(49 * 0.4), 49))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.0)
    with pytest.raises(ValueError, match="noise"):
        random_masking(x, 0.5, noise=torch.rand(2, 10))


def test_guided_masking_exact_counts_partition_and_seed():
    w = torch.rand(4, 196)
    out = attention_guided_masking(w, 0.45, 0.30, generator=gen(0))
    n_mask, n_drop = int(196 * 0.45), int(196 * 0.75)
    assert out["ids_mask"].shape == (4, n_mask)
    assert out["ids_throw"].shape == (4, n_drop - n_mask)
    assert out["ids_keep"].shape == (4, 196 - n_drop)
    labels = out["labels"]
    for b in range(4):
        allids = torch.cat([out["ids_keep"][b], out["ids_mask"][b], out["ids_throw"][b]])
        assert torch.equal(allids.sort().values, torch.arange(196))  # disjoint and covering
        assert (labels[b, out["ids_mask"][b]] == 1).all() and (labels[b, out["ids_throw"][b]] == 2).all()
        assert (labels[b, out["ids_keep"][b]] == 0).all()
    again = attention_guided_masking(w, 0.45, 0.30, generator=gen(0))
    other = attention_guided_masking(w, 0.45, 0.30, generator=gen(1))
    assert torch.equal(again["labels"], labels) and not torch.equal(other["labels"], labels)
    with pytest.raises(ValueError, match="throw_ratio"):
        attention_guided_masking(w, 0.6, 0.5)


def test_guided_masking_draws_proportional_to_weight():
    # One masked patch out of four: its law is that of the first weighted draw, P(i) = w_i / Σw.
    w = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(40000, -1)
    labels = attention_guided_masking(w, 0.25, 0.25, generator=gen(3))["labels"]
    freq = (labels == 1).float().mean(0)
    assert torch.allclose(freq, w[0] / 10, atol=0.01), freq
    # zero-weight patches are drawn last: with two of them and two kept, they are always kept
    w0 = torch.tensor([0.0, 5.0, 0.0, 1.0, 2.0, 3.0]).expand(500, -1)
    labels0 = attention_guided_masking(w0, 0.34, 0.33, generator=gen(4))["labels"]
    assert (labels0[:, [0, 2]] == 0).all()
    uniform = attention_guided_masking(torch.zeros(2, 10), 0.5, 0.2, generator=gen(0))["labels"]
    assert ((uniform == 1).sum(1) == 5).all()


def test_guided_masks_high_weight_patches_more_than_random_on_real_image(data_dir):
    w = mammogram_patch_weights(data_dir)  # (256,) breast tissue bright, background black
    reps = 300
    guided = attention_guided_masking(w.expand(reps, -1), 0.45, 0.30, generator=gen(0))["labels"] == 1
    rand_mask = random_masking(torch.zeros(reps, 256, 1), 0.45, generator=gen(0))[1].bool()
    assert guided.sum(1).eq(int(256 * 0.45)).all()
    mean_w_guided = (w * guided).sum(1) / guided.sum(1)
    mean_w_random = (w * rand_mask).sum(1) / rand_mask.sum(1)
    assert mean_w_guided.mean() > mean_w_random.mean() + 0.1
    top = w >= w.quantile(0.9)  # the brightest tenth of the patches
    assert guided[:, top].float().mean() > 1.5 * rand_mask[:, top].float().mean()


def test_attention_weights_from_cls_minmax_per_head():
    attn = torch.rand(2, 3, 4, 5)
    attn[:, 1] *= 100  # one head with a much larger scale must not dominate
    w = attention_weights_from_cls(attn)
    assert w.shape == (2, 20)
    flat = attn.flatten(2)
    norm = (flat - flat.amin(-1, keepdim=True)) / (flat.amax(-1, keepdim=True) - flat.amin(-1, keepdim=True))
    assert torch.allclose(w, norm.mean(1))
    assert w.min() >= 0 and w.max() <= 1
