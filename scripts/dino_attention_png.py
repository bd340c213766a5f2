"""Render images + per-head DINO [CLS] attention maps to a PNG: `python scripts/dino_attention_png.py MODEL OUT.png`.

MODEL is a zoo name or a .safetensors checkpoint; rows: two hippocampus slices, two mini-MIAS mammograms, a TCIA
T1post slice (from ../shared/data); columns: the 64x64 input, one map per head, the mean map over the image.

It also prints how much the maps follow anatomy rather than background, on every mini-MIAS mammogram and every
slice of the TCIA T1post series (images with a real black background): the share of each head's attention that
falls on tissue (pixels above the image's Otsu threshold), divided by the share of the image that is tissue.
1.0 is a map blind to anatomy (uniform); above 1 the head looks at tissue, below 1 at the background.
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_medssl import zoo
from napari_medssl.engine import readers
from napari_medssl.inference import resize
from napari_medssl.models.attention import attention_maps
from napari_medssl.overlays import tissue_lift
from napari_medssl.transforms import normalize_intensity

spec, out = sys.argv[1], sys.argv[2]
model = zoo.load(spec)
D = os.environ.get("MEDSSL_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
items = []
for f, z in [
    (f"{D}/hippocampus/imagesTr/hippocampus_001.nii.gz", 17),
    (f"{D}/hippocampus/imagesTr/hippocampus_011.nii.gz", 14),
    (f"{D}/mammography_mias/mdb005.png", None),
    (f"{D}/mammography_mias/mdb013.png", None),
    (f"{D}/dicom/tcia_btp_PGBM-005_T1post", 12),
]:
    data = np.asarray(readers.read_any(f).data, dtype=np.float32)
    img = data[z] if z is not None and data.ndim == 3 else data
    img = np.squeeze(img)
    if img.ndim == 3:
        img = img[..., 0] if img.shape[-1] in (3, 4) else img[img.shape[0] // 2]
    img = normalize_intensity(img)
    x = resize(torch.from_numpy(np.ascontiguousarray(img))[None, None], (64, 64)).float()
    items.append((f.split("/")[-1], x))

S = 128


def tile(a, rgb=None):
    a = np.asarray(a, dtype=np.float32)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-6)
    im = Image.fromarray((a * 255).astype(np.uint8)).resize((S, S), Image.NEAREST)
    if rgb is None:
        return im.convert("RGB")
    g = np.asarray(im, dtype=np.float32) / 255
    heat = np.stack([np.clip(3 * g, 0, 1), np.clip(3 * g - 1, 0, 1), np.clip(3 * g - 2, 0, 1)], -1)
    return Image.fromarray((heat * 255).astype(np.uint8))


rows = []
for _name, x in items:
    maps = attention_maps(model, x)[0].numpy()
    img = tile(x[0, 0].numpy())
    tiles = [img] + [tile(m, True) for m in maps]
    mean = np.asarray(tile(maps.mean(0), True), dtype=np.float32)
    tiles.append(Image.fromarray((0.5 * mean + 0.5 * np.asarray(img, dtype=np.float32)).astype(np.uint8)))
    rows.append(tiles)
canvas = Image.new("RGB", (S * len(rows[0]), S * len(rows)))
for r, tiles in enumerate(rows):
    for c, t in enumerate(tiles):
        canvas.paste(t, (c * S, r * S))
canvas.save(out)
print(out, [n for n, _ in items])


def background_images() -> dict[str, list[np.ndarray]]:
    groups: dict[str, list[np.ndarray]] = {"mini-MIAS mammograms": [], "TCIA T1post slices": []}
    for f in sorted(Path(D, "mammography_mias").glob("*.png")):
        img = np.squeeze(np.asarray(readers.read_any(f).data, dtype=np.float32))
        groups["mini-MIAS mammograms"].append(img[..., 0] if img.ndim == 3 else img)
    vol = np.asarray(readers.read_any(f"{D}/dicom/tcia_btp_PGBM-005_T1post").data, dtype=np.float32)
    groups["TCIA T1post slices"] = [z for z in vol if z.max() > z.min()]
    return groups


for group, images in background_images().items():
    lifts = []
    for img in images:
        img = normalize_intensity(img)
        x = resize(torch.from_numpy(np.ascontiguousarray(img))[None, None], (64, 64)).float()
        maps = attention_maps(model, x, upsample=True, normalize=False)[0].numpy()
        small = resize(torch.from_numpy(np.ascontiguousarray(img))[None, None], maps.shape[-2:])[0, 0].numpy()
        lifts.append(tissue_lift(maps, small))
    lifts = np.array(lifts)
    per_head = ", ".join(f"{v:.2f}" for v in np.median(lifts, axis=0))
    print(
        f"{group} ({len(lifts)}): tissue lift per head (median) {per_head}; mean over heads {lifts.mean():.2f}"
    )
