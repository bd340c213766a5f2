"""PNG and TIFF (8/16-bit, grayscale or RGB) ↔ :class:`~napari_medssl.io.volume.Volume`.

Mammograms, fundus photographs and 2D label maps. PNG goes through Pillow, TIFF through tifffile
(16-bit RGB and multi-page stacks included; a stack opens as ``(Z, Y, X)``). The header is checked
against the allocation limit before any pixel is decoded. Pixel spacing is not stored reliably in
these formats: it is 1 (pixel units) unless given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .volume import (
    MedicalImageReadError,
    MedicalImageWriteError,
    Volume,
    as_label_array,
    check_allocation,
    display_window,
    label_values,
    source_name,
)
from .windows import window_presets

PNG_SUFFIXES = (".png",)
TIFF_SUFFIXES = (".tif", ".tiff")


def _read_png(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise MedicalImageReadError(
            path, f"the header claims an enormous image; refusing to allocate ({err})"
        ) from None
    except Exception as err:
        raise MedicalImageReadError(path, f"not a readable PNG file ({type(err).__name__}: {err})") from None
    with im:
        width, height = im.size
        check_allocation(path, (height, width, len(im.getbands())), 2)
        facts = {"mode": im.mode, "size": [width, height], "format": im.format}
        try:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("LA", "PA"):
                im = im.convert("L")
            elif im.mode == "1":
                im = im.convert("L")
            data = np.asarray(im)
        except Exception as err:  # truncated streams raise OSError / SyntaxError / zlib errors
            raise MedicalImageReadError(
                path, f"truncated or corrupt PNG data ({type(err).__name__}: {err})"
            ) from None
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype == np.int32 and data.size and data.min() >= 0 and data.max() < 65536:
        data = data.astype(np.uint16)  # Pillow's "I" mode for 16-bit grayscale
    return data, facts


def _read_tiff(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_allocation(path, series.shape, np.dtype(series.dtype).itemsize)
            facts = {"axes": series.axes, "shape": list(series.shape), "dtype": str(series.dtype)}
            data = series.asarray()
    except MedicalImageReadError:
        raise
    except Exception as err:  # tifffile raises TiffFileError, ValueError, OSError ...
        raise MedicalImageReadError(path, f"not a readable TIFF file ({type(err).__name__}: {err})") from None
    return data, facts


def read_image(
    path: str | os.PathLike, *, modality: str | None = None, spacing: tuple[float, float] | None = None
) -> Volume:
    """Read a PNG or TIFF image (8/16-bit, grayscale or RGB; a multi-page TIFF as a stack).

    Args:
        path: ``.png``, ``.tif`` or ``.tiff`` file.
        modality: DICOM modality code (``MG`` for mammograms); ``OT`` (other) when ``None``.
        spacing: ``(dy, dx)`` pixel size in mm; 1 when unknown.

    Returns:
        ``(Y, X)``, ``(Y, X, C)`` or ``(Z, Y, X)``; integer images with few values (a label map) are labels.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MedicalImageReadError: Unsupported suffix, unreadable/truncated data, more than 4 channels, or a
            header claiming more pixels than the allocation limit.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a .png, .tif or .tiff file")
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        data, facts = _read_png(path)
    elif suffix in TIFF_SUFFIXES:
        data, facts = _read_tiff(path)
    else:
        raise MedicalImageReadError(path, f"unsupported suffix {suffix!r}; expected one of .png, .tif, .tiff")
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and facts.get("axes", "YXS").endswith("S")
    if data.ndim == 3 and data.shape[-1] == 4 and rgb:
        data = data[..., :3]
    if data.ndim - int(rgb) not in (2, 3):
        raise MedicalImageReadError(
            path, f"an image of shape {data.shape}; expected 2D gray, RGB or a 3D stack"
        )
    spatial = data.ndim - int(rgb)
    pixel = tuple(float(s) for s in spacing) if spacing else (1.0, 1.0)
    vol_spacing = pixel if spatial == 2 else (1.0, *pixel)
    modality = (modality or "OT").upper()
    values = None if rgb else label_values(data)
    metadata: dict[str, Any] = {
        "format": "png" if suffix in PNG_SUFFIXES else "tiff",
        "source": str(path),
        "header": facts,
        "rgb": rgb,
        "warnings": [] if spacing else ["pixel spacing unknown: 1 (pixel units)"],
        "spacing_known": bool(spacing),
    }
    data, window = display_window(data, values, metadata, lambda d: _image_window(d, rgb, modality))
    return Volume(
        data=data,
        spacing=vol_spacing,
        modality=modality,
        window=window,
        name=source_name(path),
        is_label=values is not None,
        metadata=metadata,
    )


def _image_window(
    data: np.ndarray, rgb: bool, modality: str
) -> tuple[str, tuple[float, float], dict[str, tuple[float, float]]]:
    """8-bit colour: its full range; otherwise the first window preset (of the gray mean for colour)."""
    if rgb and data.dtype == np.uint8:
        return "full_range", (0.0, 255.0), {"full_range": (0.0, 255.0)}
    presets = window_presets(data if not rgb else data.mean(axis=-1), modality)
    return (*next(iter(presets.items())), presets)


def write_image_labels(path: str | os.PathLike, data: np.ndarray) -> str:
    """Write a label map as PNG (2D, values up to 65535) or TIFF (2D or a 3D stack).

    Args:
        path: Destination ending in ``.png``, ``.tif`` or ``.tiff``.
        data: Non-negative integer labels ``(Y, X)`` (or ``(Z, Y, X)`` for TIFF).

    Returns:
        The written path.

    Raises:
        MedicalImageWriteError: Wrong suffix, wrong number of axes, negative or non-integer values, or
            values above 65535 for PNG.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    data = np.asarray(data)
    if suffix not in PNG_SUFFIXES + TIFF_SUFFIXES:
        raise MedicalImageWriteError(f"{path}: label images are written as .png, .tif or .tiff")
    if data.dtype != bool and not np.issubdtype(data.dtype, np.integer):
        raise MedicalImageWriteError(f"{path}: labels must be integers, got dtype {data.dtype}")
    if data.size and data.min() < 0:
        raise MedicalImageWriteError(f"{path}: labels must be non-negative, got a minimum of {data.min()}")
    allowed = (2,) if suffix in PNG_SUFFIXES else (2, 3)
    if data.ndim not in allowed:
        raise MedicalImageWriteError(
            f"{path}: {suffix} label export takes a {' or '.join(f'{n}D' for n in allowed)} array, got shape "
            f"{data.shape}; write volumes as .nii.gz"
        )
    labels = as_label_array(data.astype(np.uint8) if data.dtype == bool else data)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in PNG_SUFFIXES:
        if labels.dtype == np.uint32:
            raise MedicalImageWriteError(
                f"{path}: PNG holds labels up to 65535, got {int(labels.max())}; use .tif"
            )
        from PIL import Image

        Image.fromarray(labels).save(path)
    else:
        import tifffile

        tifffile.imwrite(path, labels, photometric="minisblack")
    return str(path)
