"""The PACS dock: search a DICOMweb server, open a series in napari, send labels back as a DICOM SEG.

Thin over :mod:`napari_medssl.pacs` (search, pull, push; credentials from the environment or the keyring, TLS
verified) and :mod:`napari_medssl.io.dicom_seg`: every request runs in a napari thread worker, a pulled series
goes into the cache folder (``pacs.cache_dir()``) and opens with this plugin's DICOM reader.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from napari.layers import Labels
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_medssl import pacs
from napari_medssl._widgets._common import LayerCombo, guarded, report_error

DEFAULT_URL = "http://127.0.0.1:8042/dicom-web"
"""Shown when ``$MEDSSL_PACS_URL`` is unset: a local Orthanc's DICOMweb root."""
MODALITIES = ("", "MR", "CT", "SEG", "PT", "MG", "CR", "DX", "US")
COLUMNS = ("Patient", "Date", "Mod.", "Series", "Images")
MAX_ROWS = 500
"""Series one search lists at most (an unfiltered search of a hospital PACS would list them all)."""


def search(url: str, patient: str, modality: str) -> list[dict[str, Any]]:
    """QIDO search (worker thread): at most :data:`MAX_ROWS` series."""
    return pacs.find(pacs.connect(url), patient=patient or None, modality=modality or None, limit=MAX_ROWS)


def open_series(url: str, row: dict[str, Any]) -> str:
    """Pull a series into the cache (worker thread); returns the folder to open."""
    return str(pacs.pull_for_viewing(pacs.connect(url), row))


def send_seg(url: str, data: np.ndarray, files: list[str], kwargs: dict[str, Any]) -> str:
    """Build a SEG from labels on their source series and STOW it (worker thread); returns its series UID."""
    from napari_medssl.io.dicom_seg import build_seg

    seg = build_seg(data, files, **kwargs)
    pacs.push(pacs.connect(url), [seg])
    return str(seg.SeriesInstanceUID)


class PacsWidget(QWidget):
    """Dock: server URL, search (patient, modality), results, open a series, send labels as SEG."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker: Any = None
        self.rows: list[dict[str, Any]] = []
        self.url_edit = QLineEdit(os.environ.get("MEDSSL_PACS_URL", DEFAULT_URL))
        self.url_edit.setToolTip(
            "DICOMweb root. Credentials: $MEDSSL_PACS_TOKEN, or $MEDSSL_PACS_USER + $MEDSSL_PACS_PASSWORD, or the "
            f"keyring ({pacs.KEYRING_SERVICE}, entry = this URL). TLS is verified ($MEDSSL_PACS_CA_BUNDLE)."
        )
        self.patient_edit = QLineEdit()
        self.patient_edit.setPlaceholderText("Patient ID (* and ? allowed)")
        self.modality_combo = QComboBox()
        self.modality_combo.addItems(MODALITIES)
        self.search_btn = QPushButton("Search")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.open_btn = QPushButton("Open series")
        self.labels_combo = LayerCombo(napari_viewer, Labels)
        self.send_btn = QPushButton("Send labels as SEG")
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        form = QFormLayout()
        form.addRow("Server", self.url_edit)
        form.addRow("Patient", self.patient_edit)
        form.addRow("Modality", self.modality_combo)
        send = QHBoxLayout()
        send.addWidget(self.labels_combo, 1)
        send.addWidget(self.send_btn)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.search_btn)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.open_btn)
        layout.addWidget(QLabel("Labels"))
        layout.addLayout(send)
        layout.addWidget(self.status_label)

        self.setMinimumWidth(440)  # room for the results table's series descriptions
        self.search_btn.clicked.connect(self.search)
        self.patient_edit.returnPressed.connect(self.search)
        self.open_btn.clicked.connect(self.open_selected)
        self.table.cellDoubleClicked.connect(lambda *_: self.open_selected())
        self.send_btn.clicked.connect(self.send_labels)

    # -- plumbing --------------------------------------------------------------------------------------------
    def _start(self, what: str, done: Any, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in a thread worker; ``done(result)`` in the GUI thread, errors as notifications."""
        if self._worker is not None:
            self.status_label.setText("busy: wait for the current request")
            return None
        self.status_label.setText(f"{what}…")
        for b in (self.search_btn, self.open_btn, self.send_btn):
            b.setEnabled(False)
        worker = create_worker(guarded, fn, *args)

        def returned(out: dict[str, Any]) -> None:
            if "error" in out:
                self.status_label.setText(f"{what} failed: {out['error']}")
                report_error(out["error"], f"PACS: {what} failed")
            else:
                done(out["result"])

        worker.returned.connect(returned)
        worker.finished.connect(self._finished)
        self._worker = worker
        worker.start()
        return worker

    def _finished(self) -> None:
        self._worker = None
        for b in (self.search_btn, self.open_btn, self.send_btn):
            b.setEnabled(True)

    # -- actions ---------------------------------------------------------------------------------------------
    def search(self) -> Any:
        """Search the server for series (QIDO-RS); fills the results table."""
        url = self.url_edit.text().strip()
        args = (url, self.patient_edit.text().strip(), self.modality_combo.currentText())
        return self._start("search", self._show_rows, search, *args)

    def _show_rows(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            date = str(r["study_date"] or "")
            cells = (
                r["patient_id"] or "",
                f"{date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 else date,
                r["modality"] or "",
                r["description"] or r["series_uid"],
                "" if r["instances"] is None else str(r["instances"]),
            )
            for j, text in enumerate(cells):
                item = QTableWidgetItem(str(text))
                item.setToolTip(f"SeriesInstanceUID {r['series_uid']}")
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()
        self.table.horizontalHeader().setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        more = " (the first ones: narrow the search)" if len(rows) >= MAX_ROWS else ""
        self.status_label.setText(f"{len(rows)} series on {self.url_edit.text().strip()}{more}")

    def open_selected(self) -> Any:
        """Pull the selected series into the cache (WADO-RS) and open it with the plugin's DICOM reader."""
        row = self.table.currentRow()
        if not 0 <= row < len(self.rows):
            self.status_label.setText("select a series first")
            return None
        chosen = self.rows[row]
        return self._start(
            f"pull {chosen['description'] or chosen['series_uid']}",
            self._open_folder,
            open_series,
            self.url_edit.text().strip(),
            chosen,
        )

    def _open_folder(self, folder: str) -> None:
        layers = self.viewer.open(folder, plugin="napari-medssl")
        self.status_label.setText(f"opened {', '.join(layer.name for layer in layers)}")
        self.status_label.setToolTip(f"cached in {folder}")

    def send_labels(self) -> Any:
        """Send the chosen Labels layer to the server as a DICOM SEG on its source series (STOW-RS)."""
        from napari_medssl._writer import seg_source

        layer = self.labels_combo.layer()
        try:
            if layer is None:
                raise ValueError("no Labels layer: predict or paint labels on a DICOM series first")
            attributes = {"metadata": layer.metadata, "scale": layer.scale, "translate": layer.translate}
            data = np.asarray(layer.data)
            files, kwargs = seg_source(data, attributes, self.viewer.layers)
        except Exception as err:
            self.status_label.setText(f"cannot send: {err}")
            report_error(err, "PACS: cannot send the labels")
            return None
        return self._start(
            f"send {layer.name} as SEG",
            self._sent,
            send_seg,
            self.url_edit.text().strip(),
            data,
            files,
            kwargs,
        )

    def _sent(self, series_uid: str) -> None:
        self.status_label.setText("SEG stored on the server")
        self.status_label.setToolTip(f"SeriesInstanceUID {series_uid}")
