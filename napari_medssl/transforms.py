"""Intensity and size transforms shared by training and inference (numpy and torch, no Qt).

Training (``engine``) and inference (``inference``, the viewer) call the same functions, so a model sees the
same intensities in both.
"""

from __future__ import annotations

import numpy as np


def normalize_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the [low, high] percentiles of the finite voxels and scale to [0, 1], as float32.

    Works for any modality (CT in HU, MR, 8/16-bit mammograms). NaN/Inf become 0. An image with one value
    becomes all zeros.
    """
    arr = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros_like(arr, dtype=np.float32)
    vals = arr[finite]
    lo, hi = np.percentile(vals, [low, high])
    if hi <= lo:
        out = np.zeros_like(arr, dtype=np.float32)
    else:
        out = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    out[~finite] = 0.0
    return out.astype(np.float32, copy=False)
