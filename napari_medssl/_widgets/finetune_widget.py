"""The Fine-tune dock: train the Model dock's model on what the user painted, in a separate process.

Annotations: a Labels layer (0 = unlabelled, value ``k + 1`` = class ``k``) painted on any slices, for
segmentation; or Shapes (boxes) / Points named by class (a ``class`` feature, else the layer's name), for
classification. Start hands plain arrays to :class:`~napari_medssl.finetune_process.TrainingProcess`; a GUI timer
polls its events into a live loss / validation plot and an ETA, shown in a small progress window of its own
(:class:`~napari_medssl._widgets._plot.TrainingMonitor`: repaints inside napari's main window would re-composite
the OpenGL canvas); the dock itself shows the run's state. Stop ends the process within 2 s. The best
checkpoint goes to the Model dock. Painted labels are autosaved (:mod:`napari_medssl.autosave`) and offered
back after a crash; closing napari stops training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QEvent, QObject, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_medssl import autosave
from napari_medssl._widgets._common import LayerCombo, is_overlay, is_prediction, report_error
from napari_medssl._widgets._plot import TrainingMonitor
from napari_medssl._widgets._session import get_session
from napari_medssl.annotation_samples import classification_samples, segmentation_samples
from napari_medssl.finetune_process import TrainingProcess, new_run_dir
from napari_medssl.io.layers import affine_from_layer

TARGET = "napari_medssl.annotation_samples:finetune_events"
ADAPT_TARGET = "napari_medssl.engine.adapt:adapt_events"  # painted labels on a volume: fast 2.5D adaptation
VAL_METRICS = ("mean_dice", "auc", "accuracy", "val_loss")
MIN_HELD_OUT = 4  # fewer annotated cases than this: validate on the annotations themselves


def annotation_items(layers: list[Any], image: Image, point_box: int) -> list[tuple[str, tuple, tuple]]:
    """``(class, low, high)`` boxes in the image's index space from Shapes and Points layers.

    The class of an item is its ``class`` feature when the layer has one, else the layer's name. A point
    becomes a ``point_box``-sided square around it, on its slice.
    """
    items = []
    nd = image.ndim
    for layer in layers:
        feats = layer.features
        names = list(feats["class"]) if "class" in getattr(feats, "columns", []) else None
        if isinstance(layer, Shapes):
            shapes = layer.data
        else:
            shapes = [np.asarray(p)[None] for p in layer.data]
        for i, verts in enumerate(shapes):
            world = np.array([layer.data_to_world(v) for v in np.asarray(verts)])
            idx = np.array([image.world_to_data(w) for w in world])[:, -nd:]
            low = np.floor(idx.min(axis=0)).astype(int)
            high = np.ceil(idx.max(axis=0)).astype(int) + 1
            if isinstance(layer, Points):
                half = point_box // 2
                low[-2:] -= half
                high[-2:] = low[-2:] + point_box
            if nd == 3:  # one slice thick
                z = int(round(idx[:, 0].mean()))
                low[0], high[0] = z, z + 1
            name = str(names[i]) if names is not None else layer.name
            items.append((name, tuple(int(v) for v in low), tuple(int(v) for v in high)))
    return items


PALETTE = (
    (1.0, 0.2, 0.2),
    (0.2, 0.6, 1.0),
    (1.0, 0.85, 0.1),
    (0.3, 0.9, 0.3),
    (0.9, 0.3, 0.9),
    (0.1, 0.9, 0.9),
)


def annotation_colors(class_names: list[str], n: int = 16) -> dict[Any, tuple[float, ...]]:
    """Colours for painted values: ``k + 1`` is class ``k``; a class named background is a faint grey."""
    from napari_medssl.overlays import label_colors

    colors = {}
    pal = iter(PALETTE * (n // len(PALETTE) + 1))
    for v in range(1, n + 1):
        name = class_names[v - 1].lower() if v - 1 < len(class_names) else ""
        colors[v] = (0.6, 0.6, 0.6, 0.25) if name == "background" else (*next(pal), 0.7)
    return label_colors(colors)


class _CloseWatcher(QObject):
    """Calls ``callback`` when the watched window closes (napari's main window)."""

    def __init__(self, callback: Any) -> None:
        super().__init__()
        self.callback = callback

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt override)
        if event.type() == QEvent.Type.Close:
            self.callback()
        return False


