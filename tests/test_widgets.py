"""The three docks driven end to end in a real napari viewer on real images (run under ``xvfb-run -a``).

Screenshots of each dock in use go to the ``test_output`` folder (``widget_*.png``).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from napari.layers import Labels
from qtpy.QtCore import Qt

from napari_medssl import autosave, inference, zoo
from napari_medssl._reader import read_layers
from napari_medssl._widgets import FinetuneWidget, ModelWidget, OverlayWidget, _common
from napari_medssl.models.registry import create_model, save_model

pytestmark = pytest.mark.gui
HIPPO_CLASSES = ["background", "anterior", "posterior"]


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSSL_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    monkeypatch.setenv("MEDSSL_RUNS_DIR", str(tmp_path / "runs"))


TRAINED_WITH_X_FLIPS = {"augment": True, "flip_axes": [-1]}  # what an engine run records in its checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Untrained tiny models saved as checkpoints (the zoo is trained by another job)."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    out = {}
    for key, name, kw, extra in [
        (
            "unet",
            "unet_tiny",
            {"levels": 3},
            {"class_names": HIPPO_CLASSES, "train_config": TRAINED_WITH_X_FLIPS},
        ),
        ("vitcls", "vit_tiny", {"num_classes": 2, "depth": 2}, {"class_names": ["normal", "abnormal"]}),
        ("dino", "dino_tiny", {"depth": 2, "out_dim": 256, "hidden_dim": 64}, {}),
        ("msmae", "msmae_tiny", {"depth": 2}, {}),
        ("mae", "mae_tiny", {"depth": 2}, {}),
        ("mim", "mim_tiny", {}, {}),
    ]:
        out[key] = str(save_model(create_model(name, **kw), d / f"{key}.safetensors", extra=extra))
    return out


@pytest.fixture
def errors(monkeypatch):
    shown: list[str] = []
    monkeypatch.setattr(_common, "show_error", shown.append)
    return shown


def open_file(viewer, path):
    layers = []
    for data, kwargs, kind in read_layers(str(path)):
        layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    return layers


def docks(viewer):
    return ModelWidget(viewer), OverlayWidget(viewer), FinetuneWidget(viewer)


def add_docks(viewer, *widgets, names=("Model", "Attention & masking", "Fine-tune")):
    for w, name in zip(widgets, names):
        viewer.window.add_dock_widget(w, name=name, area="right", tabify=name == "Fine-tune")


def shot(viewer, qtbot, folder: Path, name: str) -> Path:
    qtbot.wait(300)
    path = folder / f"widget_{name}.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000
    return path


def dice(pred: np.ndarray, truth: np.ndarray, classes=(1, 2)) -> float:
    scores = []
    for k in classes:
        p, t = pred == k, truth == k
        scores.append(2 * (p & t).sum() / max(1, p.sum() + t.sum()))
    return float(np.mean(scores))


def segment_zoo_volume(viewer, qtbot, mw, model: str, image):
    """Pick zoo ``model`` in the Model dock (its card names the hippocampus classes), run it on the whole
    ``image`` volume; the segmentation layer, checked equal to the library's labels, and the image array."""
    mw.select(model, device="cpu")
    assert "anterior" in mw.card_label.text()
    mw.scope_combo.setCurrentText("whole volume")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=120_000)
    seg = viewer.layers[f"{image.name} segmentation"]
    img = np.asarray(image.data)
    assert np.array_equal(seg.data, inference.segment(mw.model(), img))
    return seg, img


