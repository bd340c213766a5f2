"""The Model dock: pick a zoo model or a checkpoint, run it on the selected image layer.

A classifier's class probabilities appear in the dock and in the image layer's ``metadata["medssl"]``; a
segmenter's labels go into a Labels layer on the image's grid (the current 2D slice, or the whole volume).
Inference runs in a napari thread worker with a progress bar and a Cancel button; the dock only gathers values
and calls :mod:`napari_medssl.inference`.
"""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_medssl._widgets._common import CHECKPOINT_ITEM as CHECKPOINT_ITEM
from napari_medssl._widgets._common import (
    LayerCombo,
    ModelPicker,
    Relay,
    current_plane,
    guarded,
    report_error,
)
from napari_medssl._widgets._common import load_model as load_model
from napari_medssl._widgets._common import zoo_entries as zoo_entries
from napari_medssl._widgets._session import ModelChoice, get_session
from napari_medssl.io import grid_metadata
from napari_medssl.io.layers import affine_from_layer

SCOPES = ("current slice", "whole volume")
NO_MODEL = "(no model)"
"""The Model dock's entry for "nothing chosen" (the launcher selects it when no shipped model fits)."""
HEADLINE_METRICS = ("mean_dice", "auc", "balanced_accuracy", "accuracy", "mean_iou")


def summarize_card(card: dict[str, Any], spec: Any = None) -> str:
    """A short HTML summary of a model card (or, without one, of the model's facts: a ``ModelSpec``)."""
    if not card and spec is None:
        return "<i>no model card</i>"
    rows: list[tuple[str, str]] = []
    metrics = card.get("metrics")
    if isinstance(metrics, dict):
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not k.startswith("n_")}
        order = sorted(
            shown,
            key=lambda k: (
                k not in HEADLINE_METRICS,
                HEADLINE_METRICS.index(k) if k in HEADLINE_METRICS else 0,
            ),
        )
        if shown:
            rows.append(("metrics", ", ".join(f"{k} {shown[k]:.3g}" for k in order[:4])))
    classes = spec.names() if spec is not None else []
    if classes:
        rows.append(("classes", ", ".join(classes)))
    for key in ("task", "architecture", "data", "description", "licence"):
        val = card.get(key)
        if isinstance(val, dict):
            val = val.get("name") or _short(val)
        if val:
            text = val if isinstance(val, str) else _short(val)
            rows.append((key, text if len(text) <= 90 else text[:88] + "…"))
    if spec is not None and not card:  # a checkpoint file: what its metadata says
        rows.append(("model", spec.name))
        rows.append(("task", str(spec.task)))
        rows.append(("input", f"{spec.spatial_dims}D, {spec.in_chans} channel(s)"))
    seen: set[str] = set()
    lines = []
    for k, v in rows:
        if k in seen:
            continue
        seen.add(k)
        lines.append(f"<b>{html.escape(k)}</b>: {html.escape(str(v))}")
    return "<br>".join(lines)


def _short(val: Any) -> str:
    if isinstance(val, dict):
        return ", ".join(f"{k}={v}" for k, v in list(val.items())[:4])
    if isinstance(val, list | tuple):
        return ", ".join(str(v) for v in val[:6])
    return str(val)


def run_model(
    model: Any,
    image: np.ndarray,
    rgb: bool,
    device: str,
    progress_cb: Any,
    cancel: Any,
    mirror: tuple[int, ...] = (),
    geometry: dict[str, Any] | None = None,
) -> np.ndarray:
    """Probabilities (classifier) or labels (segmenter) for an image, plane or volume (worker thread):
    :func:`napari_medssl.inference.predict`.

    ``mirror``: segmenters average with copies mirrored along these axes (test-time augmentation, see
    :mod:`napari_medssl.inference`; the dock passes the axes the model's training flipped).
    ``geometry``: ``spacing`` (mm per axis) and ``affine`` (index → RAS) of the image, which a segmenter
    adapted from painted slices uses as ``medssl predict`` does (its in-plane spacing, where it was painted)."""
    from napari_medssl import inference, mammo

    if model.spec.task == "classify" and mammo.pipeline_of(model) is not None:
        res = mammo.score_image(model, image, mammo.pipeline_of(model), cancel=cancel)
        return {"probabilities": np.array([1 - res["score"], res["score"]]), "heatmap": res["heatmap"]}
    if not model.spec.predicts:
        raise ValueError(
            f"this model's task is {model.spec.task!r}: it has no classification or segmentation head. "
            "Fine-tune it first (Fine-tune dock), or pick a classifier or segmenter."
        )
    kw = dict(device=device, rgb=rgb, progress=progress_cb, cancel=cancel)
    if model.spec.task == "segment":
        kw["mirror"] = mirror
        kw.update({k: v for k, v in (geometry or {}).items() if v is not None})
    return inference.predict(model, image, **kw)


