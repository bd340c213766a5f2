"""Where the package keeps files on this machine: one cache folder and its sub-folders.

``$MEDSSL_CACHE_DIR``, else pooch's per-user cache for napari-medssl (``~/.cache/napari-medssl`` on Linux), holds
the downloads (sample images, zoo weights fetched by URL) and, each in a sub-folder that its own variable may
move elsewhere, the viewer's fine-tuning runs (``$MEDSSL_RUNS_DIR``) and autosaved labels
(``$MEDSSL_AUTOSAVE_DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "cache_subdir"]


def cache_dir() -> Path:
    """The cache folder: ``$MEDSSL_CACHE_DIR`` or pooch's per-user cache for napari-medssl (not created)."""
    env = os.environ.get("MEDSSL_CACHE_DIR")
    if env:
        return Path(env)
    import pooch

    return Path(pooch.os_cache("napari-medssl"))


def cache_subdir(name: str, env: str | None = None) -> Path:
    """``$env`` when that variable is set, else ``cache_dir() / name``; created."""
    value = os.environ.get(env) if env else None
    folder = Path(value) if value else cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder
