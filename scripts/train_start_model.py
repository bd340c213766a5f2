"""Train the zoo's starting point for new structures (``unet_start_medical``): a 2.5D U-Net for fine-tuning.

One recipe, on the CPU, in the input conventions fast adaptation uses (:mod:`napari_medssl.slices25d`: three
slices as channels, per-volume percentile normalisation, 1 mm in-plane), one output "structure" class:

- supervised: the hippocampus (anterior and posterior as one structure) on MSD Task04 training volumes;
- self-supervised (labels made from the images): synthetic lesions pasted into every development image —
  hippocampus MR, mini-MIAS mammograms (200 µm → 1 mm), the JPEG 2000 CT series and the TotalSegmentator
  CT/MR NIfTI files: irregular blobs with textured brighter or darker intensity, some with an enhancing rim
  and a dark core, spanning neighbouring slices with a varying size; the target is the blob.

Held out: the TCIA Brain-Tumor-Progression studies (PGBM-001, the tumour benchmark's two studies, and
PGBM-005, whose real tumour is unlabelled and would be taught as background) are not used at all.

Run (nice, one thread, checkpoints every few minutes into OUT/best.safetensors):

    nice -n 10 python scripts/train_start_model.py --out runs/start --minutes 60 --threads 1

Axis legend: B batch, C channels, Z Y X space.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_medssl import slices25d
from napari_medssl.engine.adapt import strong_augment
from napari_medssl.engine.loop import soft_dice_loss
from napari_medssl.engine.readers import read_any
from napari_medssl.models import create_model
from napari_medssl.models.registry import save_model

CONTEXT = 1
MM = 1.0
MIAS_MM = 0.2  # mini-MIAS pixel size (README of the data)


def load_sources(data: Path) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, volume (Z, Y, X) normalised at 1 mm, structure mask or None)`` for every development image."""
    out = []
    hippo = sorted((data / "hippocampus" / "imagesTr").glob("*.nii.gz"))
    for path in hippo:
        img = read_any(path)
        lab = read_any(data / "hippocampus" / "labelsTr" / path.name).data
        out.append((path.name, slices25d.normalized_slices(img.data, 1.0), torch.from_numpy(lab > 0)))
    for path in sorted((data / "mammography_mias").glob("*.png")):
        img = read_any(path).data
        img = img if img.ndim == 2 else img[..., :3].mean(-1)
        out.append((path.name, slices25d.normalized_slices(img, MIAS_MM / MM), None))
    others = [data / "dicom" / "ct_jpeg2000_no_uids", *sorted((data / "nifti").glob("*.nii.gz"))]
    for path in others:
        vol = read_any(path)
        arr = vol.data
        if arr.ndim != 3:
            continue
        for axis in (0, 1, 2):  # axial, coronal and sagittal slices of the small isotropic volumes
            moved = np.moveaxis(arr, axis, 0)
            yx = [s for i, s in enumerate(vol.spacing) if i != axis]
            out.append(
                (f"{path.name}:{axis}", slices25d.normalized_slices(moved, float(np.mean(yx)) / MM), None)
            )
            if "ct_jpeg2000" in str(path):
                break  # thin stack of 20 slices: axial only
    return out