class ModelWidget(QWidget):
    """Dock: choose a model, a device and an image layer; Run shows probabilities or adds labels."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self._worker: Any = None
        self._cancel = threading.Event()
        self._relay = Relay()
        self._pbar: progress | None = None
        self.last_result: Any = None

        self.picker = ModelPicker(extra_items={NO_MODEL: lambda: ""})
        self.card_label = QLabel()
        self.card_label.setWordWrap(True)
        self.card_label.setTextFormat(Qt.TextFormat.RichText)
        self.fit_label = (
            QLabel()
        )  # does the chosen model's domain fit the chosen image (napari_medssl.domain)
        self.fit_label.setWordWrap(True)
        self.fit_label.setTextFormat(Qt.TextFormat.RichText)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        self.image_combo = LayerCombo(napari_viewer, Image)
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.tta_check = QCheckBox("Mirror TTA (segmenters)")
        self.tta_check.setToolTip(
            "Test-time augmentation: average the prediction with those of mirrored copies of the image, along "
            "the axes the model was trained to flip (none: nothing to mirror). One extra pass per mirror. It helps "
            "only where a mirrored image is as natural as the original: on the shipped hippocampus models, whose "
            "crops share one orientation, it lowers the scores."
        )
        self.run_btn = QPushButton("Run")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.result_label = QLabel()
        self.result_label.setWordWrap(True)
        self.result_label.setTextFormat(Qt.TextFormat.RichText)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        self.picker.add_to(form)
        form.addRow(self.card_label)
        form.addRow("Device", self.device_combo)
        form.addRow("Image", self.image_combo)
        form.addRow(self.fit_label)
        form.addRow("Run on", self.scope_combo)
        form.addRow(self.tta_check)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.result_label)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.picker.changed.connect(self._on_model_changed)
        self.device_combo.currentTextChanged.connect(self._on_model_changed)
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self._relay.progressed.connect(self._on_progress)
        self.session.checkpoint_ready.connect(self.use_checkpoint)
        self.image_combo.currentTextChanged.connect(self._on_image_changed)
        self._on_image_changed()
        self.refresh_zoo()

    # -- model choice -------------------------------------------------------------------------------------------
    def refresh_zoo(self) -> None:
        """Re-list the zoo models (plus the checkpoint-file entry)."""
        self.picker.refresh()

    def source(self) -> str:
        """The zoo name or checkpoint path selected now ('' when none)."""
        return self.picker.source()

    def select(self, source: str, device: str | None = None) -> None:
        """Select a zoo model by name, or a checkpoint by path."""
        if device is not None:
            self.device_combo.setCurrentText(device)
        self.picker.select(source)

    def use_checkpoint(self, path: str) -> None:
        """Swap in a fine-tuned checkpoint (called when the Fine-tune dock finishes)."""
        self.select(str(path))
        show_info(f"Model dock now uses the fine-tuned checkpoint {Path(path).name}")

    def _on_image_changed(self, *_: Any) -> None:
        layer = self.image_combo.layer()
        self.scope_combo.setEnabled(layer is not None and layer.ndim == 3 and not layer.rgb)
        self._show_fit()

    def _on_model_changed(self, *_: Any) -> None:
        """Describe the choice (metadata and card, no weights loaded) and publish it with its facts."""
        src = self.source()
        spec = None
        if src and (not self.picker.is_checkpoint() or Path(src).exists()):
            from napari_medssl.resolve import describe

            try:
                spec = describe(src)
            except Exception as err:
                report_error(err, f"Cannot read {src}")
        card = dict(spec.card) if spec is not None and spec.card else {}
        self.card_label.setText(summarize_card(card, spec) if src else "<i>choose a model</i>")
        choice = ModelChoice(src, self.device_combo.currentText(), self.picker.label(), spec) if src else None
        self.session.set_model(choice)
        self._show_fit()

    def domain_fit(self) -> Any:
        """Whether the chosen model's domain (its card's) fits the chosen image: a
        :class:`napari_medssl.domain.DomainFit`, or ``None`` without a model or an image."""
        from napari_medssl import domain

        layer, src = self.image_combo.layer(), self.source()
        if layer is None or not src:
            return None
        spec = self.session.model.spec if self.session.model is not None else None
        dom = dict(spec.domain) if spec is not None and spec.domain else None  # the card's (or checkpoint's)
        return domain.check(dom, domain.facts_from_layer(layer), self.picker.label())

    def _show_fit(self) -> None:
        fit = self.domain_fit()
        self.fit_label.setToolTip(fit.message if fit is not None else "")
        if fit is None:
            self.fit_label.setText("")
        elif not fit.fits:
            self.fit_label.setText(
                "<b style='color:#f90'>⚠ Does not fit this image:</b> "
                f"<span style='color:#fc6'>{html.escape(fit.short)}.</span>"
            )
        elif not fit.recorded:
            self.fit_label.setText("<i>fit to this image unknown: no training domain recorded</i>")
        else:
            text = "fits this image" + (f" (unknown: {', '.join(fit.unknown)})" if fit.unknown else "")
            self.fit_label.setText(f"<span style='color:#8c8'>✓ {html.escape(text)}</span>")

    def model(self, source: str | None = None) -> Any:
        """The loaded model for ``source`` (default: the selection), cached per (source, device, file time)."""
        return self.picker.model(self.device_combo.currentText(), source)

    # -- running ------------------------------------------------------------------------------------------------
    def run(self) -> Any:
        """Run the selected model on the selected image (in a worker thread); return the worker."""
        if self._worker is not None:
            show_info("A model is already running; cancel it first")
            return None
        try:
            layer = self.image_combo.layer()
            if layer is None:
                raise ValueError("no image layer: open an image first")
            model = self.model()
            job = self._plan(model, layer)
            # Mirror TTA mirrors only what training flipped: nothing for a model trained without flips
            tta = self.tta_check.isChecked() and model.spec.task == "segment"
            job["mirror"] = model.spec.flip_axes if tta else ()
            job["no_mirror"] = tta and not job["mirror"]
            job["provenance"] = self._provenance(model, layer)
            job["segment_codes"] = (model.spec.card or {}).get("segment_codes")  # for a DICOM SEG export
        except Exception as err:
            report_error(err, "Cannot run the model")
            return None
        self._cancel.clear()
        self._pbar = progress(total=0, desc=f"{self.source()} on {layer.name}")
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.status_label.setText("running…")
        device = self.device_combo.currentText()
        worker = create_worker(
            guarded,
            run_model,
            model,
            job["image"],
            job["rgb"],
            device,
            self._relay.progressed.emit,
            self._cancel,
            job["mirror"],
            job.get("geometry"),
        )
        worker.returned.connect(lambda out: self._on_returned(model, layer, job, out))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()
        return worker

    def _plan(self, model: Any, layer: Image) -> dict[str, Any]:
        """What to feed the model: the whole image/volume or the current plane."""
        rgb = bool(layer.rgb)
        spatial = layer.ndim
        model_dims = model.spec.spatial_dims
        if spatial > 3:
            raise ValueError(f"images with {spatial} axes are not supported; use a 2D image or a 3D volume")
        if model_dims == 3 and spatial != 3:
            raise ValueError(f"{self.source()} is a 3D model and needs a volume; {layer.name!r} is 2D")
        whole = spatial == 2 or model_dims == 3 or self.scope_combo.currentText() == "whole volume"
        if whole:
            data = np.asarray(layer.data)
            spatial_shape = data.shape[:-1] if rgb else data.shape
            geometry = {"spacing": tuple(float(s) for s in layer.scale[-len(spatial_shape) :])}
            if len(spatial_shape) == 3:
                geometry["affine"] = affine_from_layer(layer.metadata, spatial_shape, layer.scale, layer.translate)
            return {"image": data, "rgb": rgb, "plane": None, "geometry": geometry}
        plane = current_plane(self.viewer, layer)
        spacing = tuple(float(layer.scale[a]) for a in plane.axes)
        return {"image": plane.data, "rgb": False, "plane": plane, "geometry": {"spacing": spacing}}

    def cancel(self) -> None:
        """Ask the running inference to stop (it stops after the current batch)."""
        self._cancel.set()
        self.status_label.setText("cancelling…")

    def _on_progress(self, done: int, total: int) -> None:
        if self._pbar is not None:
            self._pbar.total = total
            self._pbar.n = done
            self._pbar.refresh()

    def _on_returned(self, model: Any, layer: Image, job: dict[str, Any], out: dict[str, Any]) -> None:
        if "error" in out:
            self._on_error(out["error"])
        else:
            self._show(model, layer, job, out["result"])

    def _on_error(self, err: BaseException) -> None:
        from napari_medssl.inference import Cancelled

        if isinstance(err, Cancelled):
            self.status_label.setText("cancelled")
            show_info("Inference cancelled")
        else:
            self.status_label.setText(f"failed: {err}")
            report_error(err, "Inference failed")

    def _on_finished(self) -> None:
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)

    def _show(self, model: Any, layer: Image, job: dict[str, Any], out: np.ndarray) -> None:
        """Put a finished result into the dock and the viewer (GUI thread)."""
        self.last_result = out
        names = model.spec.names()
        if isinstance(out, dict):  # a mammography patch classifier: probabilities and an abnormality map
            self._show_probabilities(layer, job, out["probabilities"], names)
            self._show_heatmap(layer, out["heatmap"])
        elif model.spec.task == "classify":
            self._show_probabilities(layer, job, out, names)
        else:
            self._show_labels(layer, job, out, names)
        note = " (no mirror TTA: this model was trained without random flips)" if job.get("no_mirror") else ""
        self.status_label.setText("done" + note)

    def _show_probabilities(
        self, layer: Image, job: dict[str, Any], probs: np.ndarray, names: list[str]
    ) -> None:
        per_slice = probs.ndim == 2
        shown = probs.mean(axis=0) if per_slice else probs
        rows = []
        best = int(np.argmax(shown))
        for i, p in enumerate(shown):
            name = names[i] if i < len(names) else f"class {i}"
            bar = "█" * int(round(20 * float(p)))
            weight = "b" if i == best else "span"
            rows.append(
                f"<tr><td><{weight}>{html.escape(name)}</{weight}></td><td>{p:.3f}</td><td>{bar}</td></tr>"
            )
        where = (
            "mean over slices" if per_slice else ("current slice" if job["plane"] is not None else "image")
        )
        self.result_label.setText(
            f"<b>{html.escape(self.picker.label())}</b> ({where})<table>{''.join(rows)}</table>"
        )
        result = {
            "model": self.source(),
            "task": "classify",
            "class_names": names,
            "probabilities": shown.tolist(),
            "prediction": names[best] if best < len(names) else best,
        }
        if per_slice:
            result["per_slice"] = probs.tolist()
        if job["plane"] is not None:
            result["slice"] = [i for i in job["plane"].index]
        layer.metadata = {
            **layer.metadata,
            "medssl": {**layer.metadata.get("medssl", {}), "classification": result},
        }

    def _show_heatmap(self, layer: Image, heat: np.ndarray) -> None:
        """The abnormality map over the image: transparent where low (``mammo.heatmap_colormap``), its contrast
        from the breast's median to the map's maximum (``mammo.heatmap_display_range``)."""
        from napari.utils.colormaps import Colormap

        from napari_medssl import mammo

        name = f"{layer.name} abnormality"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        cmap = Colormap(mammo.heatmap_colormap(), controls=mammo.HEATMAP_CONTROLS, name="medssl_abnormality")
        self.viewer.add_image(
            heat,
            name=name,
            colormap=cmap,
            contrast_limits=mammo.heatmap_display_range(heat),
            blending="translucent",
            scale=layer.scale,
            translate=layer.translate,
            metadata={"medssl": {"method": "abnormality heatmap", "model": self.source()}},  # an overlay
        )

    def _show_labels(self, layer: Image, job: dict[str, Any], labels: np.ndarray, names: list[str]) -> None:
        shape = tuple(layer.data.shape[: layer.ndim])
        name = f"{layer.name} segmentation"
        target = self.viewer.layers[name] if name in self.viewer.layers else None
        if target is None or tuple(target.data.shape) != shape:
            if target is not None:
                self.viewer.layers.remove(target)
            target = self.viewer.add_labels(
                np.zeros(shape, dtype=np.uint8),
                name=name,
                scale=layer.scale,
                translate=layer.translate,
                opacity=0.5,
                metadata={"medssl": {"prediction": True}},
            )
        data = target.data
        plane = job["plane"]
        if plane is None:
            data[...] = labels
        else:
            data[tuple(slice(None) if i is None else i for i in plane.index)] = labels
        target.data = data
        target.metadata = {
            **target.metadata,
            **grid_metadata(layer.metadata),  # the source grid and DICOM files: NIfTI / DICOM SEG export
            "medssl": {
                "model": self.source(),
                "class_names": names,
                "prediction": True,
                "provenance": job.get("provenance"),
                "segment_codes": job.get("segment_codes"),
            },
        }
        counts = np.bincount(labels.ravel(), minlength=len(names))
        parts = [f"{names[i] if i < len(names) else i}: {int(c)}" for i, c in enumerate(counts) if i > 0]
        self.result_label.setText(
            f"<b>{html.escape(name)}</b><br>voxels per class: {html.escape(', '.join(parts))}"
        )

    def _provenance(self, model: Any, layer: Image) -> dict[str, Any]:
        """The prediction's provenance (model, weights sha256, version, source series): napari_medssl.provenance."""
        from napari_medssl import provenance

        return provenance.record(
            model,
            source=layer.metadata.get("source"),
            source_series_uid=provenance.series_uid(layer.metadata),
        )

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt override)
        self._cancel.set()
        super().closeEvent(event)
