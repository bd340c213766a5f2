"""Engine overhead, measured side by side in one run on the real hippocampus data.

1. Training: seconds per step of ``engine.train`` (data pipeline, augmentation, schedule, events) against a bare
   PyTorch loop (same model, same batch size, tensors already in memory, no augmentation).
2. Inference: ``inference.segment`` on whole volumes (normalisation, slicing, windows, softmax, argmax)
   against the bare model forward over the same slices.

Usage::

    .venv/bin/python benchmarks/bench_engine.py [--steps 15] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_medssl import inference
from napari_medssl.engine import MSDFolder, TrainConfig, train
from napari_medssl.engine.loop import soft_dice_loss
from napari_medssl.models import create_model
from napari_medssl.transforms import normalize_intensity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"


def engine_steps(steps: int, batch: int, augment: bool) -> float:
    """Seconds per step of ``engine.train`` (validation kept out of the timed steps)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model="unet_tiny",
            task="segment",
            data=str(DATA),
            out_dir=out,
            max_steps=steps + 5,
            batch_size=batch,
            val_every=10**6,
            augment=augment,
            val_fraction=0.0,
        )
        times, last = [], None
        for event in train(cfg):
            if event["event"] != "step":
                break
            now = time.perf_counter()
            if last is not None and event["step"] > 5:
                times.append(now - last)
            last = now
            if event["step"] == steps + 4:
                break
    return float(np.median(times))


def bare_steps(steps: int, batch: int, slices: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds per step of a plain loop over in-memory slices."""
    torch.manual_seed(0)
    model = create_model("unet_tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        idx = torch.randint(0, len(slices), (batch,))
        logits = model(slices[idx])
        loss = F.cross_entropy(logits, labels[idx]) + soft_dice_loss(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases = MSDFolder(DATA).cases()[:20]
    vols = [c.load() for c in cases]
    slices, labels = [], []
    for img, lab in vols:
        x = normalize_intensity(img[0])
        for z in range(x.shape[0]):
            pad = ((0, 64 - x.shape[1]), (0, 48 - x.shape[2]))
            slices.append(np.pad(x[z], pad)[None])
            labels.append(np.pad(lab[z], pad))
    slices_t = torch.from_numpy(np.stack(slices))
    labels_t = torch.from_numpy(np.stack(labels)).long()

    bare, eng, eng_aug = [], [], []
    for _ in range(args.rounds):  # interleaved, so load from other processes hits all three alike
        bare.append(bare_steps(args.steps, args.batch, slices_t, labels_t))
        eng.append(engine_steps(args.steps, args.batch, augment=False))
        eng_aug.append(engine_steps(args.steps, args.batch, augment=True))
    b, e, a = (float(np.median(v)) for v in (bare, eng, eng_aug))
    print(
        f"train step, batch {args.batch} (unet_tiny 2D, 64x48 slices, {args.threads} thread(s)), "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps:"
    )
    print(
        f"  bare loop {b * 1e3:.0f} ms | engine {e * 1e3:.0f} ms ({e / b:.2f}x) | "
        f"engine + augmentation {a * 1e3:.0f} ms ({a / b:.2f}x)"
    )

    model = create_model("unet_tiny").eval()
    raw = [img[0] for img, _ in vols[:10]]
    t = time.perf_counter()
    for vol in raw:
        inference.segment(model, vol, batch_size=64)
    eng_inf = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        for vol in raw:
            model(torch.from_numpy(normalize_intensity(vol))[:, None]).argmax(1)
    bare_inf = time.perf_counter() - t
    print(
        f"segment 10 volumes slice by slice: bare forward {bare_inf:.2f} s | inference.segment {eng_inf:.2f} s "
        f"({eng_inf / bare_inf:.2f}x)"
    )


if __name__ == "__main__":
    main()
