"""The napari docks (Qt): thin widgets that gather values, call the pure code and show the results.

- :class:`ModelWidget` — run a zoo model or checkpoint on an image (``model_widget.py``).
- :class:`OverlayWidget` — attention and masking overlays (``overlay_widget.py``).
- :class:`FinetuneWidget` — fine-tune on painted labels in a separate process (``finetune_widget.py``).
"""

from napari_medssl._widgets.finetune_widget import FinetuneWidget
from napari_medssl._widgets.model_widget import ModelWidget
from napari_medssl._widgets.overlay_widget import OverlayWidget

__all__ = ["FinetuneWidget", "ModelWidget", "OverlayWidget"]
