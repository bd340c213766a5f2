"""A small live line plot drawn with QPainter (no matplotlib or pyqtgraph needed).

Used by the Fine-tune dock for the training loss and the validation metric. Each series has its own y range
(drawn on the left axis for the first series, on the right axis for the second), sharing the step axis.
"""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QLabel, QSizePolicy, QVBoxLayout, QWidget

_COLOURS = ("#4fc3f7", "#ffb74d", "#81c784", "#e57373")


class CurvePlot(QWidget):
    """Step-indexed line plot of a few named series.

    Args:
        series: names of the series in drawing order; the first uses the left axis, the second the right.
        parent: Qt parent.
    """

    def __init__(self, series: tuple[str, ...] = ("loss", "val"), parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._names = tuple(series)
        self._points: dict[str, list[tuple[float, float]]] = {n: [] for n in self._names}
        self._labels = {n: n for n in self._names}
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self) -> None:
        """Forget every point."""
        for pts in self._points.values():
            pts.clear()
        self.update()

    def set_label(self, series: str, label: str) -> None:
        """Name shown in the legend for ``series`` (e.g. the validation metric)."""
        self._labels[series] = label
        self.update()

    def add_point(self, series: str, x: float, y: float) -> None:
        """Append ``(x, y)`` to ``series`` and repaint.

        Raises:
            ValueError: ``series`` is not one of the plot's series.
        """
        if series not in self._points:
            raise ValueError(f"unknown series {series!r}; this plot has {list(self._points)}")
        self._points[series].append((float(x), float(y)))
        self.update()

    def points(self, series: str) -> list[tuple[float, float]]:
        """The points of one series (a copy)."""
        return list(self._points[series])

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt override)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), QColor("#262930"))
        plot = QRectF(44, 18, max(self.width() - 90, 10), max(self.height() - 40, 10))
        p.setPen(QPen(QColor("#5a5f6b"), 1))
        p.drawRect(plot)
        xs = [x for pts in self._points.values() for x, _ in pts]
        if not xs:
            p.setPen(QColor("#9aa0aa"))
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, "no training yet")
            p.end()
            return
        x0, x1 = min(xs), max(xs)
        if x1 <= x0:
            x1 = x0 + 1.0
        for i, name in enumerate(self._names):
            pts = self._points[name]
            colour = QColor(_COLOURS[i % len(_COLOURS)])
            self._draw_legend(p, i, self._labels[name], colour, pts)
            if not pts:
                continue
            ys = [y for _, y in pts]
            y0, y1 = min(ys), max(ys)
            if y1 - y0 < 1e-12:
                y0, y1 = y0 - 0.5, y1 + 0.5
            self._draw_axis_labels(p, plot, i, y0, y1, colour)

            def to_px(x: float, y: float, y0: float = y0, y1: float = y1) -> QPointF:
                return QPointF(
                    plot.left() + (x - x0) / (x1 - x0) * plot.width(),
                    plot.bottom() - (y - y0) / (y1 - y0) * plot.height(),
                )

            p.setPen(QPen(colour, 2 if i == 0 else 1.5))
            if len(pts) == 1:
                p.drawEllipse(to_px(*pts[0]), 3, 3)
                continue
            path = QPainterPath(to_px(*pts[0]))
            for x, y in pts[1:]:
                path.lineTo(to_px(x, y))
            p.drawPath(path)
            if i > 0:  # sparse series (validation): mark the points
                for x, y in pts:
                    p.drawEllipse(to_px(x, y), 2.5, 2.5)
        p.setPen(QColor("#9aa0aa"))
        p.drawText(
            QRectF(plot.left(), plot.bottom() + 2, plot.width(), 18), Qt.AlignmentFlag.AlignLeft, f"{x0:g}"
        )
        p.drawText(
            QRectF(plot.left(), plot.bottom() + 2, plot.width(), 18),
            Qt.AlignmentFlag.AlignRight,
            f"step {x1:g}",
        )
        p.end()

    def _draw_legend(self, p: QPainter, i: int, name: str, colour: QColor, pts: list) -> None:
        last = f" {pts[-1][1]:.4g}" if pts else ""
        p.setPen(colour)
        p.drawText(QRectF(46 + 190 * i, 0, 190, 16), Qt.AlignmentFlag.AlignLeft, f"— {name}{last}")

    def _draw_axis_labels(
        self, p: QPainter, plot: QRectF, i: int, y0: float, y1: float, colour: QColor
    ) -> None:
        if i > 1:
            return
        p.setPen(colour)
        if i == 0:
            box_top = QRectF(0, plot.top() - 6, plot.left() - 3, 14)
            box_bot = QRectF(0, plot.bottom() - 8, plot.left() - 3, 14)
            align = Qt.AlignmentFlag.AlignRight
        else:
            box_top = QRectF(plot.right() + 3, plot.top() - 6, 44, 14)
            box_bot = QRectF(plot.right() + 3, plot.bottom() - 8, 44, 14)
            align = Qt.AlignmentFlag.AlignLeft
        p.drawText(box_top, align, f"{y1:.3g}")
        p.drawText(box_bot, align, f"{y0:.3g}")


class TrainingMonitor(QWidget):
    """A small tool window with the live curve (:class:`CurvePlot`) and a status / ETA line.

    It is its own top-level window on purpose: napari's main window holds an OpenGL canvas, and with it every
    repaint of any widget inside that window re-composites the whole window, canvas included (15–50 ms each on
    a software-rendered display, measured in ``benchmarks/bench_responsiveness.py``). A repaint in a separate
    window leaves the main window alone, so a live curve costs the viewer nothing. It floats above its parent
    window (Qt ``Tool``), hides instead of closing, and is shown again with :meth:`show_near`.

    Attributes:
        plot: the curve.
        status_label: the one-line status with the ETA.
    """

    def __init__(self, series: tuple[str, ...] = ("loss", "val"), parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Tool)
        self.setWindowTitle("Fine-tune progress")
        self.plot = CurvePlot(series)
        self.status_label = QLabel("idle")
        # a fixed-size line: live text must not re-layout the window on every update
        self.status_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.status_label)
        self.resize(380, 230)

    def show_near(self, anchor: QWidget | None) -> None:
        """Show (and raise) the window above ``anchor``'s top-level window, at its bottom-left corner."""
        window = anchor.window() if anchor is not None else None
        if window is not None and window is not self and self.parentWidget() is not window:
            self.setParent(window, Qt.WindowType.Tool)  # stays above napari, not in the task bar
        if not self.isVisible() and window is not None and window is not self:
            # over the bottom of the layer list (napari's emptiest corner), clear of the canvas and the docks
            geo = window.frameGeometry()
            self.move(geo.left() + 12, max(geo.top(), geo.bottom() - self.height() - 70))
        self.show()
        self.raise_()
