"""The Fine-tune dock on a painted brain MR volume: fast 2.5D adaptation from the default starting point, live
preview of the current slice, bad paint refused before any process starts (run under ``xvfb-run -a``)."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest

from napari_medssl.engine.adapt import DEFAULT_START
from napari_medssl.engine.readers import read_any
from tests.test_widgets import add_docks, docks, errors, open_file, private_folders, shot  # noqa: F401

pytestmark = pytest.mark.gui


def test_dock_adapts_painted_volume_with_preview(make_napari_viewer, qtbot, data_dir, test_output, errors):  # noqa: F811
    folder = Path(glob.glob(str(data_dir / "dicom" / "tcia_btp_PGBM-001" / "04-02-1992*"))[0])
    viewer = make_napari_viewer(show=True)
    image = open_file(viewer, next(folder.glob("*T1post*")))[0]
    tumour = read_any(next(folder.glob("*MaskTumor*"))).data > 0
    mw, ow, fw = docks(viewer)
    add_docks(viewer, mw, ow, fw)
    fw.session.set_model(None)  # no model fits this study: the default starting point is used
    fw.image_combo.setCurrentText(image.name)
    ann = fw.new_labels_layer()
    ann.data[15] = 1  # background only: refused before any process starts, the paint kept
    before = np.array(ann.data)
    assert fw.start() is None and fw.proc is None
    assert any("only background (label 1) is painted" in e for e in errors)
    assert np.array_equal(ann.data, before)

    painted = np.zeros(tumour.shape, np.uint8)
    painted[[15, 16, 18]] = np.where(tumour[[15, 16, 18]], 2, 1)
    ann.data = painted
    viewer.dims.set_current_step(0, 17)  # an unpainted slice: the preview shows it
    fw.minutes.setValue(0.4)
    proc = fw.start()
    assert proc is not None
    assert DEFAULT_START in fw.state_label.text()
    qtbot.waitUntil(lambda: proc.finished, timeout=300_000)
    qtbot.waitUntil(lambda: fw._pending_preview is None, timeout=5_000)  # the last preview is drawn
    kinds = [e["event"] for e in fw.events]
    assert kinds[-1] == "done", fw.events[-1]
    first = kinds.index("checkpoint")
    assert "step" in kinds[first:] and "preview" in kinds, kinds  # written early, then training went on
    preview = viewer.layers[f"{image.name} fine-tune preview"]
    assert preview.data.shape == tumour.shape and not preview.data[[0, 1, 2]].any()
    assert set(np.unique(preview.data[17])) <= {0, 2}
    assert Path(fw.best_path).is_file() and mw.source() == fw.best_path
    assert np.array_equal(ann.data, painted)  # nothing the user painted changed
    shot(viewer, qtbot, test_output, "finetune_adapt_preview")