def test_model_dock_segments_slice_and_volume_and_cancels(
    make_napari_viewer, qtbot, data_dir, ckpts, test_output, errors
):
    viewer = make_napari_viewer(show=True)
    image = open_file(viewer, data_dir / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz")[0]
    mw = ModelWidget(viewer)
    add_docks(viewer, mw)
    mw.select(ckpts["unet"], device="cpu")
    assert "anterior" in mw.card_label.text() and "segment" in mw.card_label.text()
    z = 17
    viewer.dims.set_current_step(0, z)
    mw.scope_combo.setCurrentText("current slice")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    seg = viewer.layers[f"{image.name} segmentation"]
    model = mw.model()
    img = np.asarray(image.data)
    assert seg.data.shape == img.shape
    assert tuple(seg.scale) == tuple(image.scale) and tuple(seg.translate) == tuple(image.translate)
    assert np.array_equal(seg.data[z], inference.segment(model, img[z]))
    assert not seg.data[:z].any() and not seg.data[z + 1 :].any()
    assert seg.metadata["medssl"]["class_names"] == HIPPO_CLASSES

    mw.scope_combo.setCurrentText("whole volume")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    assert np.array_equal(seg.data, inference.segment(model, img))
    shot(viewer, qtbot, test_output, "model_segment")

    # mirror TTA: the slice is segmented with its X-mirrored copy too (the checkpoint was trained with X flips)
    mw.tta_check.setChecked(True)
    mw.scope_combo.setCurrentText("current slice")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    assert inference.training_flip_axes(model) == (-1,)
    assert np.array_equal(seg.data[z], inference.segment(model, img[z], mirror=(-1,)))
    assert mw.status_label.text() == "done"
    # a checkpoint trained without random flips has nothing to mirror: plain labels, and the dock says why
    trained_with_flips = model.spec
    model.spec = trained_with_flips.replace(flip_axes=())
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    assert np.array_equal(seg.data[z], inference.segment(model, img[z]))
    assert "trained without random flips" in mw.status_label.text()
    model.spec = trained_with_flips
    mw.tta_check.setChecked(False)

    # Cancel: set the flag from the worker's first progress report (a direct connection, no race)
    mw._relay.progressed.connect(lambda *_: mw._cancel.set(), Qt.ConnectionType.DirectConnection)
    before = seg.data.copy()
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    assert mw.status_label.text() == "cancelled" and np.array_equal(seg.data, before)
    assert mw.run_btn.isEnabled() and not mw.cancel_btn.isEnabled()

    # a missing checkpoint is a notification, not a crash
    mw.select("/nonexistent/model.safetensors")
    assert mw.run() is None and any("nonexistent" in e for e in errors)


def test_model_dock_classifies_a_mammogram(make_napari_viewer, qtbot, data_dir, ckpts, test_output):
    viewer = make_napari_viewer(show=True)
    (image,) = open_file(viewer, data_dir / "mammography_mias" / "mdb005.png")
    mw = ModelWidget(viewer)
    add_docks(viewer, mw)
    mw.select(ckpts["vitcls"], device="cpu")
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    result = image.metadata["medssl"]["classification"]
    expected = inference.classify(mw.model(), np.asarray(image.data))
    assert result["class_names"] == ["normal", "abnormal"]
    assert np.allclose(result["probabilities"], expected, atol=1e-5)
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert result["prediction"] == ["normal", "abnormal"][int(np.argmax(expected))]
    assert "abnormal" in mw.result_label.text()
    shot(viewer, qtbot, test_output, "model_classify")


def test_overlay_dock_dino_msmae_mae_keep_the_image_grid(
    make_napari_viewer, qtbot, data_dir, ckpts, test_output
):
    viewer = make_napari_viewer(show=True)
    image = open_file(viewer, data_dir / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz")[0]
    ow = OverlayWidget(viewer)
    add_docks(viewer, ow, names=("Attention & masking",))
    ow.resolution.setValue(128)  # a 16 x 11 patch grid on these 51 x 35 slices: quick (the default is 64 x 64)
    z = 20
    viewer.dims.set_current_step(0, z)
    z_world = image.translate[0] + z * image.scale[0]
    expected = {"dino": "DINO attention", "msmae": "MSMAE masking", "mae": "MAE reconstruction"}
    for key, method in expected.items():
        ow.select(ckpts[key])
        assert ow.method_combo.currentText() == method
        ow.show_overlays()
        qtbot.waitUntil(lambda: ow._worker is None, timeout=60_000)
        assert ow.last_layers, ow.status_label.text()
        for layer in ow.last_layers:
            lead = layer.ndim - image.ndim  # DINO's layers carry a leading head axis
            assert layer.data.shape[lead:] == (1, *image.data.shape[1:])
            assert tuple(layer.scale)[lead:] == tuple(image.scale)
            assert tuple(layer.translate)[lead:] == (z_world, *image.translate[1:])
        if key == "dino":
            (att,) = [ly for ly in ow.last_layers if ly.name == "attention"]
            assert att.data.shape[0] == 3 and att.blending == "translucent"
            shot(viewer, qtbot, test_output, "overlay_dino")
            for ly in ow.last_layers:
                ly.visible = False
        if key == "msmae":
            labels = viewer.layers["MSMAE keep/mask/throw (seed 0)"]
            assert set(np.unique(labels.data)) == {1, 2, 3}
            shot(viewer, qtbot, test_output, "overlay_msmae")
            for ly in ow.last_layers:
                ly.visible = False
    mask = viewer.layers["MAE mask (75%, seed 0)"]
    assert abs((mask.data > 0).mean() - 0.75) < 0.08
    shot(viewer, qtbot, test_output, "overlay_mae")
    # following the slice: moving to another slice recomputes the overlay there
    ow.follow.setChecked(True)
    viewer.dims.set_current_step(viewer.dims.ndim - 3, z + 2)  # Z: the attention layer added a head axis
    qtbot.waitUntil(
        lambda: ow._worker is None and viewer.layers["MAE mask (75%, seed 0)"].translate[0] == z_world + 2,
        timeout=60_000,
    )
    ow.follow.setChecked(False)
    for ly in list(viewer.layers)[1:]:
        ly.visible = False
    # MiM: nested 3D masks over the whole volume, on the volume's grid
    ow.select(ckpts["mim"])
    assert ow.method_combo.currentText() == "MiM nested masks"
    ow.seed.setValue(1)
    ow.show_overlays()
    qtbot.waitUntil(lambda: ow._worker is None, timeout=60_000)
    (mim,) = ow.last_layers
    assert mim.data.shape == image.data.shape and set(np.unique(mim.data)) == {0, 1, 2, 3}
    assert tuple(mim.scale) == tuple(image.scale) and tuple(mim.translate) == tuple(image.translate)
    shot(viewer, qtbot, test_output, "overlay_mim")


def paint_slices(truth: np.ndarray, every: int = 3) -> tuple[np.ndarray, list[int]]:
    painted = np.zeros(truth.shape, np.uint8)
    zs = [z for z in range(truth.shape[0]) if truth[z].any()][::every]
    painted[zs] = truth[zs] + 1
    return painted, zs


def test_finetune_raises_dice_on_painted_slices(make_napari_viewer, qtbot, data_dir, ckpts, test_output):
    viewer = make_napari_viewer(show=True)
    image = open_file(viewer, data_dir / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz")[0]
    truth = np.asarray(
        open_file(viewer, data_dir / "hippocampus" / "labelsTr" / "hippocampus_003.nii.gz")[0].data
    )
    mw, ow, fw = docks(viewer)
    add_docks(viewer, mw, ow, fw)
    mw.select(ckpts["unet"], device="cpu")
    assert "2 = anterior" in fw.help_label.text()
    fw.image_combo.setCurrentText(image.name)
    ann = fw.new_labels_layer()
    painted, zs = paint_slices(truth)
    ann.data = painted
    img = np.asarray(image.data)
    before = dice(inference.segment(mw.model(), img)[zs], truth[zs])
    fw.steps.setValue(40)
    fw.batch.setValue(4)
    fw.lr.setValue(3e-3)
    fw.val_every.setValue(20)
    fw.hold_out.setChecked(False)
    proc = fw.start()
    assert proc is not None and proc.pid != os.getpid()
    qtbot.waitUntil(lambda: proc.finished, timeout=240_000)
    assert fw.events[-1]["event"] == "done", fw.events[-1]
    assert len(fw.plot.points("loss")) == 40 and len(fw.plot.points("val")) == 2
    assert "ETA" not in fw.status_label.text() and "done at step 40" in fw.status_label.text()
    # the curve lives in its own top-level window (repaints there leave napari's OpenGL canvas alone)
    assert fw.monitor.isWindow() and fw.monitor.isVisible() and fw.monitor.window() is not fw.window()
    assert fw.state_label.text() == fw.status_label.text()
    assert mw.source() == fw.best_path and Path(fw.best_path).is_file()
    tuned = zoo.load(fw.best_path, device="cpu")
    assert tuned.checkpoint_extra["class_names"] == HIPPO_CLASSES
    after = dice(inference.segment(tuned, img)[zs], truth[zs])
    assert after > before + 0.1, (before, after)
    viewer.dims.set_current_step(0, zs[len(zs) // 2])
    mw.run()
    qtbot.waitUntil(lambda: mw._worker is None, timeout=60_000)
    shot(viewer, qtbot, test_output, "finetune_done")
    fw.monitor.grab().save(str(test_output / "widget_finetune_progress_window.png"))


def test_finetune_stop_autosave_and_restore(make_napari_viewer, qtbot, data_dir, ckpts, tmp_path):
    viewer = make_napari_viewer(show=True)
    open_file(viewer, data_dir / "hippocampus" / "imagesTr" / "hippocampus_004.nii.gz")
    mw, _, fw = docks(viewer)
    add_docks(viewer, mw, fw, names=("Model", "Fine-tune"))
    mw.select(ckpts["unet"], device="cpu")
    ann = fw.new_labels_layer()
    ann.paint((10, 20, 15), 2)  # a user's brush stroke: autosaved after a short pause
    ann.paint((12, 22, 17), 3)
    qtbot.waitUntil(lambda: bool(list((tmp_path / "autosave").glob("*.npz"))), timeout=10_000)
    (saved,) = (tmp_path / "autosave").glob("*.npz")
    data = np.load(saved)["labels"]
    assert data[10].any() and data[12].any() and np.array_equal(data, ann.data)

    fw.steps.setValue(100_000)
    proc = fw.start()
    qtbot.waitUntil(lambda: len(fw.plot.points("loss")) >= 2, timeout=120_000)
    assert "ETA" in fw.status_label.text()
    t0 = time.perf_counter()
    fw.stop_btn.click()
    assert time.perf_counter() - t0 < 2.0
    assert not proc.is_alive() and fw.status_label.text().startswith("stopped")
    assert fw.start_btn.isEnabled() and not fw.stop_btn.isEnabled()

    # a session that crashed left an autosave behind: a new dock offers it and restores it
    script = textwrap.dedent(
        """
        import os
        import numpy as np
        from napari_medssl import autosave
        labels = np.zeros((35, 51, 35), np.uint8)
        labels[5, 10:20, 10:20] = 2
        autosave.save_labels(labels, "hippocampus_004", "lost work", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
        os._exit(1)
        """
    )
    subprocess.run([sys.executable, "-c", script], env=dict(os.environ), timeout=60)
    fresh = FinetuneWidget(viewer)
    assert fresh.autosave_combo.itemText(0).startswith("⚠ crash: lost work")
    restored = fresh.restore_selected()
    assert restored.name == "lost work (restored)" and restored.data[5, 10:20, 10:20].min() == 2
    assert tuple(restored.translate) == (1.0, 1.0, 1.0)


def test_zoo_ensemble_segments_in_the_model_dock_and_is_not_fine_tuned(
    make_napari_viewer, qtbot, data_dir, test_output, errors
):
    """The shipped ensemble (2D U-Net + MiM + 3D U-Net) on a real volume: the same labels as the library, the
    class names from its card; the Fine-tune dock says to fine-tune a member instead and starts nothing."""
    viewer = make_napari_viewer(show=True)
    image = open_file(viewer, data_dir / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz")[0]
    mw, ow, fw = docks(viewer)
    add_docks(viewer, mw, ow, fw)
    seg, img = segment_zoo_volume(viewer, qtbot, mw, "ensemble_tiny_hippocampus", image)
    assert set(np.unique(seg.data)) == {0, 1, 2}
    assert seg.metadata["medssl"]["class_names"] == ["background", "anterior", "posterior"]
    viewer.dims.set_current_step(0, img.shape[0] // 2)
    shot(viewer, qtbot, test_output, "model_ensemble_segment")
    assert "not trained or fine-tuned itself" in fw.help_label.text()
    fw.image_combo.setCurrentText(image.name)
    fw.new_labels_layer()
    assert fw.start() is None and fw.proc is None
    assert any("not trained or fine-tuned itself" in e for e in errors)


def test_zoo_emfformer_segments_a_real_volume_in_the_model_dock(
    make_napari_viewer, qtbot, data_dir, test_output
):
    """The shipped EMF-former (distilled, with its own decoder options in the checkpoint) in the Model dock on a
    validation volume: the library's labels, close to the ground truth. It was trained without random flips,
    so Mirror TTA leaves its labels as they are and the dock says why."""
    case = "hippocampus_001"  # a validation case of the zoo split
    viewer = make_napari_viewer(show=True)
    image = open_file(viewer, data_dir / "hippocampus" / "imagesTr" / f"{case}.nii.gz")[0]
    truth_layer = open_file(viewer, data_dir / "hippocampus" / "labelsTr" / f"{case}.nii.gz")[0]
    mw = ModelWidget(viewer)
    add_docks(viewer, mw, names=("Model",))
    mw.tta_check.setChecked(True)
    seg, img = segment_zoo_volume(viewer, qtbot, mw, "emfformer_tiny_hippocampus", image)
    assert "trained without random flips" in mw.status_label.text()
    truth = np.asarray(truth_layer.data)
    assert truth.shape == seg.data.shape
    assert dice(seg.data, truth) > 0.8  # the card's mean Dice over the 40 validation volumes is 0.877
    truth_layer.visible = False
    viewer.dims.set_current_step(0, img.shape[0] // 2)
    shot(viewer, qtbot, test_output, "model_emfformer_zoo_segment")


def test_shipped_dino_attends_to_the_breast_on_a_real_mammogram(
    make_napari_viewer, qtbot, data_dir, test_output
):
    """The zoo's DINO (GPU-trained) in the Attention dock on mini-MIAS mdb005: one head covers the breast
    (tissue lift well above 1, i.e. on tissue rather than background), as models/README.md reports."""
    viewer = make_napari_viewer(show=True)
    open_file(viewer, data_dir / "mammography_mias" / "mdb005.png")
    ow = OverlayWidget(viewer)
    add_docks(viewer, ow, names=("Attention & masking",))
    ow.select("dino_tiny_medical")
    assert ow.method_combo.currentText() == "DINO attention"
    ow.show_overlays()
    qtbot.waitUntil(lambda: ow._worker is None, timeout=120_000)
    att, mask = ow.last_layers  # one layer per kind, the heads on a slider
    assert (
        att.name == "attention" and att.data.shape == (3, 1024, 1024) and mask.data.shape == (3, 1024, 1024)
    )
    meta = att.metadata["medssl"]
    assert meta["grid"] == [64, 64] and meta["input_size"] == [512, 512]  # the default on a CPU
    assert att.colormap.colors[0][3] == 0.0 and att.colormap.colors[-1][3] > 0.5  # opacity follows attention
    assert viewer.dims.axis_labels[0] == "head" and "not an explanation" in ow.legend.text()
    lift = meta["tissue_lift"]
    assert max(lift) > 1.5 and min(lift) < 1.0, lift  # a tissue head and a background/marker head
    assert "64 × 64" in ow.status_label.text()
    viewer.dims.set_current_step(0, int(np.argmax(lift)))
    mask.visible = False
    shot(viewer, qtbot, test_output, "overlay_dino_zoo_mammogram")


@pytest.fixture
def collect_viewer():
    """A full garbage collection after a test that made its own viewer (not through make_napari_viewer): its
    closed viewer sits in reference cycles that napari's per-test leak check (generation-1 collection only)
    would otherwise find at the next viewer test and report as leaked."""
    yield
    gc.collect()


def test_launch_opens_docks_image_and_zoo_model_and_closing_stops_training(
    qtbot, data_dir, ckpts, tmp_path, monkeypatch, test_output, collect_viewer
):
    from napari_medssl import _launch

    zoo_dir = tmp_path / "zoo"
    common = dict(command="test", metrics_command="test", licence="test", dest=zoo_dir)
    zoo.publish(
        ckpts["unet"],
        "unet_tiny_hippocampus",
        description="untrained test U-Net",
        metrics={"mean_dice": 0.0},
        data={"name": "MSD hippocampus"},
        **common,
    )
    zoo.publish(
        ckpts["vitcls"],
        "vit_tiny_mias",
        description="untrained test ViT",
        metrics={"auc": 0.5},
        data={"name": "mini-MIAS"},
        **common,
    )
    monkeypatch.setenv("MEDSSL_MODELS_DIR", str(zoo_dir))
    monkeypatch.setenv("MEDSSL_DATA_DIR", str(data_dir))
    viewer = _launch.main(["--device", "cpu"], run=False)
    try:
        widgets = {name.split(" (")[0]: w for name, w in viewer.window.dock_widgets.items()}
        assert set(widgets) == {"Model", "Attention & masking", "Fine-tune", "Where to paint next"}
        mw, fw = widgets["Model"], widgets["Fine-tune"]
        # the best hippocampus segmenter in the zoo that can be fine-tuned (ours, or a trained one in models/;
        # not the ensemble, which the Fine-tune dock does not train)
        chosen = mw.source()
        cards = {n: zoo.card(n) for n in zoo.list_zoo()}
        assert "hippocampus" in chosen and cards[chosen]["task"] == "segment"
        dice_of = {
            n: c["metrics"].get("mean_dice", 0)
            for n, c in cards.items()
            if "hippocampus" in n and c["architecture"]["name"] != "ensemble_mean"
        }
        assert cards[chosen]["metrics"]["mean_dice"] == max(dice_of.values())
        assert cards[chosen]["data"]["name"] in mw.card_label.text() and "mean_dice" in mw.card_label.text()
        image = viewer.layers[mw.image_combo.currentText()]
        assert image.ndim == 3 and "hippocampus" in image.name
        shot(viewer, qtbot, test_output, "launch")
        ann = fw.ann_combo.layer()
        assert ann is not None and ann.name == f"{image.name} annotations" and not ann.data.any()
        truth = next(ly for ly in viewer.layers if isinstance(ly, Labels) and ly.data.max() > 0)
        ann.data = paint_slices(np.asarray(truth.data))[0]
        fw.steps.setValue(100_000)
        proc = fw.start()
        qtbot.waitUntil(lambda: len(fw.plot.points("loss")) >= 1, timeout=120_000)
    finally:
        viewer.close()
    assert not proc.is_alive()
    assert all(entry.header["clean"] for entry in autosave.list_autosaves())
