"""Overlays on real images: DINO attention + mass masks, MSMAE mask/throw/keep, MAE reconstruction, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medssl import overlays as ov
from napari_medssl.io import read
from napari_medssl.models.attention import attention_maps
from napari_medssl.models.registry import create_model


@pytest.fixture(scope="module")
def hippo(data_dir):
    return read(data_dir / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz")[0]


@pytest.fixture(scope="module")
def mammo(data_dir):
    return read(data_dir / "mammography_mias" / "mdb005.png")[0]


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return create_model("dino_tiny", depth=2, out_dim=256, hidden_dim=64).eval()


def hippo_plane(hippo, z=17):
    return ov.take_plane(hippo.data, (z, 0, 0), (1, 2), hippo.scale, hippo.translate)


def test_take_plane_geometry_axial_and_coronal(hippo):
    vol = np.asarray(hippo.data)
    plane = ov.take_plane(vol, (17, 5, 6), (-2, -1), scale=(2.0, 1.0, 0.5), translate=(10.0, 20.0, 30.0))
    assert np.array_equal(plane.data, vol[17])
    geo = plane.geometry()
    assert geo == {"scale": (2.0, 1.0, 0.5), "translate": (10.0 + 17 * 2.0, 20.0, 30.0)}
    assert plane.embed(plane.data).shape == (1, *vol.shape[1:])
    coronal = ov.take_plane(vol, (17, 5, 6), (0, 2), scale=(2.0, 1.0, 0.5), translate=(10.0, 20.0, 30.0))
    assert np.array_equal(coronal.data, vol[:, 5, :])
    assert coronal.geometry()["translate"] == (10.0, 25.0, 30.0)
    heads = np.zeros((3, *coronal.data.shape))
    assert coronal.embed(heads).shape == (3, vol.shape[0], 1, vol.shape[2])
    with pytest.raises(ValueError, match="outside the image"):
        ov.take_plane(vol, (99, 0, 0))
    with pytest.raises(ValueError, match="two different axes"):
        ov.take_plane(vol, (0, 0, 0), (1, 1))


def test_take_plane_rgb_is_averaged():
    rgb = np.stack([np.full((4, 5), v, np.uint8) for v in (0, 30, 90)], axis=-1)
    plane = ov.take_plane(rgb, rgb=True)
    assert plane.data.shape == (4, 5) and np.allclose(plane.data, 40.0)


def test_dino_overlays_maps_masks_and_geometry(hippo, mammo, dino):
    plane = hippo_plane(hippo)
    att, masks = ov.dino_overlays(dino, plane, threshold=0.6)
    n = dino.backbone.num_heads
    assert (att.kind, masks.kind) == ("image", "labels")
    z_world = hippo.translate[0] + 17 * hippo.scale[0]
    for ly in (att, masks):  # one layer per kind, heads on a leading axis (scale 1, translate 0)
        assert ly.data.shape == (n, 1, *plane.data.shape)
        assert ly.scale == (1.0, *hippo.scale)
        assert ly.translate == (0.0, z_world, *hippo.translate[1:])
    assert att.style["blending"] == "translucent" and att.style["colormap"]["colors"][0][3] == 0.0
    assert att.data.min() >= 0.0 and att.data.max() == pytest.approx(1.0)
    # the default resolution: a 64 x 64 patch grid at least, recorded in the metadata
    meta = att.metadata
    assert (
        meta["grid"][0] >= 64
        and meta["grid"][1] >= 64
        and meta["input_size"] == [g * 8 for g in meta["grid"]]
    )
    assert "not an explanation" in meta["legend"]
    # the brightest pixel of each head's overlay lies in the patch the model attends to most (a mammogram at
    # 128 px: every patch covers 64 x 64 of its pixels)
    plane = ov.take_plane(mammo.data, None, (0, 1), mammo.scale, mammo.translate)
    att, masks = ov.dino_overlays(dino, plane, threshold=0.6, size=128)
    att.data, masks.data = att.data[:, None], masks.data[:, None]  # as the slice's (H, 1, Y, X) above
    x = ov.model_input(plane.data, dino, size=att.metadata["input_size"])
    raw = attention_maps(dino, x, upsample=False, normalize=False)[0]  # (H, gh, gw)
    for h in range(n):
        gy, gx = np.unravel_index(int(raw[h].argmax()), raw[h].shape)
        py = int((gy * 8 + 4) * plane.data.shape[0] / x.shape[-2])
        px = int((gx * 8 + 4) * plane.data.shape[1] / x.shape[-1])
        assert att.data[h, 0, py, px] == pytest.approx(1.0)
        inside = masks.data[h, 0] > 0
        assert 0 < inside.mean() < 1
        assert (
            att.data[h, 0][inside].mean() > att.data[h, 0][~inside].mean()
        )  # masks hold the attended patches
        assert set(np.unique(masks.data[h])) == {0, h + 1}


def test_tissue_lift_on_a_real_mammogram(mammo, dino):
    """1 for a uniform map, > 1 for a map on the breast, < 1 for a map on the black background."""
    img = np.asarray(mammo.data, dtype=np.float64)[::8, ::8]  # (128, 128)
    tissue = img > np.percentile(img, 60)
    maps = np.stack([np.ones_like(img), tissue.astype(float), (~tissue).astype(float)])
    lift = ov.tissue_lift(maps, img)
    assert lift[0] == pytest.approx(1.0) and lift[1] > 1.5 and lift[2] < 0.5
    assert np.isnan(ov.tissue_lift(maps, np.zeros_like(img))).all()
    with pytest.raises(ValueError, match="must be"):
        ov.tissue_lift(maps[0], img)
    plane = ov.take_plane(mammo.data, None, (0, 1), mammo.scale, mammo.translate)
    layers = ov.dino_overlays(dino, plane, size=128)  # the overlays carry each head's lift in their metadata
    assert len(layers[0].metadata["tissue_lift"]) == dino.backbone.num_heads
    assert layers[0].metadata["grid"] == [16, 16] and layers[0].metadata["input_size"] == [128, 128]


def test_dino_masks_grow_with_threshold_and_head_selects(hippo, dino):
    plane = hippo_plane(hippo)
    sizes = []
    for t in (0.3, 0.6, 1.0):
        (mask,) = [
            ly for ly in ov.dino_overlays(dino, plane, threshold=t, head=1, size=128) if ly.kind == "labels"
        ]
        sizes.append(mask.data > 0)
    for small, big in zip(sizes, sizes[1:]):
        assert np.all(big[small]) and big.sum() >= small.sum()
    assert sizes[-1].mean() > 0.99
    only = ov.dino_overlays(dino, plane, head=1, size=128)
    assert [ly.name for ly in only] == ["attention head 1", "attention mask head 1 (60%)"]
    assert only[0].data.shape == (1, *plane.data.shape)  # one head: no head axis
    with pytest.raises(ValueError, match="out of range"):
        ov.dino_overlays(dino, plane, head=7)
    with pytest.raises(ValueError, match="ViT-based"):
        ov.dino_overlays(create_model("unet_tiny", levels=2), plane)


def test_dino_on_a_2d_mammogram_keeps_its_pixel_spacing(mammo, dino):
    plane = ov.take_plane(mammo.data, None, (0, 1), mammo.scale, mammo.translate)
    layers = ov.dino_overlays(dino, plane, size=128)
    n = dino.backbone.num_heads
    assert all(ly.data.shape == (n, *mammo.data.shape) for ly in layers)
    assert all(ly.scale == (1.0, *mammo.scale) and ly.translate == (0.0, *mammo.translate) for ly in layers)


def test_msmae_pattern_ratios_seed_and_guidance(hippo):
    torch.manual_seed(0)
    model = create_model("msmae_tiny", depth=2).eval()
    plane = hippo_plane(hippo)
    weights, labels = ov.msmae_overlays(model, plane, seed=3, size=128)
    assert weights.kind == "image" and labels.kind == "labels"
    assert set(np.unique(labels.data)) == {1, 2, 3}
    assert labels.metadata["grid"] == [16, 11] and labels.metadata["input_size"] == [128, 88]
    n = 16 * 11  # a finer grid than the 8 x 8 of the training size
    fr = labels.metadata["fractions"]
    assert fr["mask"] == pytest.approx(model.guided_mask_ratio, abs=1 / n + 1e-6)
    assert fr["throw"] == pytest.approx(model.throw_ratio, abs=1 / n + 1e-6)
    assert sum(fr.values()) == pytest.approx(1.0)
    again = ov.msmae_overlays(model, plane, seed=3, size=128)[1]
    other = ov.msmae_overlays(model, plane, seed=4, size=128)[1]
    assert np.array_equal(again.data, labels.data) and not np.array_equal(other.data, labels.data)
    # guided: over many seeds, masked or thrown pixels carry more attention weight than kept ones
    w = weights.data[0]
    hidden, kept = [], []
    for s in range(8):
        lab = ov.msmae_overlays(model, plane, seed=s, size=128)[1].data[0]
        hidden.append(w[lab > 1].mean())
        kept.append(w[lab == 1].mean())
    assert np.mean(hidden) > np.mean(kept)


def test_mae_mask_and_reconstruction(hippo):
    torch.manual_seed(0)
    model = create_model("mae_tiny", depth=2).eval()
    plane = hippo_plane(hippo)
    masked, recon, pasted, mask = ov.mae_overlays(model, plane, mask_ratio=0.75, seed=5, size=128)
    m = mask.data[0] > 0
    assert abs(m.mean() - 0.75) < 0.08
    assert np.all(masked.data[0][m] == 0)
    assert np.isfinite(recon.data).all()
    visible = ~m
    assert np.abs(pasted.data[0][visible] - masked.data[0][visible]).mean() < 0.05
    assert np.abs(pasted.data[0][m] - recon.data[0][m]).mean() < 0.05
    same = ov.mae_overlays(model, plane, mask_ratio=0.75, seed=5, size=128)[3]
    assert np.array_equal(same.data, mask.data)
    with pytest.raises(ValueError, match="mask_ratio"):
        ov.mae_overlays(model, plane, mask_ratio=1.0)


def test_mim_nested_masks_on_a_volume(hippo):
    from napari_medssl.models.mim import nested_masks

    shape = tuple(hippo.data.shape)
    (layer,) = ov.mim_overlays(
        shape, (0.5, 0.6, 0.5), seed=2, scale=hippo.scale, translate=hippo.translate, cell_size=8
    )
    assert layer.kind == "labels" and layer.data.shape == shape
    assert layer.scale == tuple(hippo.scale) and layer.translate == tuple(hippo.translate)
    masks = nested_masks(shape, (0.5, 0.6, 0.5), 2, cell_size=8)
    for k, mask in enumerate(masks, start=1):  # outlines: value k only inside level k's mask ...
        assert np.all(mask[layer.data == k]) and (layer.data == k).any()
        assert np.all(layer.data[ov.outline_yx(mask)] >= k)  # ... and every border of it drawn (k or finer)
        assert not np.all(layer.data[mask] > 0)  # not filled
    assert layer.metadata["drawn"].startswith("outlines")
    fr = layer.metadata["fractions"]
    assert fr[0] > fr[1] > fr[2] > 0 and abs(fr[0] - 0.5) < 0.15
    other = ov.mim_overlays(shape, (0.5, 0.6, 0.5), seed=3, cell_size=8)[0]
    assert not np.array_equal(other.data, layer.data)
    with pytest.raises(ValueError, match="3D"):
        ov.mim_overlays(shape[1:])
    with pytest.raises(ValueError, match="ratio"):
        ov.mim_overlays(shape, (0.5, 1.5))
