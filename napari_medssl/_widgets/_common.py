"""Small helpers the docks share: layer and model pickers, the current plane, errors as notifications, layer
creation."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

from napari_medssl.overlays import OverlayLayer, Plane, take_plane


def report_error(err: BaseException, what: str) -> None:
    """Show ``what failed: message`` as a napari error notification (the viewer never sees a traceback)."""
    msg = f"{what}: {err}" if str(err) else f"{what}: {type(err).__name__}"
    show_error(msg)
    traceback.print_exception(type(err), err, err.__traceback__)


def is_overlay(layer: Any) -> bool:
    """Whether a layer is one of this plugin's overlays (not an image to run models on)."""
    meta = getattr(layer, "metadata", None) or {}
    return isinstance(meta.get("medssl"), dict) and "method" in meta["medssl"]


def is_prediction(layer: Any) -> bool:
    """Whether a layer holds a model's segmentation (class indices, not painted annotations)."""
    meta = getattr(layer, "metadata", None) or {}
    return isinstance(meta.get("medssl"), dict) and meta["medssl"].get("prediction", False)


def guarded(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a worker thread and return ``{"result": ...}`` or ``{"error": exc}``.

    Errors come back as values, so the dock shows one clear notification (napari's workers would otherwise
    also raise them in the GUI thread).
    """
    try:
        return {"result": fn(*args)}
    except Exception as err:  # handed to the dock, which reports it
        return {"error": err}


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of one type (overlays left out), kept up to date; follows the
    layer the user selects."""

    def __init__(
        self,
        viewer: Any,
        layer_type: type | tuple[type, ...],
        allow_none: bool = False,
        exclude: Any = is_overlay,
    ) -> None:
        super().__init__()
        self.viewer = viewer
        self.layer_type = layer_type
        self.allow_none = allow_none
        self.exclude = exclude
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            ev.connect(self.refresh)
        viewer.layers.selection.events.active.connect(self._follow_active)
        self.refresh()

    def refresh(self, *_: Any) -> None:
        """Re-list the layers, keeping the current choice when it still exists."""
        current = self.currentText()
        self.blockSignals(True)
        self.clear()
        if self.allow_none:
            self.addItem("")
        names = [lay.name for lay in self.viewer.layers if self._wanted(lay)]
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        elif names:
            active = self.viewer.layers.selection.active
            if active is not None and active.name in names:
                self.setCurrentText(active.name)
        self.blockSignals(False)
        self.currentTextChanged.emit(self.currentText())

    def _wanted(self, layer: Any) -> bool:
        return isinstance(layer, self.layer_type) and not self.exclude(layer)

    def _follow_active(self, event: Any) -> None:
        layer = event.value
        if layer is not None and self._wanted(layer):
            self.setCurrentText(layer.name)

    def layer(self) -> Any | None:
        """The chosen layer, or ``None``."""
        name = self.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None


CHECKPOINT_ITEM = "Checkpoint file…"


def zoo_entries() -> list[str]:
    """Names of the models in the zoo (empty when the zoo is not available)."""
    try:
        from napari_medssl import zoo
    except ImportError:
        return []
    return list(zoo.list_zoo())


def load_model(source: str, device: str) -> Any:
    """Load a zoo model by name or a ``.safetensors`` checkpoint onto ``device`` (``auto`` resolves)."""
    from napari_medssl import zoo

    return zoo.load(source, device=device)


class ModelPicker(QWidget):
    """Choose a model: a zoo name, an extra entry, or a ``.safetensors`` checkpoint file.

    The widget is the "Checkpoint" field (a path, and a Browse… button when ``browse``), enabled only while
    the "Checkpoint file…" entry is chosen; ``combo`` lists the zoo names, the extra entries and "Checkpoint
    file…". :meth:`add_to` puts both into a dock's form as the "Model" and "Checkpoint" rows, so they line up
    with the dock's other rows. ``changed`` is emitted whenever the choice may have changed (another
    entry, an edited path, :meth:`select`, :meth:`refresh`). Loaded models are cached per (source, device,
    file time), so a checkpoint rewritten on disk is loaded again.

    Args:
        zoo_filter: keeps the zoo names to list (default: all of them).
        extra_items: entries listed after the zoo names, each with a function returning its source (a zoo
            name or a checkpoint path, ``""`` for none) at the time it is asked for.
        browse: show a Browse… button next to the path field.
        empty_error: the message of the ``ValueError`` :meth:`model` raises when nothing is chosen.
    """

    changed = Signal()

    def __init__(
        self,
        zoo_filter: Callable[[str], bool] | None = None,
        extra_items: Mapping[str, Callable[[], str]] | None = None,
        browse: bool = True,
        empty_error: str = "no model selected: pick a zoo model or a .safetensors checkpoint file",
    ) -> None:
        super().__init__()
        self.zoo_filter = zoo_filter
        self.extra_items = dict(extra_items or {})
        self.empty_error = empty_error
        self._models: dict[tuple[str, str, float], Any] = {}

        self.combo = QComboBox()
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("path to a .safetensors checkpoint")
        self.browse_btn = QPushButton("Browse…") if browse else None
        path_row = QHBoxLayout(self)
        path_row.setContentsMargins(0, 0, 0, 0)
        path_row.addWidget(self.path_edit)
        if self.browse_btn is not None:
            path_row.addWidget(self.browse_btn)
            self.browse_btn.clicked.connect(self._browse)

        self.combo.currentTextChanged.connect(self._on_choice)
        self.path_edit.editingFinished.connect(self._on_choice)

    def add_to(self, form: QFormLayout) -> None:
        """Add the "Model" (the combo box) and "Checkpoint" (this widget) rows to ``form``."""
        form.addRow("Model", self.combo)
        form.addRow("Checkpoint", self)

    def refresh(self) -> None:
        """Re-list the zoo models (plus the extra and checkpoint-file entries), keeping the current choice."""
        current = self.combo.currentText()
        try:
            names = zoo_entries()
        except Exception as err:  # a broken zoo folder must not break the dock
            report_error(err, "Cannot list the model zoo")
            names = []
        if self.zoo_filter is not None:
            names = [n for n in names if self.zoo_filter(n)]
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems([*names, *self.extra_items, CHECKPOINT_ITEM])
        if current and self.combo.findText(current) >= 0:
            self.combo.setCurrentText(current)
        self.combo.blockSignals(False)
        self._on_choice()

    def is_checkpoint(self) -> bool:
        """Whether the "Checkpoint file…" entry is chosen."""
        return self.combo.currentText() == CHECKPOINT_ITEM

    def source(self) -> str:
        """The zoo name or checkpoint path chosen now ('' when none)."""
        item = self.combo.currentText()
        if item == CHECKPOINT_ITEM:
            return self.path_edit.text().strip()
        if item in self.extra_items:
            return self.extra_items[item]()
        return item

    def label(self) -> str:
        """A short name for the choice: the zoo name, or the checkpoint's file name."""
        src = self.source()
        return Path(src).name if self.is_checkpoint() else src

    def select(self, source: str) -> None:
        """Choose an entry by its text (a zoo name), or else a checkpoint by path."""
        if self.combo.findText(source) >= 0:
            self.combo.setCurrentText(source)
        else:
            self.path_edit.setText(str(source))
            self.combo.setCurrentText(CHECKPOINT_ITEM)
        self._on_choice()

    def model(self, device: str, source: str | None = None) -> Any:
        """The loaded model for ``source`` (default: the choice) on ``device``, cached per file time.

        Raises:
            ValueError: nothing chosen, or a file that is not a safetensors checkpoint (pickles are refused).
        """
        source = source or self.source()
        if not source:
            raise ValueError(self.empty_error)
        stamp = Path(source).stat().st_mtime if Path(source).is_file() else 0
        key = (source, device, stamp)
        if key not in self._models:
            self._models[key] = load_model(source, device)
        return self._models[key]

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model checkpoint", "", "safetensors (*.safetensors)")
        if path:
            self.select(path)

    def _on_choice(self, *_: Any) -> None:
        is_file = self.is_checkpoint()
        self.path_edit.setEnabled(is_file)
        if self.browse_btn is not None:
            self.browse_btn.setEnabled(is_file)
        self.changed.emit()


def current_plane(viewer: Any, layer: Image) -> Plane:
    """The 2D plane of ``layer`` the viewer shows now (the image itself when it is 2D)."""
    rgb = bool(getattr(layer, "rgb", False))
    spatial = layer.ndim
    point = np.round(layer.world_to_data(viewer.dims.point)).astype(int)
    point = np.clip(point, 0, np.array(layer.data.shape[:spatial]) - 1)
    offset = viewer.dims.ndim - spatial
    displayed = [d - offset for d in viewer.dims.displayed if d - offset >= 0][-2:]
    if len(displayed) < 2:
        displayed = [spatial - 2, spatial - 1]
    return take_plane(layer.data, point, displayed, layer.scale, layer.translate, rgb=rgb)


POST_CREATION = ("contour",)  # layer properties napari sets only after creation


def add_overlay(viewer: Any, overlay: OverlayLayer, replace: bool = True) -> Any:
    """Add (or update in place) the napari layer an :class:`OverlayLayer` describes."""
    kwargs = dict(overlay.style)
    after = {k: kwargs.pop(k) for k in POST_CREATION if k in kwargs}
    name = overlay.name
    if replace and name in viewer.layers:
        old = viewer.layers[name]
        same_kind = isinstance(old, Labels) == (overlay.kind == "labels")
        if same_kind and old.data.shape == overlay.data.shape:
            old.data = overlay.data
            old.scale, old.translate = overlay.scale, overlay.translate
            old.metadata = {**old.metadata, "medssl": overlay.metadata}
            return old
        viewer.layers.remove(old)
    common = dict(
        name=name, scale=overlay.scale, translate=overlay.translate, metadata={"medssl": overlay.metadata}
    )
    if overlay.kind == "labels":
        layer = viewer.add_labels(overlay.data, **common, **kwargs)
    else:
        layer = viewer.add_image(overlay.data, **common, **kwargs)
    for key, value in after.items():
        setattr(layer, key, value)
    return layer


class Relay(QObject):
    """Carries progress from a worker thread to the GUI thread (queued signal); shared by the docks."""

    progressed = Signal(int, int)
