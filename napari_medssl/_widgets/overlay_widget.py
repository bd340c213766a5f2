"""The Attention & masking dock: what a self-supervised model looks at and how it masks, over the image.

For the selected image (2D, or the slice on screen): DINO's per-head attention (one image layer with a head
axis, its opacity following the attention) and mass-threshold masks (one Labels layer, outlined); MSMAE's
weight map and mask / throw / keep pattern; MAE's random mask and reconstruction; MiM's nested 3D masks on the
whole volume, outlined per level. The ViT overlays run at a resolution the user picks (default: the image's
own, capped for time, at least a 64 × 64 patch grid); a legend says what the colours are. The dock gathers the
parameters, calls :mod:`napari_medssl.overlay_methods` in a thread worker and adds the returned layers, which
keep the image's scale and translate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_medssl import overlays
from napari_medssl._widgets._common import (
    LayerCombo,
    ModelPicker,
    add_overlay,
    current_plane,
    guarded,
    report_error,
)
from napari_medssl._widgets._session import get_session
from napari_medssl.overlay_methods import METHODS, compute_overlays, method_for, parse_ratios

MODEL_DOCK_ITEM = "Model dock's model"
SSL_FAMILIES = {"dino", "mae", "msmae", "miram", "mim", "vit"}


class OverlayWidget(QWidget):
    """Dock: pick a self-supervised model, a method and its parameters; Show adds the overlay layers."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self._worker: Any = None
        self.last_layers: list[Any] = []

        self.picker = ModelPicker(
            zoo_filter=lambda name: bool(SSL_FAMILIES & set(name.split("_"))),  # scratch_vit_... too
            extra_items={MODEL_DOCK_ITEM: self._model_dock_source},
            browse=False,
            empty_error="no model chosen: pick a zoo model, the Model dock's model or a checkpoint file",
        )
        self.method_combo = QComboBox()
        self.method_combo.addItems(METHODS)
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.head = QSpinBox()
        self.head.setRange(-1, 63)
        self.head.setValue(-1)
        self.head.setSpecialValueText("all heads")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.01, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.6)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.mask_ratio = QDoubleSpinBox()
        self.mask_ratio.setRange(0.0, 0.99)
        self.mask_ratio.setSingleStep(0.05)
        self.mask_ratio.setValue(0.75)
        self.ratios = QLineEdit("0.5, 0.6, 0.5")
        self.resolution = QSpinBox()
        self.resolution.setRange(0, 2048)
        self.resolution.setSingleStep(64)
        self.resolution.setSuffix(" px")
        self.resolution.setSpecialValueText("auto")
        self.resolution.setToolTip(
            "Long side the model runs at. auto: the image's own, at most 512 px on a CPU (1024 on a GPU), "
            "at least 64 patches on the short side. Larger: finer maps, slower."
        )
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.follow = QCheckBox("update when the slice changes")
        self.show_btn = QPushButton("Show")
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.legend = QLabel(overlays.ATTENTION_LEGEND)
        self.legend.setWordWrap(True)

        form = QFormLayout()
        self.picker.add_to(form)
        form.addRow("Overlay", self.method_combo)
        form.addRow("Image", self.image_combo)
        form.addRow("Head", self.head)
        form.addRow("Mass threshold", self.threshold)
        form.addRow("Seed", self.seed)
        form.addRow("Mask ratio", self.mask_ratio)
        form.addRow("MiM ratios", self.ratios)
        form.addRow("Resolution", self.resolution)
        form.addRow("Device", self.device_combo)
        form.addRow(self.follow)
        row = QHBoxLayout()
        row.addWidget(self.show_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(row)
        layout.addWidget(self.legend)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(250)
        self._debounce.timeout.connect(self.show_overlays)
        self.show_btn.clicked.connect(self.show_overlays)
        self.picker.changed.connect(self._on_model_changed)
        self.method_combo.currentTextChanged.connect(self._update_enabled)
        napari_viewer.dims.events.current_step.connect(self._on_step)
        self.refresh_models()

    # -- choices --------------------------------------------------------------------------------------------------
    def refresh_models(self) -> None:
        """List the zoo's self-supervised (ViT-based) models first, then the other entries."""
        self.picker.refresh()

    def select(self, source: str) -> None:
        """Choose a zoo model by name or a checkpoint by path."""
        self.picker.select(source)

    def source(self) -> str:
        """The chosen zoo name or checkpoint path ('' when none)."""
        return self.picker.source()

    def _model_dock_source(self) -> str:
        return self.session.model.source if self.session.model is not None else ""

    def model(self) -> Any:
        """The chosen model, loaded once per (source, device, file time)."""
        return self.picker.model(self.device_combo.currentText())

    def _on_model_changed(self, *_: Any) -> None:
        src = self.source()
        if not src or (self.picker.is_checkpoint() and not Path(src).is_file()):
            return
        try:
            self.method_combo.setCurrentText(method_for(self.model()))
        except Exception as err:
            report_error(err, f"Cannot load {src}")
        self._update_enabled()

    def _update_enabled(self, *_: Any) -> None:
        method = self.method_combo.currentText()
        self.head.setEnabled(method == "DINO attention")
        self.threshold.setEnabled(method == "DINO attention")
        self.mask_ratio.setEnabled(method == "MAE reconstruction")
        self.ratios.setEnabled(method == "MiM nested masks")
        self.seed.setEnabled(method != "DINO attention")
        saliency = method == "Grad-CAM (classifier)"
        self.legend.setText(overlays.SALIENCY_LEGEND if saliency else overlays.ATTENTION_LEGEND)
        self.legend.setVisible(saliency or method in ("DINO attention", "MSMAE masking"))
        self.resolution.setEnabled(method not in ("MiM nested masks", "Grad-CAM (classifier)"))

    def params(self) -> dict[str, Any]:
        """The parameters as plain values."""
        from napari_medssl.inference import pick_device

        return {
            "threshold": float(self.threshold.value()),
            "head": int(self.head.value()),
            "seed": int(self.seed.value()),
            "mask_ratio": float(self.mask_ratio.value()),
            "ratios": parse_ratios(self.ratios.text()),
            "size": int(self.resolution.value()) or None,
            "device": pick_device(self.device_combo.currentText()),
        }

    # -- running --------------------------------------------------------------------------------------------------
    def _on_step(self, *_: Any) -> None:
        if self.follow.isChecked() and self.method_combo.currentText() != "MiM nested masks":
            self._debounce.start()

    def show_overlays(self) -> Any:
        """Compute the chosen overlay in a worker thread and add its layers; return the worker."""
        if self._worker is not None:
            self._debounce.start()  # try again when the running one is done
            return None
        try:
            layer = self.image_combo.layer()
            if layer is None:
                raise ValueError("no image layer: open an image first")
            method = self.method_combo.currentText()
            model = self.model()
            params = self.params()
            plane = volume = None
            if method == "MiM nested masks":
                if layer.ndim != 3 or layer.rgb:
                    raise ValueError(f"MiM's nested masks are 3D: {layer.name!r} is not a volume")
                volume = {
                    "shape": layer.data.shape,
                    "scale": tuple(layer.scale),
                    "translate": tuple(layer.translate),
                }
            else:
                plane = current_plane(self.viewer, layer)
        except Exception as err:
            report_error(err, "Cannot compute the overlay")
            return None
        self.status_label.setText(f"computing {method}…")
        worker = create_worker(guarded, compute_overlays, method, model, plane, volume, params)
        worker.returned.connect(lambda out: self._on_returned(method, out))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()
        return worker

    def _on_returned(self, method: str, out: dict[str, Any]) -> None:
        if "error" in out:
            self.status_label.setText(f"failed: {out['error']}")
            report_error(out["error"], f"{method} failed")
        else:
            self._add(out["result"])

    def _label_head_axis(self, result: list[Any]) -> None:
        """Name the head slider when an overlay brought a head axis (the viewer's first axis)."""
        stacked = [ov for ov in result if len(ov.metadata.get("heads", [])) > 1]
        if stacked and stacked[0].data.ndim == self.viewer.dims.ndim:
            labels = list(self.viewer.dims.axis_labels)
            labels[0] = "head"
            self.viewer.dims.axis_labels = labels

    def _on_finished(self) -> None:
        self._worker = None

    def _add(self, result: list[Any]) -> None:
        try:
            self.last_layers = [add_overlay(self.viewer, ov) for ov in result]
        except Exception as err:  # a layer napari refuses must not break the dock
            self.status_label.setText(f"failed: {err}")
            report_error(err, "Cannot add the overlay layers")
            return
        image = self.image_combo.layer()
        if image is not None:  # keep the image selected, so the next run uses it again
            self.viewer.layers.selection.active = image
        self._label_head_axis(result)
        summary = ", ".join(ov.name for ov in result)
        meta = result[0].metadata if result else {}
        if "grid" in meta:
            gh, gw = meta["grid"]
            iy, ix = meta["input_size"]
            summary += f" — patch grid {gh} × {gw} at {iy} × {ix} px"
        if "tissue_lift" in meta:
            summary += "; tissue lift per head " + ", ".join(f"{v:.2f}" for v in meta["tissue_lift"])
        self.status_label.setText(f"added: {summary}")
        if not result:
            show_info("The overlay produced no layers")
