"""The launcher and the Model dock on a study no shipped model fits (a TCIA brain MR series): nothing is
auto-selected, a warning says why, and the dock shows the misfit of a model picked by hand (screenshot
``widget_domain_misfit.png``); the "Where to paint next" dock's overlay and ranking (``widget_paint_next.png``).
Run under ``xvfb-run -a``."""

from __future__ import annotations

import napari.utils.notifications
import numpy as np
import pytest

from napari_medssl import _launch
from napari_medssl._widgets.model_widget import NO_MODEL

pytestmark = pytest.mark.gui
T1POST = "dicom/tcia_btp_PGBM-001/04-02-1992-FH-HEADBrain Protocols-79896/11-T1post-80644"


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("MEDSSL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MEDSSL_MODELS_DIR", raising=False)  # the shipped zoo only


def test_launch_on_a_tcia_study_selects_no_model_and_the_dock_warns_of_a_misfit(
    make_napari_viewer, qtbot, data_dir, monkeypatch, test_output
):
    warnings: list[str] = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", warnings.append)
    viewer = make_napari_viewer()  # closed, and checked for leaks, by the fixture
    _launch.setup(viewer, _launch.parse_args(["--image", str(data_dir / T1POST), "--device", "cpu"]))
    widgets = {name.split(" (")[0]: w for name, w in viewer.window.dock_widgets.items()}
    mw = widgets["Model"]
    assert mw.picker.combo.currentText() == NO_MODEL and mw.source() == ""
    assert mw.domain_fit() is None and mw.fit_label.text() == ""
    assert len(warnings) == 1 and warnings[0].startswith("No shipped model fits T1post")
    assert "1 mm T1 hippocampus crops" in warnings[0] and "0.688×0.688×6.5 mm brain MR" in warnings[0]
    ann = widgets["Fine-tune"].ann_combo.layer()  # ready to paint the new structure
    assert ann is not None and ann.data.shape == (24, 320, 260)

    # picked by hand: allowed, and the dock says it does not fit
    mw.select("unet_tiny_hippocampus", device="cpu")
    fit = mw.domain_fit()
    assert fit is not None and not fit.fits
    text = mw.fit_label.text()
    assert "Does not fit this image" in text and "1 mm T1 hippocampus crops" in text and "brain MR" in text
    assert "field of view" in mw.fit_label.toolTip()  # the reasons
    qtbot.wait(300)
    path = test_output / "widget_domain_misfit.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000

    crop = data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz"
    hippo = viewer.open(str(crop), plugin="napari-medssl")
    mw.image_combo.setCurrentText(hippo[0].name)
    assert mw.domain_fit().fits and "fits this image" in mw.fit_label.text()


def test_paint_next_dock_overlays_uncertainty_and_ranks_unpainted_slices(
    make_napari_viewer, qtbot, data_dir, test_output
):
    from napari_medssl._widgets import ModelWidget, PaintNextWidget

    viewer = make_napari_viewer()
    image = viewer.open(
        str(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz"), plugin="napari-medssl"
    )[0]
    mw, pw = ModelWidget(viewer), PaintNextWidget(viewer)
    viewer.window.add_dock_widget(mw, name="Model")
    viewer.window.add_dock_widget(pw, name="Where to paint next", tabify=False)
    mw.select("unet_tiny_hippocampus", device="cpu")
    assert pw.model_label.text() == "unet_tiny_hippocampus"
    painted = viewer.add_labels(np.zeros(image.data.shape, np.uint8), name="annotations", scale=image.scale)
    painted.data[17, 10:20, 10:20] = 1
    pw.image_combo.setCurrentText(image.name)
    pw.ann_combo.setCurrentText("annotations")
    pw.run()
    qtbot.waitUntil(lambda: pw._worker is None, timeout=120_000)
    overlay = viewer.layers[f"{image.name} uncertainty"]
    assert overlay.data.shape == image.data.shape and overlay.blending == "translucent"
    assert overlay.colormap.colors[0][3] == 0  # transparent where the model is sure
    assert overlay.metadata["medssl"]["method"].startswith("uncertainty (tta")
    ranked = [i for i, _ in pw.ranking]
    assert 17 not in ranked and len(ranked) == image.data.shape[0] - 1
    assert pw.slice_list.count() == 10 and pw.slice_list.item(0).text().startswith(f"1. slice {ranked[0]}:")
    pw.slice_list.setCurrentRow(0)
    assert viewer.dims.current_step[0] == ranked[0]
    qtbot.wait(300)
    path = test_output / "widget_paint_next.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000


def test_model_dock_runs_an_adapted_checkpoint_with_the_image_geometry(
    make_napari_viewer, qtbot, data_dir, tmp_path
):
    """A checkpoint adapted from painted slices, run from the Model dock on the whole study: the dock passes the
    layer's spacing and affine, so the labels equal ``medssl predict``'s (the library with the volume's
    geometry) and stay near the paint (the recorded ROI: only slices within near_mm of the painted slice)."""
    from napari_medssl import inference
    from napari_medssl._widgets import ModelWidget
    from napari_medssl.engine import adapt
    from napari_medssl.engine.readers import read_any

    vol = read_any(data_dir / T1POST)
    painted = np.zeros(vol.data.shape, np.uint8)
    painted[12] = 1
    painted[12, 150:190, 150:190] = 2
    cfg = adapt.AdaptConfig(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, crop=64)
    events = list(adapt.adapt_events(vol.data, painted, cfg, tuple(vol.spacing[-2:]), vol.affine))
    ckpt = events[-1]["best_path"]

    viewer = make_napari_viewer()
    image = viewer.open(str(data_dir / T1POST), plugin="napari-medssl")[0]
    mw = ModelWidget(viewer)
    viewer.window.add_dock_widget(mw, name="Model")
    mw.select(ckpt, device="cpu")
    mw.image_combo.setCurrentText(image.name)
    mw.scope_combo.setCurrentText("whole volume")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=120_000)
    seg = viewer.layers[f"{image.name} segmentation"].data
    expected = inference.segment(mw.model(), vol.data, spacing=vol.spacing, affine=vol.affine)
    assert np.array_equal(seg, expected)
    far = np.ones(len(seg), bool)
    far[11:14] = False  # 6.5 mm slices: only the painted slice and its neighbours lie within 10 mm
    assert not seg[far].any()
