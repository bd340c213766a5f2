"""The plugin's docks open in a napari that already has an OpenGL context, before torch is imported.

Mesa's GL drivers and Triton bundle different LLVMs: importing Triton (torchvision.ops → torch._dynamo) after
the viewer's GL context exists segfaulted the app. This runs the real order a user takes — napari first, then
our dock — in a fresh process (torch must not be imported yet, which pytest's own process cannot promise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import napari
    from qtpy.QtWidgets import QApplication
    assert "torch" not in sys.modules
    viewer = napari.Viewer()
    viewer.add_image(np.random.default_rng(0).random((32, 32)).astype("float32"), name="img")
    QApplication.processEvents()
    from napari_medssl._widgets import ModelWidget  # imports torch, timm, torchvision
    import torchvision.ops  # the import that reached Triton
    from napari_medssl.models import create_model
    import torch
    dock = ModelWidget(viewer)
    viewer.window.add_dock_widget(dock)
    QApplication.processEvents()
    out = create_model("unet_tiny")(torch.zeros(1, 1, 32, 32))
    print("OK", tuple(out.shape))
    viewer.close()
    """
)


@pytest.mark.gui
def test_docks_open_after_the_viewer_made_its_gl_context():
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert "OK (1, 3, 32, 32)" in proc.stdout
