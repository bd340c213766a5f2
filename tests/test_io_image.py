"""PNG/TIFF reading (8/16-bit, gray/RGB), 2D label export, windows and napari layer tuples on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_medssl._reader import get_reader, read_layers
from napari_medssl._writer import write_labels_image
from napari_medssl.io import CT_WINDOWS, layer_data, read_image, volume_from_layer, window_presets

MAMMOGRAM = "mammography_mias/mdb005.png"


@pytest.fixture(scope="module")
def mammogram_16bit(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[np.ndarray, Path, Path]:
    """A real mini-MIAS mammogram scaled to the full 16-bit range (the shipped files are 8-bit)."""
    gray8 = np.asarray(Image.open(data_dir / MAMMOGRAM))
    gray16 = gray8.astype(np.uint16) * 257
    folder = tmp_path_factory.mktemp("mammo16")
    Image.fromarray(gray16).save(folder / "mdb005_16bit.png")
    tifffile.imwrite(folder / "mdb005_16bit.tif", gray16)
    return gray16, folder / "mdb005_16bit.png", folder / "mdb005_16bit.tif"


def test_8bit_mammogram(data_dir: Path) -> None:
    vol = read_image(data_dir / MAMMOGRAM, modality="MG", spacing=(0.2, 0.2))
    assert vol.data.shape == (1024, 1024) and vol.data.dtype == np.uint8 and not vol.rgb
    assert vol.spacing == (0.2, 0.2) and vol.modality == "MG" and not vol.is_label
    lo, hi = vol.window
    tissue = vol.data[vol.data > 0]
    assert lo > 0  # the black padding does not drag the window down
    assert np.mean(tissue < lo) == pytest.approx(0.005, abs=0.005)


@pytest.mark.parametrize("which", [1, 2])
def test_16bit_mammogram_png_and_tiff(mammogram_16bit: tuple[np.ndarray, Path, Path], which: int) -> None:
    gray16, path = mammogram_16bit[0], mammogram_16bit[which]
    vol = read_image(path, modality="MG")
    assert vol.data.dtype == np.uint16 and vol.data.shape == (1024, 1024)
    np.testing.assert_array_equal(vol.data, gray16)
    assert vol.window[1] > 255 * 100  # a 16-bit window, not an 8-bit one
    ((data, kwargs, layer_type),) = read_layers(str(path))
    assert layer_type == "image" and kwargs["contrast_limits"] == list(vol.window)


def test_rgb_fundus_photographs(data_dir: Path, tmp_path: Path) -> None:
    rgb8 = np.load(data_dir / "medmnist/retinamnist.npz")["train_images"][0]
    Image.fromarray(rgb8).save(tmp_path / "fundus.png")
    tifffile.imwrite(tmp_path / "fundus16.tif", rgb8.astype(np.uint16) * 257, photometric="rgb")
    vol = read_image(tmp_path / "fundus.png")
    assert vol.rgb and vol.data.shape == (28, 28, 3) and vol.spacing == (1.0, 1.0)
    np.testing.assert_array_equal(vol.data, rgb8)
    data, kwargs, layer_type = layer_data(vol)
    assert layer_type == "image" and kwargs["rgb"] and "contrast_limits" not in kwargs
    vol16 = read_image(tmp_path / "fundus16.tif")
    assert vol16.rgb and vol16.data.dtype == np.uint16
    np.testing.assert_array_equal(vol16.data, rgb8.astype(np.uint16) * 257)
    assert layer_data(vol16)[1]["contrast_limits"][1] > 255


def test_2d_labels_round_trip_png_and_tiff_stack(data_dir: Path, tmp_path: Path) -> None:
    gray = np.asarray(Image.open(data_dir / MAMMOGRAM))
    labels = (gray > 100).astype(np.uint8) + (gray > 200)  # 0 background, 1 tissue, 2 dense
    (png,) = write_labels_image(str(tmp_path / "mask"), labels, {})
    assert png.endswith("mask.png")
    back = read_image(png)
    assert back.is_label and back.metadata["label_values"] == [0, 1, 2]
    np.testing.assert_array_equal(back.data, labels)
    stack = np.stack([labels, labels[::-1]])
    (tif,) = write_labels_image(str(tmp_path / "stack.tif"), stack.astype(np.int32), {})
    back3 = read_image(tif)
    assert back3.is_label and back3.data.shape == stack.shape
    np.testing.assert_array_equal(back3.data, stack)
    wide = np.full((4, 4), 300, np.uint16)
    np.testing.assert_array_equal(
        read_image(write_labels_image(str(tmp_path / "wide.png"), wide, {})[0]).data, wide
    )


def test_window_presets() -> None:
    ct = np.linspace(-1000, 2000, 10_000).reshape(100, 100)
    presets = window_presets(ct, "CT")
    assert (
        list(presets)[:3] == ["soft_tissue", "lung", "bone"]
        and presets["soft_tissue"] == CT_WINDOWS["soft_tissue"]
    )
    assert presets["full_range"] == (-1000.0, 2000.0)
    mr = np.arange(1000, dtype=np.float32)
    lo, hi = window_presets(mr, "MR")["percentile"]
    assert lo == pytest.approx(5, abs=1) and hi == pytest.approx(994, abs=1)
    flat = np.zeros((8, 8))
    assert window_presets(flat, "MR")["percentile"] == (0.0, 1.0)


def test_reader_dispatch_and_volume_from_layer(data_dir: Path) -> None:
    assert get_reader(str(data_dir / MAMMOGRAM)) is read_layers
    assert get_reader(str(data_dir / "dicom/ct_jpeg2000_no_uids")) is read_layers
    assert get_reader(str(data_dir / "mammography_mias/labels.csv")) is None
    ((data, kwargs, _),) = read_layers(str(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz"))
    vol = volume_from_layer(data, kwargs["metadata"], scale=kwargs["scale"], translate=kwargs["translate"])
    np.testing.assert_array_equal(vol.affine, np.asarray(kwargs["metadata"]["affine"]))
    assert vol.translate == pytest.approx(kwargs["translate"]) and vol.scale == pytest.approx(kwargs["scale"])
