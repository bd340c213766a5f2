"""The reader, writer and sample data inside a real napari viewer (run under ``xvfb-run -a``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_medssl.io import grid_metadata, read_nifti

pytestmark = [pytest.mark.gui, pytest.mark.timeout(120)]

STUDY = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"


def test_open_series_paint_and_save_labels_in_napari(
    make_napari_viewer, data_dir: Path, tmp_path: Path, test_output: Path
) -> None:
    import napari

    viewer = make_napari_viewer(show=True)  # a hidden viewer's screenshot is black under Xvfb
    layers = viewer.open(str(data_dir / STUDY), plugin="napari-medssl")
    assert len(layers) == 5
    image = next(lay for lay in layers if lay.name == "T1post")
    mask = next(lay for lay in layers if isinstance(lay, napari.layers.Labels))
    assert image.name == "T1post" and mask.name == "Mask_Tumor"
    assert mask.metadata["reference_series"] == "T1post"
    np.testing.assert_allclose(image.scale, mask.scale)
    np.testing.assert_allclose(image.translate, mask.translate)
    assert tuple(image.contrast_limits) == tuple(image.metadata["window"]["range"])
    for layer in layers:
        layer.visible = layer in (image, mask)
    z = int(np.argmax(mask.data.sum(axis=(1, 2))))
    viewer.dims.set_point(0, float(image.translate[0] + image.scale[0] * z))
    viewer.screenshot(str(test_output / "io_t1post_mask.png"), canvas_only=True)

    painted = viewer.add_labels(
        np.zeros(image.data.shape, np.uint8),
        name="painted",
        scale=image.scale,
        translate=image.translate,
        metadata=grid_metadata(image.metadata),
    )
    painted.data[12, 100:140, 100:140] = 2
    (out,) = napari.save_layers(str(tmp_path / "painted.nii.gz"), [painted], plugin="napari-medssl")
    back = read_nifti(out)
    np.testing.assert_array_equal(back.data, painted.data)
    np.testing.assert_allclose(back.affine, np.asarray(image.metadata["affine"]), atol=1e-4)


def test_sample_data_and_bad_input_in_napari(
    make_napari_viewer, data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MEDSSL_DATA_DIR", str(data_dir))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medssl", "hippocampus")
    assert [lay.name for lay in viewer.layers] == ["hippocampus_001", "hippocampus_001 labels"]
    assert viewer.layers[1].metadata["label_values"] == [0, 1, 2]
    from pydicom.data import get_testdata_file

    bad = tmp_path / "rtstruct.dcm"
    bad.write_bytes(Path(get_testdata_file("rtstruct.dcm")).read_bytes())
    with pytest.raises(Exception, match="no pixel data"):
        viewer.open(str(bad), plugin="napari-medssl")
