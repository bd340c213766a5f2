"""Autosave of painted labels, so a crash loses no annotation work (numpy only, no Qt).

Files live in ``$MEDSSL_AUTOSAVE_DIR`` or ``~/.cache/napari-medssl/autosave``: one ``.npz`` per (session, image,
labels layer) holding the label array and a JSON header (image and layer names, shape, scale, translate, the
writing process id, time). Writes are atomic (temporary file, fsync, ``os.replace``). A session that closes
cleanly calls :func:`mark_clean`; an autosave whose writer is gone without that mark came from a crash and is
offered back by the viewer.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_medssl._atomic import atomic_write

SESSION_ID = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
KEEP = 20


def autosave_dir() -> Path:
    """The autosave folder (``$MEDSSL_AUTOSAVE_DIR`` or the cache's ``autosave``), created."""
    from napari_medssl.cache import cache_subdir

    return cache_subdir("autosave", "MEDSSL_AUTOSAVE_DIR")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "unnamed"


def autosave_path(image_name: str, layer_name: str, folder: Path | None = None) -> Path:
    """Where this session autosaves ``layer_name`` painted over ``image_name``."""
    folder = folder or autosave_dir()
    return folder / f"{_safe(image_name)}__{_safe(layer_name)}__{SESSION_ID}.npz"


def save_labels(
    labels: np.ndarray,
    image_name: str,
    layer_name: str,
    scale: tuple[float, ...] | None = None,
    translate: tuple[float, ...] | None = None,
    folder: Path | None = None,
) -> Path:
    """Write a labels array atomically; return the file.

    Args:
        labels: painted labels (Z Y X or Y X), 0 = unlabelled.
        image_name: the image the labels belong to.
        layer_name: the Labels layer's name.
        scale: the layer's scale.
        translate: the layer's translate.
        folder: override of :func:`autosave_dir`.
    """
    path = autosave_path(image_name, layer_name, folder)
    header = {
        "image": image_name,
        "layer": layer_name,
        "shape": list(np.shape(labels)),
        "scale": [float(s) for s in scale] if scale is not None else None,
        "translate": [float(t) for t in translate] if translate is not None else None,
        "pid": os.getpid(),
        "session": SESSION_ID,
        "time": time.time(),
        "clean": False,
    }
    _write(path, np.asarray(labels), header)
    _prune(path.parent)
    return path


def _write(path: Path, labels: np.ndarray, header: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, labels=labels, header=np.array(json.dumps(header)))

    atomic_write(path, write)


@dataclass(frozen=True)
class Autosave:
    """One autosaved labels file and its header."""

    path: Path
    header: dict[str, Any]

    @property
    def crashed(self) -> bool:
        """Its writer is gone and never marked it clean."""
        return not self.header.get("clean", False) and not _alive(int(self.header.get("pid", -1)))

    def describe(self) -> str:
        """One line for a menu: layer, image, time."""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.header.get("time", 0)))
        return f"{self.header.get('layer')} on {self.header.get('image')} ({when})"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of an autosave file (labels not loaded)."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["header"]))


def list_autosaves(folder: Path | None = None, crashed_only: bool = False) -> list[Autosave]:
    """Autosaves, newest first; unreadable files are skipped."""
    folder = folder or autosave_dir()
    out = []
    for path in folder.glob("*.npz"):
        try:
            out.append(Autosave(path, read_header(path)))
        except (OSError, ValueError, KeyError):
            continue
    out.sort(key=lambda a: a.header.get("time", 0), reverse=True)
    return [a for a in out if a.crashed] if crashed_only else out


def load_autosave(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(labels, header)`` of an autosave file.

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"autosave not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        return np.array(z["labels"]), json.loads(str(z["header"]))


def mark_clean(folder: Path | None = None) -> int:
    """Mark this session's autosaves as cleanly closed; return how many."""
    n = 0
    for entry in list_autosaves(folder):
        if entry.header.get("session") == SESSION_ID and not entry.header.get("clean"):
            labels, header = load_autosave(entry.path)
            _write(entry.path, labels, {**header, "clean": True})
            n += 1
    return n


def _prune(folder: Path) -> None:
    for entry in list_autosaves(folder)[KEEP:]:
        entry.path.unlink(missing_ok=True)
