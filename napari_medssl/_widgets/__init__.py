"""The napari docks (Qt): thin widgets that gather values, call the pure code and show the results.

- :class:`ModelWidget` — run a zoo model or checkpoint on an image (``model_widget.py``).
- :class:`OverlayWidget` — attention and masking overlays (``overlay_widget.py``).
- :class:`FinetuneWidget` — fine-tune on painted labels in a separate process (``finetune_widget.py``).
- :class:`PaintNextWidget` — an uncertainty overlay and the slices to paint next (``paint_next_widget.py``).
- :class:`PacsWidget` — search a PACS over DICOMweb, open a series, send labels back as DICOM SEG (``pacs_widget.py``).
"""

from napari_medssl._gl_guard import keep_triton_out

keep_triton_out()  # before any torch import in the viewer process: see _gl_guard

from napari_medssl._widgets.finetune_widget import FinetuneWidget  # noqa: E402
from napari_medssl._widgets.model_widget import ModelWidget  # noqa: E402
from napari_medssl._widgets.overlay_widget import OverlayWidget  # noqa: E402
from napari_medssl._widgets.pacs_widget import PacsWidget  # noqa: E402
from napari_medssl._widgets.paint_next_widget import PaintNextWidget  # noqa: E402

__all__ = ["FinetuneWidget", "ModelWidget", "OverlayWidget", "PacsWidget", "PaintNextWidget"]
