"""Screenshot of the Model dock running a mammography patch classifier on a mammogram: probabilities in the
dock, the abnormality heatmap as a translucent overlay (the README's picture).

    MEDSSL_DATA_DIR=../shared/data xvfb-run -a -s "-screen 0 1600x1000x24" \
        python scripts/mammo_dock_screenshot.py --model cnn_patch_mias --image mdb134 --out docs/images/model_dock_cnn_heatmap.png

mdb134 (a malignant MISC finding at x 469, row 296, radius 49) is in the held-out fold of the ``*_patch_mias`` models.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import napari
from PIL import Image
from qtpy.QtWidgets import QApplication

from napari_medssl._reader import read_layers
from napari_medssl._widgets import ModelWidget

DATA = Path(os.environ.get("MEDSSL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cnn_patch_mias")
    ap.add_argument("--image", default="mdb134", help="mini-MIAS image stem")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--width", type=int, default=1000, help="PNG width in pixels")
    args = ap.parse_args()
    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in read_layers(str(DATA / "mammography_mias" / f"{args.image}.png")):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    dock = ModelWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Model", area="right")
    dock.select(args.model, device="cpu")
    dock.run()
    t0 = time.time()
    while dock._worker is not None and time.time() - t0 < 300:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    QApplication.processEvents()
    shot = Image.fromarray(viewer.screenshot(canvas_only=False))
    shot = shot.resize((args.width, round(shot.height * args.width / shot.width)), Image.LANCZOS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shot.convert("RGB").quantize(256).save(args.out, optimize=True)
    print(f"{args.out}: {dock.result_label.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
