"""The CUDA paths, on real data: bf16-autocast training, inference, DINO attention and pretraining losses.

These need an NVIDIA GPU. CI has none, so there they are skipped with that reason (shown by ``-ra``); they are
run on a lent GPU machine (``scripts/device_train.sh`` runs this file first). Everything else in the suite runs
the same code on the CPU.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medssl import inference
from napari_medssl.engine import read_events, train
from napari_medssl.models import create_model, dino, load_model
from napari_medssl.testing import training as helpers_engine
from napari_medssl.testing.training import small_msd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")


@pytest.fixture(scope="module")
def msd(data_dir, tmp_path_factory):
    return small_msd(data_dir, tmp_path_factory.mktemp("msd"), n=5)


def _volume(msd):
    path = sorted((msd / "imagesTr").iterdir())[0]
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


def test_training_on_cuda_checkpoints_load_and_agree_on_the_cpu(msd, tmp_path):
    run = tmp_path / "run"
    cfg = helpers_engine.seg_config(msd, run, device="cuda", max_steps=6, val_every=3, batch_size=4, lr=3e-3)
    assert cfg.amp  # bf16 autocast on CUDA
    events = list(train(cfg))
    losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert [e["event"] for e in read_events(run)] == ["start", "val", "val"]
    best = events[-1]["best_path"]
    model = load_model(best)  # a CUDA-trained checkpoint loads on the CPU
    assert next(model.parameters()).device.type == "cpu"
    vol = _volume(msd)
    on_cpu = inference.segment(model, vol, device="cpu")
    on_gpu = inference.segment(model, vol, device="cuda")
    assert on_gpu.shape == vol.shape and on_gpu.dtype == on_cpu.dtype
    # bf16 autocast on the GPU vs float32 on the CPU: a handful of voxels at class boundaries may differ
    assert (on_gpu == on_cpu).mean() > 0.99


def test_3d_segmenters_and_mim_pretraining_on_cuda(msd):
    vol = torch.from_numpy(_volume(msd))[None, None].cuda()  # (1, 1, Z, Y, X), odd sides
    vol = (vol - vol.mean()) / vol.std()
    for name in ("mim_tiny", "emfformer_tiny", "unet_tiny"):
        kw = {"spatial_dims": 3} if name != "mim_tiny" else {}
        model = create_model(name, num_classes=3, **kw).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(vol)
        assert out.shape[2:] == vol.shape[2:]
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # MiM's pretraining parts get none
        assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    mim = create_model("mim_tiny").cuda()
    loss = mim.pretrain_loss(vol[..., :32, :48, :32])
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)
    loss.backward()


def test_dino_attention_and_loss_on_cuda_match_the_cpu(data_dir):
    torch.manual_seed(0)
    model = create_model(
        "dino_tiny", depth=2, out_dim=256, hidden_dim=128, bottleneck_dim=64, n_local_crops=2
    )
    model.eval()
    x = torch.rand(3, 1, 64, 64)
    maps_cpu = dino.attention_maps(model, x)
    maps_gpu = dino.attention_maps(model.cuda(), x.cuda()).cpu()
    assert maps_gpu.shape == maps_cpu.shape
    torch.testing.assert_close(maps_gpu, maps_cpu, atol=2e-4, rtol=1e-3)
    model.train()
    loss = model.pretrain_loss(x.cuda())
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)
    loss.backward()
