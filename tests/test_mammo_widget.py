"""The Model dock on a real mammogram with a full-resolution patch classifier: probabilities in the dock and
the abnormality map as a translucent overlay on the image's grid (run under ``xvfb-run -a``; screenshot
``widget_model_mammo_heatmap.png`` in the test-output folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_medssl import mammo
from napari_medssl._reader import read_layers
from napari_medssl._widgets import ModelWidget
from napari_medssl.models.registry import create_model, save_model

pytestmark = pytest.mark.gui


def test_model_dock_shows_the_mammography_heatmap(make_napari_viewer, qtbot, data_dir, tmp_path, test_output):
    torch.manual_seed(0)
    model = create_model(
        "vit_tiny", img_size=128, patch_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=2
    )
    extra = {"task": "classify", "class_names": ["normal", "abnormal"], "mammo": dict(mammo.DEFAULT_PIPELINE)}
    ckpt = save_model(model, tmp_path / "mammo.safetensors", extra)
    viewer = make_napari_viewer(show=True)
    for data, kwargs, kind in read_layers(str(data_dir / "mammography_mias" / "mdb005.png")):
        image = getattr(viewer, f"add_{kind}")(data, **kwargs)
    mw = ModelWidget(viewer)
    viewer.window.add_dock_widget(mw, name="Model", area="right")
    mw.select(str(ckpt), device="cpu")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=120_000)
    heat = viewer.layers["mdb005 abnormality"]
    expected = mammo.score_image(mw.model(), np.asarray(image.data))
    assert heat.data.shape == image.data.shape[:2] and heat.data.dtype == np.float32
    assert np.allclose(heat.data, expected["heatmap"], atol=1e-5)
    assert heat.colormap.colors[0][3] == 0.0 and heat.blending == "translucent"  # low values transparent
    probs = image.metadata["medssl"]["classification"]["probabilities"]
    assert probs[1] == pytest.approx(expected["score"], abs=1e-5)
    assert "abnormal" in mw.result_label.text()
    assert mw.image_combo.currentText() == "mdb005"  # the overlay is no image to run models on
    qtbot.wait(300)
    path = test_output / "widget_model_mammo_heatmap.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000
