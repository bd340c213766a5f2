"""Display windows (napari contrast limits) by modality.

CT uses fixed Hounsfield windows (soft tissue is the default); every other modality (MR, mammography
and other photographs) uses percentiles of the image, since their intensities have no absolute scale.
Mammograms are padded with black borders, so their percentiles ignore zero pixels.
"""

from __future__ import annotations

import numpy as np

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (-160.0, 240.0),  # level 40, width 400
    "lung": (-1350.0, 150.0),  # level -600, width 1500
    "bone": (-450.0, 1050.0),  # level 300, width 1500
}
"""Hounsfield-unit windows as ``(lo, hi)``."""

PERCENTILES: dict[str, tuple[float, float]] = {
    "MR": (0.5, 99.5),
    "MG": (0.5, 99.5),
    "default": (0.5, 99.5),
}
"""Percentile windows per modality (``default`` for everything that is neither CT nor listed)."""

_MAX_SAMPLES = 100_000


def _sample(data: np.ndarray, ignore_zero: bool) -> np.ndarray:
    """A strided sample of at most ~100k finite values (the window of a 100M-voxel CT in milliseconds)."""
    flat = data.reshape(-1)
    sample = flat[:: max(1, flat.size // _MAX_SAMPLES)]
    if ignore_zero:
        nonzero = sample[sample != 0]
        sample = nonzero if nonzero.size else sample
    if np.issubdtype(sample.dtype, np.floating):
        sample = sample[np.isfinite(sample)]
    return sample


def percentile_window(
    data: np.ndarray, lo_pct: float, hi_pct: float, ignore_zero: bool = False
) -> tuple[float, float]:
    """``(lo, hi)`` at the given percentiles of ``data`` (``hi > lo`` always).

    Args:
        data: Any shape; colour images should be passed as luminance or per channel.
        lo_pct: Lower percentile in [0, 100].
        hi_pct: Upper percentile in [0, 100].
        ignore_zero: Leave out zero pixels (black padding of mammograms).
    """
    sample = _sample(data, ignore_zero)
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(sample, [lo_pct, hi_pct]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def full_range(data: np.ndarray) -> tuple[float, float]:
    """Exact ``(min, max)`` of the finite values (``hi > lo`` always)."""
    if data.size == 0:
        return 0.0, 1.0
    lo, hi = float(np.min(data)), float(np.max(data))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return percentile_window(data, 0.0, 100.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def window_presets(data: np.ndarray, modality: str) -> dict[str, tuple[float, float]]:
    """All windows that make sense for ``modality``; the first entry is the default.

    Args:
        data: The image (napari order; no colour axis).
        modality: DICOM modality code (``CT``, ``MR``, ``MG`` ...).

    Returns:
        Name → ``(lo, hi)``; CT gets ``soft_tissue``, ``lung``, ``bone`` and ``full_range``; the others
        ``percentile`` and ``full_range``.
    """
    modality = (modality or "OT").upper()
    full = full_range(data)
    if modality == "CT":
        return {**CT_WINDOWS, "full_range": full}
    lo_pct, hi_pct = PERCENTILES.get(modality, PERCENTILES["default"])
    pct = percentile_window(data, lo_pct, hi_pct, ignore_zero=modality in ("MG", "OT"))
    return {"percentile": pct, "full_range": full}


def default_window(data: np.ndarray, modality: str) -> tuple[str, tuple[float, float]]:
    """The default window name and ``(lo, hi)`` for ``modality`` (CT soft tissue, otherwise percentiles)."""
    name, window = next(iter(window_presets(data, modality).items()))
    return name, window
