"""Small helpers the docks share: layer pickers, the current plane, errors as notifications, layer creation."""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QComboBox

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
