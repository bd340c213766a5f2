"""Attention maps of one image file written as files: the work behind ``medssl attention`` (no Qt).

:func:`image_plane` reads any image the readers open (PNG/TIFF, NIfTI, a DICOM file or series folder) and takes
one 2D plane of it: the image itself, or a slice of a volume (the middle one unless asked). :func:`write_attention`
runs a ViT's last-layer [CLS] attention at the overlay resolution (:func:`napari_medssl.overlays.
attention_input_size`: the image's own size capped by a CPU/GPU budget, never below a 64 × 64 patch grid) and
writes, in the output folder:

- ``head_0.tif``, ``head_1.tif``, ... — one float32 map per head on the input plane's pixel grid: each pixel
  holds the softmax weight of the patch covering it (raw weights, so a head's patch weights sum to just under
  1; min-max normalise for display);
- ``mask_0.tif``, ... (uint8 0/1) when a mass threshold is given: DINO's masks, the patches holding that share
  of the head's attention;
- ``attention.json`` — ``grid`` ``[gh, gw]``, ``input_size`` ``[y, x]``, the plane's ``shape``, per head its
  ``tissue_lift`` (:func:`napari_medssl.overlays.tissue_lift` of the written map against the plane), the best
  head, and the settings (model, input, slice, size, head, threshold, device).

Axis legend: Z Y X space, H heads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_medssl import overlays

VALUES = "softmax weight of the last block's [CLS] query on the patch covering each pixel (per head)"


def image_plane(
    path: str | os.PathLike, slice_index: int | None = None
) -> tuple[overlays.Plane, dict[str, Any]]:
    """The 2D plane of an image file that ``medssl attention`` looks at, and what was taken.

    Args:
        path: a PNG/TIFF image, a NIfTI file, a DICOM file or a DICOM series folder.
        slice_index: for a volume, the slice along its first axis (Z); default the middle one. Ignored (must
            be ``None`` or 0) for a 2D image.

    Returns:
        ``(plane, info)`` with ``info`` = ``{"input", "ndim", "shape", "slice"}`` (``slice`` ``None`` for 2D).

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: an unreadable file, more than 3 spatial axes, or a slice outside the volume.
    """
    from napari_medssl.engine import readers

    vol = readers.read_any(path)
    data = np.asarray(vol.data)
    rgb = bool(getattr(vol, "rgb", False))
    spatial = data.shape[:-1] if rgb else data.shape
    if len(spatial) == 2:
        if slice_index not in (None, 0):
            raise ValueError(f"{path} is a 2D image; --slice applies to volumes only")
        plane = overlays.take_plane(data, None, (0, 1), rgb=rgb)
        return plane, {"input": str(path), "ndim": 2, "shape": list(spatial), "slice": None}
    if len(spatial) != 3:
        raise ValueError(f"{path}: expected a 2D image or a 3D volume, got an array of shape {data.shape}")
    z = spatial[0] // 2 if slice_index is None else int(slice_index)
    if not 0 <= z < spatial[0]:
        raise ValueError(
            f"--slice {z} is outside the volume {path} ({spatial[0]} slices: 0..{spatial[0] - 1})"
        )
    plane = overlays.take_plane(data, (z, 0, 0), (1, 2), rgb=rgb)
    return plane, {"input": str(path), "ndim": 3, "shape": list(spatial), "slice": z}


def _round(v: float) -> float | None:
    return None if not math.isfinite(v) else round(float(v), 4)


def write_attention(
    model: Any,
    plane: overlays.Plane,
    out: str | os.PathLike,
    size: int | None = None,
    head: int | None = None,
    threshold: float | None = None,
    device: Any = "cpu",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``head_k.tif`` (and ``mask_k.tif``) and ``attention.json`` for one plane; return the JSON record.

    Args:
        model: a ViT-based model (DINO, MAE, MSMAE, MIRAM, ViT classifiers).
        plane: the 2D plane (:func:`image_plane` or :func:`napari_medssl.overlays.take_plane`).
        out: output folder (created).
        size: the long side to run the model at, pixels (``None``: the default resolution).
        head: write only this head (0-based); ``None`` for every head.
        threshold: mass threshold in (0, 1] for DINO's masks; ``None`` writes no masks.
        device: torch device.
        settings: more facts for the JSON (input path, slice ...).

    Raises:
        ValueError: not a ViT-based model, a head out of range, a bad threshold or resolution.
    """
    import tifffile

    from napari_medssl.models.attention import mass_threshold_masks

    n_heads = int(overlays._vit_of(model).num_heads)
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"--head {head} out of range: this model has {n_heads} heads (0..{n_heads - 1})")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    att = overlays.attention_heads(model, plane, size, device)
    heads = list(range(n_heads)) if head is None else [head]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for h in heads:
        tifffile.imwrite(out / f"head_{h}.tif", att["weights"][h].astype(np.float32))
        files.append(f"head_{h}.tif")
    if threshold is not None:
        masks = mass_threshold_masks(att["raw"][None], threshold)[0]
        masks = overlays._grid_to_plane(
            masks, att["patch_pixels"], att["input_size"], plane.data.shape, nearest=True
        )
        for h in heads:
            tifffile.imwrite(out / f"mask_{h}.tif", masks[h].astype(np.uint8))
            files.append(f"mask_{h}.tif")
    lift = [_round(v) for v in att["tissue_lift"]]
    finite = [(v, h) for h, v in enumerate(lift) if v is not None]
    record = {
        "grid": list(att["grid"]),
        "input_size": list(att["input_size"]),
        "shape": list(plane.data.shape),
        "heads": heads,
        "num_heads": n_heads,
        "tissue_lift": lift,
        "best_head": max(finite)[1] if finite else None,
        "best_tissue_lift": max(finite)[0] if finite else None,
        "values": VALUES,
        "tissue_lift_definition": (
            "per head: share of the map's mass on pixels above the plane's Otsu threshold / share of such "
            "pixels (1 = blind to anatomy, > 1 on tissue, < 1 on background)"
        ),
        "files": files,
        "settings": {
            "size": size,
            "head": head,
            "threshold": threshold,
            "device": str(device),
            **(settings or {}),
        },
    }
    (out / "attention.json").write_text(json.dumps(record, indent=1))
    return record
