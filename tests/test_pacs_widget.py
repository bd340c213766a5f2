"""The PACS dock against a real Orthanc holding a TCIA series (run under ``xvfb-run -a``): search, open the series,
send labels painted on it back as a DICOM SEG, find that SEG and open it on the series' grid.

Screenshot: ``test_output/widget_pacs.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_medssl import pacs
from napari_medssl._widgets import ModelWidget, PacsWidget
from napari_medssl._writer import seg_source
from napari_medssl.io import read_dicom
from napari_medssl.io.dicom_seg import read_seg

pytestmark = pytest.mark.gui
STUDY = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"


def _wait(qtbot, dock: PacsWidget) -> None:
    qtbot.waitUntil(lambda: dock._worker is None, timeout=60_000)


def test_pacs_dock_search_open_send_seg_and_open_it_back(
    make_napari_viewer, qtbot, orthanc_url, data_dir, tmp_path, monkeypatch, test_output
) -> None:
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache"))
    for name in (pacs.ENV_TOKEN, pacs.ENV_USER, pacs.ENV_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    t1post = sorted((data_dir / STUDY / "11-T1post-03326").glob("*.dcm"))
    client = pacs.connect(orthanc_url)
    pacs.push(
        client, t1post
    )  # the whole 25-slice series (other tests may have stored a few slices of it too)
    (mask,) = read_dicom(data_dir / STUDY / "5364-MaskTumor-94345")  # real tumour outline, painted by hand

    viewer = make_napari_viewer()
    dock = PacsWidget(viewer)
    viewer.window.add_dock_widget(dock, name="PACS", area="right")
    dock.url_edit.setText(orthanc_url)
    dock.patient_edit.setText("PGBM-001")
    dock.modality_combo.setCurrentText("MR")
    dock.search()
    _wait(qtbot, dock)
    series = str(pydicom.dcmread(t1post[0], stop_before_pixels=True).SeriesInstanceUID)
    row = next(i for i, r in enumerate(dock.rows) if r["series_uid"] == series)
    assert dock.table.item(row, 3).text() == "T1post" and dock.table.item(row, 2).text() == "MR"
    dock.table.selectRow(row)
    dock.open_selected()
    _wait(qtbot, dock)
    image = viewer.layers["T1post"]
    assert image.data.shape == (25, 320, 260) and image.metadata["format"] == "dicom"
    assert Path(image.metadata["source"]).is_relative_to(tmp_path / "cache" / "pacs")

    # the Model dock's prediction on the pulled series carries its DICOM source and provenance
    model_dock = ModelWidget(viewer)
    model_dock.select("unet_tiny_hippocampus", device="cpu")
    model_dock.scope_combo.setCurrentText("current slice")
    model_dock.run()
    qtbot.waitUntil(lambda: model_dock._worker is None, timeout=120_000)
    predicted = viewer.layers["T1post segmentation"]
    files, kwargs = seg_source(predicted.data, {"metadata": predicted.metadata}, viewer.layers)
    assert files == image.metadata["files"]
    assert kwargs["provenance"]["model"] == "unet_tiny_hippocampus"
    assert kwargs["provenance"]["source_series_uid"] == str(
        pydicom.dcmread(t1post[0], stop_before_pixels=True).SeriesInstanceUID
    )
    assert kwargs["segment_codes"]["anterior"]["type"] == "Hippocampus"
    viewer.layers.remove(predicted)

    painted = viewer.add_labels(
        mask.data.copy(), name="tumour (painted)", scale=image.scale, translate=image.translate
    )  # a plain new Labels layer: the dock finds its DICOM series from the image with the same grid
    dock.labels_combo.setCurrentText(painted.name)
    # napari's own "save layer" picks the plugin's DICOM SEG writer for .dcm, the series found from the image
    viewer.layers.selection.active = painted
    (saved,) = viewer.layers.save(str(tmp_path / "painted.dcm"), selected=True, plugin="napari-medssl")
    np.testing.assert_array_equal(read_seg(saved, source=image.metadata["source"]).data, mask.data)
    segs_before = {r["series_uid"] for r in pacs.find(client, modality="SEG")}  # the session's PACS is shared
    dock.send_labels()
    _wait(qtbot, dock)
    assert "SEG stored" in dock.status_label.text(), dock.status_label.text()

    dock.patient_edit.setText("")
    dock.modality_combo.setCurrentText("SEG")
    dock.search()
    _wait(qtbot, dock)
    (new,) = [i for i, r in enumerate(dock.rows) if r["series_uid"] not in segs_before]
    assert dock.rows[new]["modality"] == "SEG"
    dock.table.selectRow(new)
    dock.open_selected()
    _wait(qtbot, dock)
    seg = viewer.layers[-1]
    assert seg.metadata["format"] == "dicom-seg" and seg.metadata["reference_series_uid"] == series
    np.testing.assert_array_equal(seg.data, mask.data)
    np.testing.assert_allclose(seg.scale, image.scale)
    np.testing.assert_allclose(seg.translate, image.translate)

    viewer.layers.remove(painted)
    dock.patient_edit.setText("PGBM-001")
    dock.modality_combo.setCurrentText("")
    dock.search()  # the patient's series on the server: the MR series and the SEG sent back
    _wait(qtbot, dock)
    assert {"MR", "SEG"} <= {r["modality"] for r in dock.rows}
    z = int(np.argmax(mask.data.sum(axis=(1, 2))))  # the slice with the most tumour
    viewer.dims.set_point(0, float(image.translate[0] + image.scale[0] * z))
    viewer.window._qt_window.resize(1600, 1000)
    qtbot.wait(300)
    path = test_output / "widget_pacs.png"
    viewer.screenshot(str(path), canvas_only=False)
    assert path.stat().st_size > 10_000


def test_pacs_dock_reports_an_unreachable_server(make_napari_viewer, qtbot) -> None:
    viewer = make_napari_viewer()
    dock = PacsWidget(viewer)
    dock.url_edit.setText("http://127.0.0.1:9/dicom-web")
    dock.search()
    _wait(qtbot, dock)
    assert "cannot reach the PACS" in dock.status_label.text()
    assert dock.search_btn.isEnabled()
