"""The "Where to paint next" dock: the Model dock's segmenter's uncertainty as an overlay, slices ranked by it.

Score runs :func:`napari_medssl.uncertainty.uncertainty` (test-time augmentation, or an ensemble's members) in
a worker thread, puts the map in one Image layer (transparent where the model is sure) and lists the slices
along the viewer's slicing axis by their mean uncertainty, leaving out slices already painted in the chosen
annotations layer. Clicking a slice in the list shows it. The dock only gathers values and shows results.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps import Colormap
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_medssl._widgets._common import LayerCombo, Relay, guarded, load_model, report_error
from napari_medssl._widgets._session import get_session
from napari_medssl.io.layers import affine_from_layer

TOP = 10
UNCERTAINTY_COLORMAP = Colormap(
    [[1.0, 0.9, 0.0, 0.0], [1.0, 0.6, 0.0, 0.6], [1.0, 0.0, 0.3, 0.95]], name="medssl uncertainty"
)
"""Transparent where the model is sure, yellow to red where it is not."""


class PaintNextWidget(QWidget):
    """Dock: Score → an uncertainty overlay and the unpainted slices ranked by it."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self._worker: Any = None
        self._cancel = threading.Event()
        self._relay = Relay()
        self.ranking: list[tuple[int, float]] = []
        self.axis = 0

        self.model_label = QLabel()
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.ann_combo = LayerCombo(napari_viewer, Labels, allow_none=True)
        self.score_combo = QComboBox()
        self.score_combo.addItems(["entropy", "mutual_information"])
        self.score_combo.setToolTip(
            "entropy: how unsure the averaged prediction is (total); mutual_information: how much the "
            "augmented predictions (or ensemble members) disagree (epistemic)"
        )
        self.run_btn = QPushButton("Score slices")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.slice_list = QListWidget()
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Model", self.model_label)
        form.addRow("Image", self.image_combo)
        form.addRow("Painted", self.ann_combo)
        form.addRow("Score", self.score_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(QLabel("Slices to paint next (most uncertain first):"))
        layout.addWidget(self.slice_list)
        layout.addWidget(self.status_label)

        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self._cancel.set)
        self.slice_list.currentRowChanged.connect(self.go_to)
        self._relay.progressed.connect(self._on_progress)
        self.session.model_changed.connect(self._on_model)
        self._on_model(self.session.model)

    def _on_model(self, choice: Any) -> None:
        self.model_label.setText(
            choice.label or choice.source if choice is not None else "(choose one in Model)"
        )

    def _slice_axis(self, layer: Image) -> int:
        """The layer axis the viewer slices along now (0 in the usual 2D view of a volume)."""
        offset = self.viewer.dims.ndim - layer.ndim
        hidden = [d - offset for d in self.viewer.dims.not_displayed if d - offset >= 0]
        return hidden[-1] if hidden else 0

    def run(self) -> Any:
        """Score the chosen image with the Model dock's segmenter (worker thread); return the worker."""
        if self._worker is not None:
            return None
        try:
            choice = self.session.model
            layer = self.image_combo.layer()
            if choice is None:
                raise ValueError("no model: choose a segmenter in the Model dock (or fine-tune one) first")
            if layer is None or layer.ndim != 3 or layer.rgb:
                raise ValueError("open a gray (Z, Y, X) volume: slices are ranked along one of its axes")
            model = load_model(choice.source, choice.device)
            self.axis = self._slice_axis(layer)
            spacing = (layer.metadata or {}).get("spacing")
            affine = affine_from_layer(layer.metadata, layer.data.shape, layer.scale, layer.translate)
        except Exception as err:
            report_error(err, "Cannot score the slices")
            return None
        from napari_medssl.uncertainty import uncertainty

        self._cancel.clear()
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.status_label.setText("scoring…")
        worker = create_worker(
            guarded,
            lambda: uncertainty(
                model,
                np.asarray(layer.data),
                device=choice.device,
                slice_axis=self.axis,
                spacing=tuple(spacing) if spacing and len(spacing) == 3 else None,
                progress=self._relay.progressed.emit,
                cancel=self._cancel,
                affine=affine,
            ),
        )
        worker.returned.connect(lambda out: self._on_returned(layer, out))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()
        return worker

    def _on_progress(self, done: int, total: int) -> None:
        self.status_label.setText(f"scoring… {done}/{total} forward passes")

    def _on_finished(self) -> None:
        self._worker = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _on_returned(self, layer: Image, out: dict[str, Any]) -> None:
        if "error" in out:
            self.status_label.setText(f"failed: {out['error']}")
            report_error(out["error"], "Scoring failed")
            return
        try:
            self.show_result(layer, out["result"])
        except Exception as err:
            report_error(err, "Cannot show the uncertainty")

    def show_result(self, layer: Image, result: Any) -> None:
        """Put the map into the overlay layer and the ranking into the list (GUI thread)."""
        from napari_medssl.uncertainty import rank_slices

        score = result.score(self.score_combo.currentText())
        ann = self.ann_combo.layer()
        painted = np.asarray(ann.data) if ann is not None and ann.data.shape == score.shape else None
        self.ranking = rank_slices(score, self.axis, painted)
        name = f"{layer.name} uncertainty"
        meta = {"medssl": {"method": f"uncertainty ({result.method}: {', '.join(result.samples)})"}}
        hi = max(float(score.max()), 1e-3)
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == score.shape:
            overlay = self.viewer.layers[name]
            overlay.data = score
            overlay.contrast_limits = (0.0, hi)
        else:
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            overlay = self.viewer.add_image(
                score,
                name=name,
                scale=layer.scale,
                translate=layer.translate,
                colormap=UNCERTAINTY_COLORMAP,
                contrast_limits=(0.0, hi),
                blending="translucent",
                metadata=meta,
            )
        self.slice_list.clear()
        for i, (index, value) in enumerate(self.ranking[:TOP]):
            self.slice_list.addItem(f"{i + 1}. slice {index}: {value:.3f}")
        skipped = score.shape[self.axis] - len(self.ranking)
        self.status_label.setText(
            f"{result.method} over {len(result.samples)} samples; {skipped} painted slice(s) left out"
        )
        self.viewer.layers.selection.active = layer

    def go_to(self, row: int) -> None:
        """Show the slice of ranking row ``row``."""
        if 0 <= row < len(self.ranking):
            layer = self.image_combo.layer()
            offset = self.viewer.dims.ndim - (layer.ndim if layer is not None else 3)
            self.viewer.dims.set_current_step(self.axis + offset, self.ranking[row][0])

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt override)
        self._cancel.set()
        super().closeEvent(event)
