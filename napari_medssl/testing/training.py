"""Small real-data folders for the engine tests: symlinks to a few files of $MEDSSL_DATA_DIR (never copies)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from napari_medssl.engine import TrainConfig

# small configurations that still exercise every code path
TINY_UNET = {"levels": 2}
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
TINY_MAE = {**TINY_VIT, "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}


def seg_config(data: Path | str, out: Path | str, **kw: Any) -> TrainConfig:
    """A tiny real U-Net segmentation run (2 levels, CPU, a few steps) on ``data``; ``kw`` overrides fields."""
    base: dict[str, Any] = dict(
        model="unet_tiny",
        task="segment",
        data=str(data),
        out_dir=str(out),
        max_steps=2,
        batch_size=2,
        val_every=2,
        warmup_steps=1,
        model_overrides=dict(TINY_UNET),
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def small_msd(data_dir: Path, dest: Path, n: int = 6) -> Path:
    """An MSD-layout folder with the first ``n`` hippocampus cases (symlinks)."""
    src = data_dir / "hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (src / "imagesTr").iterdir() if p.name.endswith(".nii.gz"))[:n]
    for name in names:
        for sub in ("imagesTr", "labelsTr"):
            link = dest / sub / name
            if not link.exists():
                link.symlink_to(src / sub / name)
    return dest


def small_mias(data_dir: Path, dest: Path, n_women: int = 6) -> Path:
    """A mini-MIAS-format folder with the first ``n_women`` complete pairs (symlinked PNGs, filtered CSV)."""
    src = data_dir / "mammography_mias"
    with open(src / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    present = {r["image"] for r in rows}
    keep: list[str] = []
    for r in rows:
        num = int(r["image"][3:6])
        mate = f"mdb{num + 1 if num % 2 else num - 1:03d}.png"
        if r["image"] not in keep and mate in present:
            keep.append(r["image"])
    women = sorted({(int(k[3:6]) + 1) // 2 for k in keep})[:n_women]
    chosen = {k for k in keep if (int(k[3:6]) + 1) // 2 in women}
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if r["image"] in chosen)
    for name in chosen:
        link = dest / name
        if not link.exists():
            link.symlink_to(src / name)
    return dest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the test machine's 2 cores are shared, and 2 threads fighting others run 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
