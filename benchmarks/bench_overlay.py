"""How long a DINO attention overlay on a 1024² mammogram takes, as a ratio to a plain forward pass of the same
ViT at the same input size, measured side by side (interleaved) in one process.

    MEDSSL_DATA_DIR=../shared/data python benchmarks/bench_overlay.py [--model dino_tiny_medical] \
        [--repeats 5] [--threads 1] [--dock]

Rows (median of ``--repeats``, after one warm-up each):
- ``forward``: ``model(x)`` on the 512 × 512 input (64 × 64 patches, 4096 tokens), no grad;
- ``attention``: :func:`napari_medssl.overlays.attention_heads` (normalise + resize the plane, the cheap
  [CLS]-row pass, per-head maps back on the 1024² grid, tissue lift);
- ``overlay``: :func:`napari_medssl.overlays.dino_overlays` (the above plus masks and the two layers' arrays:
  everything the dock's worker thread computes);
- ``dock`` (``--dock``, needs a display: run under ``xvfb-run``): the Attention & masking dock from Show to
  the two layers added in a napari viewer (worker thread, layer creation, first draw).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_medssl import overlays, zoo
from napari_medssl.engine import readers

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSSL_DATA_DIR", REPO.parent / "shared" / "data"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def dock_seconds(image: np.ndarray, model_name: str, repeats: int) -> list[float]:
    """Show → layers added, in a real viewer (needs a display)."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_medssl._widgets import OverlayWidget

    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name="mammogram")
    dock = OverlayWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Attention & masking")
    dock.select(model_name)
    dock.device_combo.setCurrentText("cpu")
    app = QApplication.instance()
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        dock.show_overlays()
        while dock._worker is not None:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()
        times.append(time.perf_counter() - t0)
    viewer.close()
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dino_tiny_medical")
    p.add_argument("--image", default=str(DATA / "mammography_mias" / "mdb017.png"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dock", action="store_true", help="also time the napari dock (needs a display)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = zoo.load(args.model).eval()
    image = np.asarray(readers.read_any(args.image).data)
    plane = overlays.take_plane(image)
    hw = overlays.attention_input_size(plane.data.shape, model.patch_size)
    x = overlays.model_input(plane.data, model, size=hw)
    cases = {
        "forward": lambda: model(x),
        "attention": lambda: overlays.attention_heads(model, plane),
        "overlay": lambda: overlays.dino_overlays(model, plane),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in cases.items():
                times[name].append(timed(fn))
    print(
        f"{args.model} on {Path(args.image).name} {plane.data.shape}: input {hw}, grid "
        f"{hw[0] // model.patch_size} x {hw[1] // model.patch_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); load average {os.getloadavg()[0]:.1f}"
    )
    if args.dock:
        times["dock"] = dock_seconds(image, args.model, args.repeats)
    ref = statistics.median(times["forward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>10}: median {med:.3f} s (min {min(ts):.3f}), {med / ref:.2f}x the forward pass")


if __name__ == "__main__":
    main()
