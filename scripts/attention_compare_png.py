"""Side-by-side DINO attention of several models on held-out images, as `medssl attention` computes it.

    MEDSSL_DATA_DIR=../shared/data python scripts/attention_compare_png.py --model dino_tiny_medical \
        --model runs/x/zoo_fp16.safetensors --out docs/images/dino_compare.png

One row per model; per image two columns: the image, then its best head's [CLS] attention at the default
overlay resolution (64 × 64 patches or more, :func:`napari_medssl.overlays.attention_heads`), each patch's
weight drawn on its pixels (no smoothing), min-max scaled (``--clip 99``: up to the 99th percentile), over the
image in a heat colour. Images (held out
from dino_tiny_medical's training, ``models/splits/dino_tiny_medical_seed0.json``): mini-MIAS mdb017 and mdb151,
slice 12 of TCIA PGBM-001's 1991-11-19 T1post and FLAIR series. The title of each map gives the head and its
tissue lift.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from napari_medssl import overlays, zoo
from napari_medssl.engine import readers

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSSL_DATA_DIR", REPO.parent / "shared" / "data"))
STUDY = DATA / "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"
IMAGES = [  # (label, path, slice)
    ("mdb017", DATA / "mammography_mias" / "mdb017.png", None),
    ("mdb151", DATA / "mammography_mias" / "mdb151.png", None),
    ("T1post z12", STUDY / "11-T1post-03326", 12),
    ("FLAIR z12", STUDY / "35637-FLAIRreg-16386", 12),
]
TILE = 256


def _plane(path: Path, z: int | None) -> overlays.Plane:
    img = readers.read_any(path)
    data = np.asarray(img.data)
    return overlays.take_plane(data, (z, 0, 0)) if z is not None else overlays.take_plane(data, rgb=img.rgb)


def _gray(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float32))
    lo, hi = np.percentile(a, (0.5, 99.5))
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def _tile(rgb: np.ndarray, title: str) -> Image.Image:
    im = Image.fromarray((rgb * 255).astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
    ImageDraw.Draw(im).text((4, 4), title, fill=(255, 255, 0))
    return im


def cells(
    model: torch.nn.Module, planes: list[tuple[str, overlays.Plane]], clip: float | None = None
) -> list[Image.Image]:
    """Image tile, then best-head map tile, for every plane (``clip``: scale each map to this percentile of its
    weights instead of its maximum, so that a few hot patches do not hide the rest)."""
    out = []
    for label, plane in planes:
        att = overlays.attention_heads(model, plane)
        head = int(np.nanargmax(att["tissue_lift"]))
        gray = _gray(np.asarray(plane.data))
        w = att["weights"][head]
        heat = overlays.minmax(w[None])[0] if clip is None else np.clip(w / np.percentile(w, clip), 0, 1)
        rgb = np.stack([gray] * 3, -1)
        over = np.clip(0.55 * rgb + 0.45 * np.stack([heat, heat**2, 0.2 * heat], -1) * 1.6, 0, 1)
        out.append(_tile(rgb, label))
        grid = "x".join(map(str, att["grid"]))
        out.append(_tile(over, f"head {head} lift {att['tissue_lift'][head]:.2f} ({grid})"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", action="append", required=True, help="zoo name or checkpoint (repeat: one row each)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clip", type=float, help="scale maps to this percentile (e.g. 99) instead of min-max")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    planes = [(label, _plane(path, z)) for label, path, z in IMAGES]
    rows = [cells(zoo.load(spec).eval(), planes, args.clip) for spec in args.model]
    sheet = Image.new("RGB", (TILE * len(rows[0]), (TILE + 16) * len(rows)), "black")
    for r, (spec, row) in enumerate(zip(args.model, rows)):
        ImageDraw.Draw(sheet).text((4, r * (TILE + 16) + 2), Path(spec).as_posix()[-100:], fill="white")
        for c, im in enumerate(row):
            sheet.paste(im, (c * TILE, r * (TILE + 16) + 16))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
