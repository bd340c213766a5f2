"""npe2 reader: DICOM files and folders, NIfTI, PNG/TIFF → napari layers (thin adapter over ``io``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_medssl.io import detect_format, layer_data, read
from napari_medssl.io.volume import MedicalImageReadError

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]
LayerDataList = list[tuple]


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], LayerDataList] | None:
    """Return :func:`read_layers` when every path is a format this plugin reads, else ``None``."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or any(detect_format(p) is None for p in paths):
        return None
    return read_layers


def read_layers(path: PathOrPaths) -> LayerDataList:
    """Read a path (or paths) into napari ``LayerData`` tuples: one image or labels layer per volume.

    Raises:
        MedicalImageReadError: The input cannot be read; the message names the file and the reason
            (napari shows it as a notification).
    """
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    for p in paths:
        if not Path(p).exists():
            raise MedicalImageReadError(p, "the path does not exist")
    return [layer_data(v) for v in read(paths if len(paths) > 1 else paths[0])]
