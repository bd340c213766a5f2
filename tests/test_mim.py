"""MiM: nested masks, the multi-level pre-training objective, padding, and the 3D tokeniser."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medssl.models import create_model
from napari_medssl.models.layers.patch_embed3d import PatchEmbed3d, sincos_3d
from napari_medssl.models.mim import nested_cell_masks, nested_masks
from napari_medssl.transforms import normalize_intensity

LIGHT = {"conv_dims": (8, 16, 32), "embed_dim": 48, "depth": 2, "num_heads": 2, "decoder_dim": 48}


def test_nested_masks_nest_and_follow_the_ratios():
    masks = nested_masks((35, 51, 35), ratios=(0.5, 0.6, 0.5), seed=3)
    assert len(masks) == 3
    for m in masks:
        assert m.shape == (35, 51, 35) and m.dtype == bool
    for coarse, fine in zip(masks, masks[1:]):
        assert not (fine & ~coarse).any()  # every finer masked voxel is masked at the coarser level
        assert fine.sum() < coarse.sum()
    # counted in cells on the padded 48×64×48 grid: 36 cells of 16³ → 18; 144 children → 86; 688 → 344
    full = nested_cell_masks((48, 64, 48), (0.5, 0.6, 0.5), 16, 1, torch.Generator().manual_seed(3))
    assert [int(m.sum()) // side**3 for m, side in zip(full, (16, 8, 4))] == [18, 86, 344]
    # cells are aligned cubes: a level-1 mask is constant on every 8³ block
    blocks = full[1][0].reshape(6, 8, 8, 8, 6, 8).permute(0, 2, 4, 1, 3, 5).reshape(288, -1)
    assert ((blocks.all(1)) | (~blocks.any(1))).all()


def test_nested_masks_seed_inputs_and_errors():
    a = nested_masks((20, 24, 16), seed=1)
    b = nested_masks(np.zeros((2, 20, 24, 16)), seed=1)  # the last three axes of an array
    c = nested_masks(torch.zeros(20, 24, 16), seed=2)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    assert len(nested_masks((32, 32, 32), ratios=(0.5, 0.5, 0.5, 0.5))) == 4
    with pytest.raises(ValueError, match="ratios"):
        nested_masks((16, 16, 16), ratios=(0.5, 1.2))
    with pytest.raises(ValueError, match="cell_size"):
        nested_masks((16, 16, 16), ratios=(0.5, 0.5, 0.5), cell_size=6)
    with pytest.raises(ValueError, match="Z, Y, X"):
        nested_masks((16, 16))


def test_pretrain_loss_on_a_real_volume(data_dir):
    path = sorted((data_dir / "hippocampus" / "imagesTr").glob("*.nii.gz"))[0]
    volume = normalize_intensity(np.asarray(nib.load(path).dataobj))
    x = torch.from_numpy(volume)[None, None]  # (1, 1, 35, 51, 35)
    torch.manual_seed(0)
    model = create_model("mim_tiny", **LIGHT)
    out = model.pretrain_loss(x, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "recon_0", "recon_1", "recon_2", "align_0_1", "align_1_2"}
    assert all(torch.isfinite(v) for v in out.values())
    expected = sum(out[f"recon_{i}"] for i in range(3)) + 0.1 * (out["align_0_1"] + out["align_1_2"])
    torch.testing.assert_close(out["loss"], expected)
    again = model.pretrain_loss(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["loss"], out["loss"])  # masks come from the generator
    out["loss"].backward()
    assert model.mask_value.grad is not None and model.predictor[0].weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_each_level_reconstructs_exactly_its_masked_voxels():
    """The gradient of ``recon_l`` reaches the decoder's prediction at level ``l``'s masked voxels and nowhere else."""
    torch.manual_seed(0)
    model = create_model("mim_tiny", **{**LIGHT, "depth": 1})
    x = torch.rand(1, 1, 32, 32, 32)
    preds: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        preds.append(output)

    model.decoder_pred.register_forward_hook(keep)
    out = model.pretrain_loss(x, generator=torch.Generator().manual_seed(5))
    masks = nested_cell_masks(
        (32, 32, 32), model.mask_ratios, model.cell_size, 1, torch.Generator().manual_seed(5)
    )
    for level in range(3):
        for p in preds:
            p.grad = None
        out[f"recon_{level}"].backward(retain_graph=True)
        where = model.patchify(masks[level][:, None].float()) > 0  # (B, N, p³)
        grad = preds[level].grad
        assert (grad[~where] == 0).all() and (grad[where] != 0).all()
        assert all(p.grad is None for i, p in enumerate(preds) if i != level)


def test_padding_and_alternative_levels():
    model = create_model("mim_tiny", **{**LIGHT, "depth": 1}, mask_ratios=(0.5, 0.5), cell_size=8).eval()
    x = torch.rand(1, 1, 19, 23, 17)
    with torch.no_grad():
        assert model(x).shape == (1, 3, 19, 23, 17)
        out = model.pretrain_loss(x, generator=torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "recon_0", "recon_1", "align_0_1"}


def test_3d_tokenisers():
    pe = PatchEmbed3d(8, 1, 48)
    assert pe(torch.rand(2, 1, 16, 24, 8)).shape == (2, 2 * 3 * 1, 48)
    with pytest.raises(ValueError, match="divisible by 8"):
        pe(torch.rand(1, 1, 15, 16, 16))
    table = sincos_3d(48, (2, 3, 4))
    assert table.shape == (24, 48)
    assert len({tuple(r.tolist()) for r in table}) == 24  # every position distinct
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_3d(40, (2, 2, 2))
