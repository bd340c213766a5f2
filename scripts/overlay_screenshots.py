"""The README's overlay screenshots: each overlay of the Attention & masking dock on a held-out mammogram and on
a held-out brain MR slice, at the dock's default resolution, saved as small PNGs.

    MEDSSL_DATA_DIR=../shared/data xvfb-run -a -s "-screen 0 1600x1000x24" \
        python scripts/overlay_screenshots.py --out docs/images

Images: mini-MIAS mdb017 and the middle slice of TCIA PGBM-001's 1991-11-19 T1post series (both in
dino_tiny_medical's held-out split). Models: dino_tiny_medical (DINO attention), msmae_tiny_mias (MSMAE
masking), mae_tiny_mias (MAE reconstruction), mim_tiny_hippocampus (MiM nested masks: 3D, on the MR volume
only), scratch_vit_tiny_mias (Grad-CAM of a classifier, on the mammogram). The DINO shots show the head with the highest tissue lift; the first one is the whole window (dock,
legend, head slider).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import napari
import numpy as np
from PIL import Image
from qtpy.QtWidgets import QApplication

from napari_medssl._reader import read_layers
from napari_medssl._widgets import OverlayWidget

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSSL_DATA_DIR", REPO.parent / "shared" / "data"))
MAMMOGRAM = DATA / "mammography_mias" / "mdb017.png"
MR = DATA / "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993/11-T1post-03326"
SHOTS = [  # (file stem, image, model, whole window)
    ("dino_mammogram", MAMMOGRAM, "dino_tiny_medical", True),
    ("dino_mr", MR, "dino_tiny_medical", False),
    ("msmae_mammogram", MAMMOGRAM, "msmae_tiny_mias", False),
    ("msmae_mr", MR, "msmae_tiny_mias", False),
    ("mae_mammogram", MAMMOGRAM, "mae_tiny_mias", False),
    ("mae_mr", MR, "mae_tiny_mias", False),
    ("mim_mr", MR, "mim_tiny_hippocampus", False),
    ("gradcam_mammogram", MAMMOGRAM, "scratch_vit_tiny_mias", False),
]


def wait(dock: OverlayWidget) -> None:
    app = QApplication.instance()
    while dock._worker is not None:
        app.processEvents()
        time.sleep(0.01)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def shoot(stem: str, path: Path, model: str, window: bool, out: Path, width: int) -> Path:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 820)
    for data, kwargs, kind in read_layers(str(path)):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    image = viewer.layers[0]
    if image.ndim == 3:
        viewer.dims.set_current_step(0, image.data.shape[0] // 2)
    dock = OverlayWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Attention & masking", area="right")
    dock.select(model)
    dock.device_combo.setCurrentText("cpu")
    dock.show_overlays()
    wait(dock)
    layers = dock.last_layers
    if not layers:
        raise RuntimeError(f"{stem}: no layers ({dock.status_label.text()})")
    meta = layers[0].metadata.get("medssl", {})
    if "tissue_lift" in meta and len(meta.get("heads", [])) > 1:
        viewer.dims.set_current_step(0, int(np.nanargmax(meta["tissue_lift"])))
        layers[1].visible = False  # the masks: one click away
    for ly in layers:
        if ly.name.startswith("MAE") and ly.name != "MAE reconstruction + visible":
            ly.visible = ly.name.startswith("MAE mask")
    viewer.reset_view()
    wait(dock)
    target = out / f"overlay_{stem}.png"
    arr = viewer.screenshot(canvas_only=not window)
    img = Image.fromarray(np.asarray(arr)[..., :3])
    img.thumbnail((width * (2 if window else 1), 10_000))
    img.save(target, optimize=True)
    print(target, img.size, dock.status_label.text(), flush=True)
    viewer.close()
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    p.add_argument("--width", type=int, default=360, help="canvas shots are scaled to this width (px)")
    p.add_argument("--only", nargs="*", help="file stems to make (default all)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for stem, path, model, window in SHOTS:
        if not args.only or stem in args.only:
            shoot(stem, path, model, window, args.out, args.width)


if __name__ == "__main__":
    main()