class FinetuneWidget(QWidget):
    """Dock: annotations + Start/Stop, the run's state, a progress window (live curve, ETA), autosave/restore."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = get_session(napari_viewer)
        self.proc: TrainingProcess | None = None
        self.best_path: str | None = None
        self.events: list[dict] = []
        self._t_first: tuple[float, int] | None = None
        self._dirty: set[str] = set()
        self._hooked: set[int] = set()

        self._make_controls()
        self._lay_out()
        self._connect()

    def _make_controls(self) -> None:
        """The dock's widgets (and the progress window's)."""
        self.model_label = QLabel()
        self.model_label.setWordWrap(True)
        self.image_combo = LayerCombo(self.viewer, Image)
        self.ann_combo = LayerCombo(
            self.viewer, (Labels, Shapes, Points), exclude=lambda ly: is_overlay(ly) or is_prediction(ly)
        )
        self.new_labels_btn = QPushButton("New labels layer")
        self.help_label = QLabel()
        self.help_label.setWordWrap(True)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.steps.setValue(200)
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.batch.setValue(8)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(4)
        self.lr.setMinimumWidth(90)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(1e-4)
        self.lr.setValue(1e-3)
        self.val_every = QSpinBox()
        self.val_every.setRange(1, 100_000)
        self.val_every.setValue(25)
        self.point_box = QSpinBox()
        self.point_box.setRange(8, 4096)
        self.point_box.setValue(128)
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0.1, 600.0)
        self.minutes.setValue(1.0)
        self.minutes.setToolTip(
            "Time budget for labels painted on a volume (fast 2.5D adaptation; the first checkpoint comes "
            "within seconds and a preview of the current slice follows every checkpoint)"
        )
        self.hold_out = QCheckBox(f"hold out 25% for validation (from {MIN_HELD_OUT} annotated slices/items)")
        self.hold_out.setChecked(True)
        self.start_btn = QPushButton("Start")
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        self.use_best_btn = QPushButton("Use best")
        self.use_best_btn.setToolTip("Send the best checkpoint so far to the Model dock")
        self.use_best_btn.setEnabled(False)
        # the live curve and ETA live in their own small window: repaints inside napari's main window
        # re-composite its OpenGL canvas (see TrainingMonitor), repaints there do not
        self.monitor = TrainingMonitor(("loss", "val"))
        self.plot = self.monitor.plot
        self.status_label = self.monitor.status_label
        self.state_label = QLabel("idle")  # in the dock: changes only when the run's state does
        self.state_label.setWordWrap(True)
        self.show_progress_btn = QPushButton("Progress window")
        self.show_progress_btn.setToolTip("Show the live loss / validation curve and the ETA")
        self.autosave_combo = QComboBox()
        self.restore_btn = QPushButton("Restore")

    def _lay_out(self) -> None:
        """Arrange the widgets: the form, the parameters grid, the buttons, the run's state, autosaves."""
        form = QFormLayout()
        form.addRow("Model", self.model_label)
        form.addRow("Image", self.image_combo)
        ann_row = QHBoxLayout()
        ann_row.addWidget(self.ann_combo, 1)
        ann_row.addWidget(self.new_labels_btn)
        form.addRow("Annotations", ann_row)
        params = QGridLayout()
        for i, (label, box) in enumerate(
            [
                ("Steps", self.steps),
                ("Batch", self.batch),
                ("LR", self.lr),
                ("Validate every", self.val_every),
                ("Point box (px)", self.point_box),
                ("Minutes (volume)", self.minutes),
            ]
        ):
            params.addWidget(QLabel(label), i // 2, 2 * (i % 2))
            params.addWidget(box, i // 2, 2 * (i % 2) + 1)
        buttons = QHBoxLayout()
        for b in (self.start_btn, self.stop_btn, self.use_best_btn):
            buttons.addWidget(b)
        restore_row = QHBoxLayout()
        restore_row.addWidget(QLabel("Autosaved"))
        restore_row.addWidget(self.autosave_combo, 1)
        restore_row.addWidget(self.restore_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.help_label)
        layout.addLayout(params)
        layout.addWidget(self.hold_out)
        layout.addLayout(buttons)
        state_row = QHBoxLayout()
        state_row.addWidget(self.state_label, 1)
        state_row.addWidget(self.show_progress_btn)
        layout.addLayout(state_row)
        layout.addLayout(restore_row)

    def _connect(self) -> None:
        """Timers and signals; then show the current model and the autosaves."""
        self.timer = QTimer(self)
        # events queue in between: one coalesced repaint of the progress window a second
        self.timer.setInterval(1000)
        self.timer.timeout.connect(self.poll)
        self.autosave_timer = QTimer(self)
        self.autosave_timer.setSingleShot(True)
        self.autosave_timer.setInterval(1500)
        self.autosave_timer.timeout.connect(self.autosave_now)
        # a preview redraws the canvas (~25 ms on a software renderer): drawn a moment after the poll, so the
        # two repaints (progress window, canvas) fall in different turns of the event loop, not one long one
        self.preview_timer = QTimer(self)
        self.preview_timer.setSingleShot(True)
        self.preview_timer.setInterval(150)
        self.preview_timer.timeout.connect(self._draw_pending_preview)
        self._pending_preview: dict | None = None

        self.start_btn.clicked.connect(self.start)
        self.stop_btn.clicked.connect(self.stop)
        self.use_best_btn.clicked.connect(self.use_best)
        self.show_progress_btn.clicked.connect(self.show_progress)
        self.new_labels_btn.clicked.connect(self.new_labels_layer)
        self.restore_btn.clicked.connect(self.restore_selected)
        self.session.model_changed.connect(self._on_model_changed)
        self.viewer.layers.events.inserted.connect(self._hook_layers)
        self._hook_layers()
        self._on_model_changed(self.session.model)
        self._close_watcher = _CloseWatcher(self.shutdown)
        self._watched: list[Any] = []
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        self.refresh_autosaves(notify=True)

    # -- model and annotations ----------------------------------------------------------------------------------
    def _on_model_changed(self, choice: Any) -> None:
        if choice is None:
            self.model_label.setText("<i>pick a model in the Model dock</i>")
            self.help_label.setText("")
            return
        self.model_label.setText(f"{choice.label or choice.source} (device {choice.device})")
        spec = choice.spec
        if spec is None:  # the Model dock reported why it cannot read the model
            self.help_label.setText("cannot read the model: see the Model dock")
            return
        names = spec.names()
        from napari_medssl.models.ensemble import NOT_TRAINED

        if spec.is_ensemble:
            self.help_label.setText(NOT_TRAINED[0].upper() + NOT_TRAINED[1:] + ".")
        elif spec.task == "segment":
            mapping = ", ".join(f"{i + 1} = {n}" for i, n in enumerate(names))
            self.help_label.setText(f"Paint a Labels layer on any slices. 0 = unlabelled; {mapping}.")
        elif spec.task == "classify":
            self.help_label.setText(
                "Draw boxes (Shapes) or Points; name each by class with a 'class' feature or the layer's name "
                f"({', '.join(names)})."
            )
        else:
            self.help_label.setText(
                "A pretrained model: a new head is trained. Paint labels (1 = first class) or draw named boxes."
            )

    def new_labels_layer(self) -> Labels | None:
        """Add an empty Labels layer on the selected image's grid, for painting."""
        image = self.image_combo.layer()
        if image is None:
            show_warning("Open an image first")
            return None
        shape = image.data.shape[: image.ndim]
        names = self._class_names()
        layer = self.viewer.add_labels(
            np.zeros(shape, dtype=np.uint8),
            name=f"{image.name} annotations",
            scale=image.scale,
            translate=image.translate,
            colormap=annotation_colors(names),
            metadata={"medssl": {"annotations": True, "values": {i + 1: n for i, n in enumerate(names)}}},
        )
        layer.selected_label = 1
        layer.mode = "paint"
        self.ann_combo.setCurrentText(layer.name)
        return layer

    def _class_names(self) -> list[str]:
        choice = self.session.model
        return choice.spec.names() if choice is not None and choice.spec is not None else []

    def gather(self, spec: Any) -> dict[str, Any]:
        """Training arrays and config fields from the chosen image and annotations (GUI thread, cheap);
        ``spec``: the starting model's facts."""
        image = self.image_combo.layer()
        ann = self.ann_combo.layer()
        if image is None:
            raise ValueError("no image layer: open an image")
        if ann is None:
            raise ValueError("no annotations: paint a Labels layer, or draw Shapes/Points named by class")
        data = np.asarray(image.data)
        if isinstance(ann, Labels):
            samples = segmentation_samples(data, np.asarray(ann.data), spec.spatial_dims, rgb=image.rgb)
            k = max(spec.num_classes if spec.task == "segment" else 0, max(samples["classes"]) + 1)
            names = spec.names() if spec.task == "segment" and len(spec.names()) == k else None
            samples.update(task="segment", num_classes=k, class_names=names)
        else:
            layers = [ly for ly in self.viewer.layers if isinstance(ly, Shapes | Points) and len(ly.data)]
            items = annotation_items(layers, image, self.point_box.value())
            known = spec.names() if spec.task == "classify" else None
            samples = classification_samples(data, items, known, rgb=image.rgb)
            samples.update(task="classify", num_classes=len(samples["class_names"]))
        return samples

    # -- training -----------------------------------------------------------------------------------------------
    def start(self) -> TrainingProcess | None:
        """Start fine-tuning in a separate process; return it (``None`` when the input is not usable)."""
        if self.proc is not None and self.proc.is_alive():
            show_info("Fine-tuning is already running")
            return None
        choice = self.session.model
        if self._painted_volume():
            adapt_from = self._adapt_source(choice.source if choice is not None else None)
            if adapt_from is not False:  # fast 2.5D adaptation (the default starting point when no fit)
                return self.start_adapt(adapt_from)
        try:
            if choice is None:
                raise ValueError("no model: pick a zoo model or a checkpoint in the Model dock")
            from napari_medssl.resolve import describe

            spec = choice.spec or describe(choice.source)  # describe raises why the facts cannot be read
            if spec.is_ensemble:
                from napari_medssl.models.ensemble import NOT_TRAINED

                raise ValueError(NOT_TRAINED)
            samples = self.gather(spec)
            self.autosave_now()
            n = len(samples["images"])
            held_out = self.hold_out.isChecked() and n >= MIN_HELD_OUT
            steps = self.steps.value()
            out_dir = new_run_dir(choice.source)
            config = dict(
                model=choice.source,
                task=samples["task"],
                out_dir=str(out_dir),
                max_steps=steps,
                batch_size=self.batch.value(),
                lr=self.lr.value(),
                warmup_steps=min(50, max(1, steps // 10)),
                val_every=min(self.val_every.value(), steps),
                val_fraction=0.25 if held_out else 0.0,
                num_classes=samples["num_classes"],
                device=choice.device,
                resume=False,
            )
            if samples["task"] == "segment":
                config.update(ignore_index=samples["ignore_index"])
            proc = TrainingProcess(
                TARGET,
                dict(
                    images=samples["images"],
                    labels=samples["labels"],
                    config=config,
                    class_names=samples.get("class_names"),
                    ids=samples["ids"],
                    validate_on_train=not held_out,
                ),
            )
            proc.start()
        except Exception as err:
            report_error(err, "Cannot start fine-tuning")
            return None
        where = "held-out 25%" if held_out else "the annotations themselves"
        self._started(proc, out_dir, f"training on {n} annotated case(s), validation on {where}")
        return proc

    def _painted_volume(self) -> bool:
        """Whether the annotations are a Labels layer painted on a gray-scale volume (the adaptation path)."""
        image, ann = self.image_combo.layer(), self.ann_combo.layer()
        return isinstance(ann, Labels) and image is not None and image.ndim == 3 and not image.rgb

    def _adapt_source(self, source: str | None) -> str | None | bool:
        """For labels painted on a volume: the model to adapt (``None``: the default starting point), or
        ``False`` to fine-tune the Model dock's model as it is (it fits the image and the painted classes).

        Adapted: no model; a model made by adaptation (2.5D conventions); a model that does not fit the image
        (its card's domain, :mod:`napari_medssl.domain`) or has fewer classes than painted; not a segmenter.
        """
        from napari_medssl.engine import adapt

        if source is None:
            return None
        from napari_medssl.resolve import describe

        try:
            spec = describe(source)  # the model's facts from its metadata (no weights loaded)
            painted = np.asarray(self.ann_combo.layer().data)
            top = int(painted.max()) - 1
        except Exception:
            return None
        if spec.is_ensemble:
            return False  # the ensemble's own message (fine-tune a member) stays
        chosen, _ = adapt.choose_start(source, top + 1)
        if chosen == source:
            return source
        fits, _ = self._fits_image(source)
        return False if fits and spec.task == "segment" and top < spec.num_classes else None

    def _fits_image(self, source: str) -> tuple[bool, str]:
        """Whether the model's card domain fits the chosen image (True when nothing is recorded)."""
        try:
            from napari_medssl import domain, zoo
        except ImportError:  # domain fit not available: trust the user's choice
            return True, ""
        card = zoo.card(source) if source in zoo.list_zoo() else None
        fit = domain.check(
            domain.model_domain(card=card),
            domain.facts_from_layer(self.image_combo.layer()),
            Path(source).name,
        )
        return fit.fits, "" if fit.fits else fit.message

    def start_adapt(self, source: str | None) -> TrainingProcess | None:
        """Fast 2.5D adaptation (:mod:`napari_medssl.engine.adapt`) on the painted volume, in a process.

        Every check runs here first (grid, painted classes, a starting model that takes the image); the
        starting point is the Model dock's model when it was made for painted slices, else the default one.
        """
        from napari_medssl.engine import adapt

        image, ann = self.image_combo.layer(), self.ann_combo.layer()
        try:
            data, painted = np.asarray(image.data), np.array(ann.data)  # a copy: painting may go on
            classes = adapt.painted_classes(painted)
            start, why = adapt.choose_start(source, max(classes) + 1)
            z = int(self.viewer.dims.current_step[0]) if self.viewer.dims.ndim == 3 else None
            cfg = dict(
                out_dir=str(new_run_dir(start)),
                model=start,
                max_minutes=self.minutes.value(),
                preview_slice=z,
                device="cpu",
            )
            adapt.preflight(data, painted, cfg)
            self.autosave_now()
            proc = TrainingProcess(
                ADAPT_TARGET,
                dict(
                    image=data,
                    painted=painted,
                    config=cfg,
                    spacing_yx=tuple(image.scale[-2:]),
                    affine=affine_from_layer(image.metadata, data.shape, image.scale, image.translate),
                ),
            )
            proc.start()
        except Exception as err:
            report_error(err, "Cannot start fine-tuning")
            return None
        if cfg["preview_slice"] is not None:
            self._preview_layer()
        self._started(
            proc,
            Path(cfg["out_dir"]),
            f"{why}; {len(classes)} painted classes, {self.minutes.value():g} min budget",
        )
        return proc

    def _started(self, proc: TrainingProcess, out_dir: Path, message: str) -> None:
        self.proc, self.run_dir, self.best_path = proc, out_dir, None
        self.events, self._t_first = [], None
        self.plot.clear()
        self.start_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        self.use_best_btn.setEnabled(False)
        self.status_label.setText(message)
        self.state_label.setText(message)
        self.show_progress()
        self.timer.start()

    def show_preview(self, ev: dict, thumbnail: bool = False) -> None:
        """Show a checkpoint's prediction of one slice in a ``fine-tune preview`` Labels layer (its thumbnail
        too when ``thumbnail``: the run's last preview)."""
        layer = self._preview_layer()
        if layer is None:
            return
        z = int(ev["slice"])
        if 0 <= z < layer.data.shape[0] and layer.data.shape[1:] == ev["labels"].shape:
            layer.data[z] = ev["labels"]
            # while training, the slice only: a thumbnail update repaints the layer list, a second
            # re-composite of the window (tick gaps 47-62 ms with it, 30 ms without: bench_responsiveness.py)
            layer.refresh(thumbnail=thumbnail, extent=False, highlight=False)

    def _draw_pending_preview(self) -> None:
        ev, self._pending_preview = self._pending_preview, None
        if ev is not None:
            self.show_preview(ev, thumbnail=self.proc is None or self.proc.finished)

    def _preview_layer(self) -> Any:
        """The image's ``fine-tune preview`` Labels layer, added when missing (at Start: adding a layer costs a
        few hundred ms of the event loop, which must not fall in the middle of the user's painting)."""
        image = self.image_combo.layer()
        if image is None or image.ndim != 3:
            return None
        name = f"{image.name} fine-tune preview"
        if name not in self.viewer.layers:
            self.viewer.add_labels(
                np.zeros(image.data.shape[:3], np.uint8),
                name=name,
                scale=image.scale,
                translate=image.translate,
                opacity=0.5,
                colormap=annotation_colors(self._class_names()),
                metadata={"medssl": {"prediction": True}},
            )
        return self.viewer.layers[name]

    def show_progress(self) -> None:
        """Show the progress window (live curve and ETA) beside the viewer."""
        self.monitor.show_near(self)

    def stop(self) -> float:
        """Stop training (the process tree ends within 2 s); return the seconds it took."""
        if self.proc is None:
            return 0.0
        took = self.proc.stop(2.0)
        self.poll()
        return took

    def poll(self) -> None:
        """Move the training process's new events into the plot and the status line (GUI timer)."""
        if self.proc is None:
            return
        for ev in self.proc.poll():
            self.events.append(ev)
            self._handle(ev)

    def _handle(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "step":
            self.plot.add_point("loss", ev["step"], ev["loss"])
            now = time.perf_counter()
            if self._t_first is None:
                self._t_first = (now, ev["step"])
            t0, s0 = self._t_first
            done, total = ev["step"], ev["total_steps"]
            eta = ""
            if "remaining_s" in ev:
                eta = f" · {_fmt_seconds(ev['remaining_s'])} left"
            elif done > s0:
                eta = f" · ETA {_fmt_seconds((total - done) * (now - t0) / (done - s0))}"
            shown = f"{done}" if "remaining_s" in ev else f"{done}/{total}"
            self.status_label.setText(f"step {shown} · loss {ev['loss']:.4f}{eta}")
        elif kind == "val":
            metrics = ev.get("metrics") or {}
            name = next((m for m in VAL_METRICS if m in metrics), None)
            if name is not None:
                self.plot.set_label("val", f"val {name}")
                self.plot.add_point("val", ev["step"], metrics[name])
        elif kind == "preview":
            self._pending_preview = ev  # only the newest checkpoint's preview is drawn
            self.preview_timer.start()
        elif kind == "checkpoint" and ev.get("best"):
            self.best_path = ev["path"]
            self.use_best_btn.setEnabled(True)
        elif kind == "done":
            self.best_path = ev.get("best_path") or self.best_path
            metrics = ev.get("metrics") or {}
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in VAL_METRICS)
            self._finish(f"done at step {ev.get('step')} · best {shown or 'n/a'}")
            if self.best_path:
                self.session.checkpoint_ready.emit(self.best_path)
        elif kind == "error":
            self._finish(f"failed: {ev.get('message')}")
            report_error(RuntimeError(ev.get("message", "unknown error")), "Fine-tuning failed")
        elif kind == "stopped":
            self._finish("stopped" + (" · best checkpoint kept" if self.best_path else ""))

    def _finish(self, message: str) -> None:
        """The run ended: buttons back, ``message`` in the progress window and in the dock."""
        self.timer.stop()
        self.start_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
        self.use_best_btn.setEnabled(bool(self.best_path))
        self.status_label.setText(message)
        self.state_label.setText(message)

    def use_best(self) -> None:
        """Send the best checkpoint so far to the Model dock."""
        if self.best_path and Path(self.best_path).is_file():
            self.session.checkpoint_ready.emit(self.best_path)

    # -- autosave -------------------------------------------------------------------------------------------------
    def _hook_layers(self, *_: Any) -> None:
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and id(layer) not in self._hooked:
                self._hooked.add(id(layer))
                layer.events.paint.connect(lambda _ev, name=layer.name: self._mark_dirty(name))

    def _mark_dirty(self, name: str) -> None:
        self._dirty.add(name)
        self.autosave_timer.start()

    def autosave_now(self) -> list[Path]:
        """Write every painted-on Labels layer (and the chosen annotations) to the autosave folder."""
        names = set(self._dirty)
        ann = self.ann_combo.layer()
        if isinstance(ann, Labels):
            names.add(ann.name)
        image = self.image_combo.layer()
        out = []
        for name in names:
            if name not in self.viewer.layers:
                continue
            layer = self.viewer.layers[name]
            try:
                out.append(
                    autosave.save_labels(
                        np.asarray(layer.data),
                        image.name if image is not None else "",
                        layer.name,
                        tuple(layer.scale),
                        tuple(layer.translate),
                    )
                )
            except OSError as err:
                report_error(err, "Cannot autosave labels")
        self._dirty.clear()
        return out

    def refresh_autosaves(self, notify: bool = False) -> None:
        """List the autosaves (those from crashed sessions first)."""
        try:
            entries = autosave.list_autosaves()
        except OSError as err:
            report_error(err, "Cannot read the autosave folder")
            entries = []
        entries.sort(key=lambda a: not a.crashed)
        self._autosaves = entries
        self.autosave_combo.clear()
        for entry in entries:
            self.autosave_combo.addItem(("⚠ crash: " if entry.crashed else "") + entry.describe())
        crashed = [e for e in entries if e.crashed]
        if notify and crashed:
            show_info(
                f"{len(crashed)} labels layer(s) were autosaved by a session that did not close cleanly; "
                "restore them from the Fine-tune dock"
            )

    def restore_selected(self) -> Labels | None:
        """Add the selected autosave back as a Labels layer."""
        i = self.autosave_combo.currentIndex()
        if not 0 <= i < len(getattr(self, "_autosaves", [])):
            show_info("No autosaved labels to restore")
            return None
        try:
            data, header = autosave.load_autosave(self._autosaves[i].path)
        except (OSError, ValueError) as err:
            report_error(err, "Cannot restore the autosave")
            return None
        kwargs = {k: header[k] for k in ("scale", "translate") if header.get(k)}
        return self.viewer.add_labels(data, name=f"{header.get('layer', 'labels')} (restored)", **kwargs)

    # -- shutdown -------------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop training and mark autosaves clean (the viewer is closing)."""
        try:
            self.timer.stop()
            self.preview_timer.stop()
        except RuntimeError:  # the Qt side is already gone (application quitting)
            pass
        if self.proc is not None and self.proc.is_alive():
            self.proc.stop(2.0)
        try:
            self.monitor.close()
        except RuntimeError:
            pass
        if self._dirty:
            self.autosave_now()
        try:
            autosave.mark_clean()
        except OSError:
            pass

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt override)
        """Watch the window this dock lives in: closing napari stops training."""
        window = self.window()
        if window is not None and window is not self and window not in self._watched:
            window.installEventFilter(self._close_watcher)
            self._watched.append(window)
        super().showEvent(event)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt override)
        self.shutdown()
        super().closeEvent(event)


def _fmt_seconds(s: float) -> str:
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