def smooth_noise(n: int, size: int, grid: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, size, size)`` smooth random field in about [-1, 1] (bilinear upsampling of a coarse grid)."""
    coarse = torch.rand(n, 1, grid, grid, generator=gen) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0]


def paste_lesion(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one synthetic lesion into ``x (C, S, S)``; return the image and the centre slice's mask."""
    c, s, _ = x.shape
    r = float(4 + 22 * torch.rand(1, generator=gen) ** 1.5)
    tissue = torch.nonzero(x[c // 2] > 0.1)  # lesions grow in tissue, not in the air around it
    if len(tissue) == 0:
        return x, torch.zeros(s, s, dtype=torch.bool)
    cy, cx = tissue[int(torch.randint(len(tissue), (1,), generator=gen))].float().tolist()
    aspect = float(0.6 + 0.8 * torch.rand(1, generator=gen))
    yy, xx = torch.meshgrid(
        torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij"
    )
    dist = torch.sqrt(((yy - cy) / (r * aspect)) ** 2 + ((xx - cx) / r) ** 2)
    rough = smooth_noise(1, s, int(torch.randint(3, 8, (1,), generator=gen)), gen)[0]
    texture = smooth_noise(1, s, int(torch.randint(4, 16, (1,), generator=gen)), gen)[0]
    sign = 1.0 if torch.rand(1, generator=gen) < 0.7 else -1.0
    amp = sign * float(0.15 + 0.45 * torch.rand(1, generator=gen))
    ring = bool(torch.rand(1, generator=gen) < 0.4)
    mask_c = None
    out = x.clone()
    for ch in range(c):
        off = abs(ch - c // 2)
        scale = 1.0 if off == 0 else float(0.3 + 0.8 * torch.rand(1, generator=gen)) ** off
        d = dist / max(scale, 1e-3) + 0.3 * rough
        alpha = torch.sigmoid((1 - d) * 8.0)  # soft edge
        level = 0.7 + 0.3 * texture
        if ring:
            level = torch.where(d < 0.6, level - 1.3, level)  # a core darker than the rim (necrosis)
        local = (x[ch] * alpha).sum() / alpha.sum().clamp(min=1e-3)
        lesion = (local + amp * level).clamp(0, 1)
        out[ch] = x[ch] * (1 - alpha) + lesion * alpha
        if ch == c // 2:
            mask_c = d < 1.0
    assert mask_c is not None
    return out, mask_c


def sample_batch(sources: list, n: int, crop: int, rng: np.random.Generator, gen: torch.Generator) -> tuple:
    """Crops ``(n, 3, crop, crop)`` and structure targets ``(n, crop, crop)``."""
    xs, ys = [], []
    hippo = [i for i, s in enumerate(sources) if s[2] is not None]
    for _ in range(n):
        i = hippo[rng.integers(len(hippo))] if rng.random() < 0.3 else int(rng.integers(len(sources)))
        _, vol, mask = sources[i]
        z = int(rng.integers(vol.shape[0]))
        if mask is not None and mask.any() and rng.random() < 0.7:
            z = int(torch.nonzero(mask.flatten(1).any(1))[rng.integers(int(mask.flatten(1).any(1).sum()))])
        half = crop // 2
        pv = F.pad(vol, (half, half, half, half))
        tissue = torch.nonzero(
            vol[z] > 0.1
        )  # crops centred on tissue (padded: the centre may sit at an edge)
        if len(tissue) and rng.random() < 0.9:
            cy, cx = tissue[int(rng.integers(len(tissue)))].tolist()
            y0, x0 = (
                cy + int(rng.integers(-half // 2, half // 2 + 1)),
                cx + int(rng.integers(-half // 2, half // 2 + 1)),
            )
            y0, x0 = int(np.clip(y0, 0, pv.shape[1] - crop)), int(np.clip(x0, 0, pv.shape[2] - crop))
        else:
            y0 = int(rng.integers(0, pv.shape[1] - crop + 1))
            x0 = int(rng.integers(0, pv.shape[2] - crop + 1))
        idx = [min(max(z + o, 0), vol.shape[0] - 1) for o in range(-CONTEXT, CONTEXT + 1)]
        x = pv[idx, y0 : y0 + crop, x0 : x0 + crop]
        y = torch.zeros(crop, crop, dtype=torch.long)
        if mask is not None:
            y = F.pad(mask[z].long(), (half, half, half, half))[y0 : y0 + crop, x0 : x0 + crop]
        for _ in range(int(rng.choice([0, 1, 1, 1, 2]) if mask is None else rng.choice([0, 0, 1]))):
            x, m = paste_lesion(x, gen)
            y = torch.where(m, torch.ones_like(y), y)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


DOMAIN = {
    "summary": "any grey-scale image or volume as 2.5D slices at 1 mm in-plane (a starting point to fine-tune)",
    "purpose": "starting point",
    "modality": ["MR", "CT", "MG"],
    "structure": "pretraining targets only (synthetic lesions, the hippocampus): fine-tune it on painted slices "
    "(medssl finetune --labels, the Fine-tune dock); it segments nothing meaningful by itself",
    "image_dims": [2, 3],
    "model_dims": 2,
    "slice_axis": 0,
    "channels": 1,
    "intensity": "0.5-99.5 percentile clip and scale over the whole volume",
}


def publish(checkpoint: Path, metrics: dict, metrics_command: str, notes: str) -> Path:
    """Store the weights as float16 (half the size; loaded into float32) and publish ``unet_start_medical``."""
    from napari_medssl import zoo
    from napari_medssl.models.registry import read_checkpoint, write_safetensors

    state, config, extra = read_checkpoint(checkpoint)
    half = checkpoint.with_suffix(".fp16.safetensors")
    meta = {"config": json.dumps(config), "extra": json.dumps({**extra, "domain": DOMAIN})}
    write_safetensors({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, half, meta)
    args = extra["pretraining"]["args"]
    return zoo.publish(
        half,
        "unet_start_medical",
        description="2.5D U-Net (tiny, 3 slices, 1 mm in-plane) pretrained on all development images: the "
        "default starting point for learning a new structure from painted slices",
        command=f"nice -n 10 python scripts/train_start_model.py --out runs/start --minutes {args['minutes']:g} "
        f"--threads 1  # {extra.get('step')} steps in {extra.get('minutes')} min on a shared 2-core CPU",
        metrics=metrics,
        metrics_command=metrics_command,
        data={
            "name": "MSD Task04 Hippocampus (labels), mini-MIAS, TotalSegmentator CT/MR test files, JPEG 2000 CT "
            "series (images only, synthetic lesions)",
            "path": "../shared/data",
            "held_out": "TCIA Brain-Tumor-Progression PGBM-001 (the tumour benchmark) and PGBM-005: not used",
            "licence": "CC-BY-SA 4.0 (Task04), mini-MIAS research use only, Apache-2.0 (TotalSegmentator files)",
        },
        licence="weights: CC-BY-SA 4.0 (inherits Task04); mini-MIAS images used under its research-only terms",
        domain=DOMAIN,
        notes=notes,
    )


def main() -> None:
    """Train for ``--minutes``; write OUT/best.safetensors every ``--save-every`` minutes and at the end."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("MEDSSL_DATA_DIR", "../shared/data"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=80)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--save-every", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sources = load_sources(Path(args.data))
    print(f"{len(sources)} sources loaded in {time.monotonic() - t0:.0f} s", flush=True)
    model = create_model("unet_tiny", in_chans=2 * CONTEXT + 1, num_classes=2, base_width=args.width)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    conv = slices25d.Conventions(context=CONTEXT, in_plane_mm=MM, train_factor=1.0)
    extra = {
        "task": "segment",
        "num_classes": 2,
        "class_names": ["background", "structure"],
        "slice_axis": 0,
        slices25d.KEY: conv.to_extra(),
        "train_config": {"augment": True, "flip_axes": [-1, -2]},
        "pretraining": {
            "recipe": "scripts/train_start_model.py",
            "args": vars(args),
            "held_out": ["tcia_btp_PGBM-001", "tcia_btp_PGBM-005_T1post"],
        },
    }
    budget, step, last_save, log = args.minutes * 60, 0, time.monotonic(), out / "log.jsonl"
    losses: list[float] = []
    while time.monotonic() - t0 < budget:
        progress = (time.monotonic() - t0) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = strong_augment(*sample_batch(sources, args.batch_size, args.crop, rng, gen), gen)
        logits = model(x)
        loss = F.cross_entropy(logits, y, ignore_index=-100) + soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss))
        if time.monotonic() - last_save > args.save_every * 60 or time.monotonic() - t0 >= budget:
            rec = {
                "step": step,
                "minutes": round((time.monotonic() - t0) / 60, 2),
                "loss": float(np.mean(losses)),
            }
            losses = []
            save_model(model, out / "best.safetensors", extra={**extra, **rec})
            with log.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(rec, flush=True)
            last_save = time.monotonic()
    rec = {"step": step, "minutes": round((time.monotonic() - t0) / 60, 2)}
    save_model(model, out / "best.safetensors", extra={**extra, **rec})
    print("done", rec, flush=True)


if __name__ == "__main__":
    main()
