"""State the three docks of one viewer share: the model in use (with its facts) and fine-tuned checkpoints.

The Model dock publishes the model the user picked, with its :class:`~napari_medssl.models.spec.ModelSpec`
(read from the checkpoint's metadata, no weights loaded); the Fine-tune dock reads both as the starting point
and, when training ends, publishes the best checkpoint, which the Model dock swaps in. No dock imports another.
One session per viewer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from qtpy.QtCore import QObject, Signal


@dataclass(frozen=True)
class ModelChoice:
    """What the Model dock has selected.

    Attributes:
        source: a zoo name or a ``.safetensors`` path (what ``zoo.load`` accepts).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
        label: a short text for the user.
        spec: the model's :class:`~napari_medssl.models.spec.ModelSpec` (``None`` when it cannot be read).
    """

    source: str
    device: str = "auto"
    label: str = ""
    spec: Any = None


class Session(QObject):
    """Signals between the docks of one viewer."""

    model_changed = Signal(object)  # ModelChoice
    checkpoint_ready = Signal(str)  # path of a fine-tuned checkpoint

    def __init__(self) -> None:
        super().__init__()
        self.model: ModelChoice | None = None

    def set_model(self, choice: ModelChoice | None) -> None:
        """Publish the selected model."""
        self.model = choice
        self.model_changed.emit(choice)


_SESSIONS: dict[int, Session] = {}


def get_session(viewer: object) -> Session:
    """The session of ``viewer`` (created on first use, dropped when the viewer is collected).

    napari hands each plugin widget its own proxy of the viewer; the session is keyed by the viewer behind it.
    """
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    if key not in _SESSIONS:
        _SESSIONS[key] = Session()
        weakref.finalize(viewer, _SESSIONS.pop, key, None)
    return _SESSIONS[key]
