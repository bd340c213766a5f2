"""Pack the training data a GPU machine needs into ``.devdata/`` (git-ignored), small enough to travel.

A lent GPU machine receives only the checkout (64 MiB in all), not ``../shared``. This copies:

- ``hippocampus/``: MSD Task04 as it is (the segmenters' data, unchanged);
- ``mammography_mias/``: mini-MIAS with every PNG shrunk 4x (1024² → 256², area-averaged) and ``labels.csv``
  unchanged. Pretraining resizes each whole image to the model's input (64² for ``dino_tiny``, antialiased), so
  the model sees the same pixels from either copy;
- ``dicom/tcia_btp_*``: the TCIA series used for DINO pretraining, each slice 2x2 area-averaged (256² → 128²,
  ``PixelSpacing`` doubled), written uncompressed;
- ``medmnist/`` as it is (3 MB; the engine tests read it);
- ``README.md`` (the tests' marker for a data folder).

Usage (from the checkout root): ``python scripts/device_bundle.py [--data ../shared/data] [--out .devdata]``
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian
from skimage.transform import downscale_local_mean

TCIA = ("tcia_btp_PGBM-001", "tcia_btp_PGBM-005_T1post")


def shrink_png(src: Path, dst: Path, factor: int) -> None:
    img = np.asarray(Image.open(src))
    small = downscale_local_mean(img.astype(np.float32), (factor, factor))
    Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8)).save(dst, optimize=True)


def shrink_dicom(src: Path, dst: Path, factor: int) -> None:
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    small = downscale_local_mean(arr.astype(np.float64), (factor, factor))
    out = np.rint(small).astype(arr.dtype)
    ds.PixelData = out.tobytes()
    ds.Rows, ds.Columns = out.shape
    if "PixelSpacing" in ds:
        ds.PixelSpacing = [float(v) * factor for v in ds.PixelSpacing]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default=".devdata")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(data / "README.md", out / "README.md")
    for name in ("hippocampus", "medmnist"):
        if not (out / name).exists():
            shutil.copytree(data / name, out / name)
    mias = out / "mammography_mias"
    mias.mkdir(exist_ok=True)
    for f in (data / "mammography_mias").iterdir():
        if f.suffix.lower() == ".png":
            if not (mias / f.name).exists():
                shrink_png(f, mias / f.name, 4)
        else:
            shutil.copy2(f, mias / f.name)
    for name in TCIA:
        src = data / "dicom" / name
        for f in sorted(src.rglob("*.dcm")):
            dst = out / "dicom" / name / f.relative_to(src)
            if not dst.exists():
                shrink_dicom(f, dst, 2)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
