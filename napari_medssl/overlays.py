"""Pictures of what the models attend to and how they mask, for display over an image (numpy/torch, no Qt).

Every function takes a :class:`Plane` (a 2D image, or one slice of a volume, with its geometry) or a volume,
and returns :class:`OverlayLayer` records: an array, its kind (``"image"`` or ``"labels"``), the ``scale`` and
``translate`` that put it on the image's grid, and plain style keywords (blending, colormap). The viewer turns
each record into a napari layer; a notebook can plot the arrays.

- :func:`dino_overlays` — DINO's per-head [CLS] attention (``models.dino.attention_maps``, the same function the
  DINO-attention CNN feeds on) and the per-head mass-threshold masks (``models.vit.mass_threshold_masks``).
- :func:`msmae_overlays` — MSMAE's attention weight map and its sampled mask / throw / keep pattern.
- :func:`mae_overlays` — MAE's random mask, its reconstruction and the reconstruction with visible patches
  pasted back.
- :func:`mim_overlays` — MiM's nested 3D masks on a volume.

Maps computed at the model's input size are resized back to the plane's pixel grid, so a layer always covers
the image exactly. A slice of a volume comes back as a one-slice volume (``(1, Y, X)`` for an axial slice)
placed at that slice, so it does not smear over the other slices.

Axis legend: B batch, C channels, Z Y X space, H heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEAD_COLORMAPS = ("magenta", "green", "cyan", "yellow", "red", "blue", "bop orange", "bop purple")
HEAD_COLORS = ((1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 0, 0), (0, 0, 1), (1, 0.55, 0), (0.6, 0.2, 1))
MSMAE_COLORS = {1: (0.2, 0.85, 0.3, 0.25), 2: (0.15, 0.45, 1.0, 0.6), 3: (0.0, 0.0, 0.0, 0.8)}
MIM_COLORS = {
    1: (1.0, 0.85, 0.1, 0.3),
    2: (1.0, 0.45, 0.0, 0.5),
    3: (0.9, 0.0, 0.25, 0.7),
    4: (0.5, 0.0, 0.6, 0.8),
}
CLEAR = (0.0, 0.0, 0.0, 0.0)


def label_colors(colors: dict[int, Sequence[float]]) -> dict[Any, tuple[float, ...]]:
    """A labels colour table (value → RGBA), everything else transparent."""
    return {None: CLEAR, 0: CLEAR, **{int(k): tuple(float(c) for c in v) for k, v in colors.items()}}


@dataclass(frozen=True)
class Plane:
    """A 2D plane of an nD image and where it sits.

    Attributes:
        data: the plane's raw intensities ``(Y, X)`` (any dtype; RGB already averaged to grey).
        ndim: dimensions of the source image (2 for a 2D image).
        axes: the two source axes the plane spans (the displayed ones).
        index: per source axis, the slice index taken, or ``None`` for the plane's two axes.
        scale: the source image's scale (one per axis).
        translate: the source image's translate (one per axis).
    """

    data: np.ndarray
    ndim: int
    axes: tuple[int, int]
    index: tuple[int | None, ...]
    scale: tuple[float, ...]
    translate: tuple[float, ...]

    def embed(self, arr: np.ndarray) -> np.ndarray:
        """Put a plane-shaped ``(..., Y, X)`` array back into the source's axes (size 1 on sliced axes).

        Leading axes of ``arr`` (e.g. heads) are kept in front.
        """
        lead = arr.ndim - 2
        out = arr
        for ax in range(self.ndim):
            if ax not in self.axes:
                out = np.expand_dims(out, lead + ax)
        return out

    def geometry(self) -> dict[str, tuple[float, ...]]:
        """``scale`` and ``translate`` for :meth:`embed`-ed arrays (sliced axes moved onto their slice)."""
        translate = tuple(
            t if i is None else t + i * s for t, s, i in zip(self.translate, self.scale, self.index)
        )
        return {"scale": tuple(self.scale), "translate": translate}


def take_plane(
    data: Any,
    point: Sequence[int] | None = None,
    axes: Sequence[int] = (-2, -1),
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    rgb: bool = False,
) -> Plane:
    """Cut the plane spanned by ``axes`` through ``point`` out of an nD image.

    Args:
        data: image array (``Z Y X``, ``Y X``; with a trailing colour axis when ``rgb``); dask arrays work,
            only the plane is read.
        point: an index per spatial axis (the viewer's current step); ignored on ``axes``.
        axes: the two axes of the plane (the viewer's displayed axes).
        scale: the image's scale per spatial axis (default 1).
        translate: the image's translate per spatial axis (default 0).
        rgb: the last axis is colour; it is averaged.

    Raises:
        ValueError: fewer than 2 spatial axes, bad axes, or an index outside the image.
    """
    shape = tuple(np.shape(data))[: -1 if rgb else None]
    nd = len(shape)
    if nd < 2:
        raise ValueError(f"an image needs at least 2 spatial axes, got shape {shape}")
    ax = tuple(sorted(a % nd for a in axes))
    if len(ax) != 2 or ax[0] == ax[1]:
        raise ValueError(f"axes must name two different axes of a {nd}D image, got {tuple(axes)}")
    point = tuple(int(p) for p in (point if point is not None else [0] * nd))[-nd:]
    if len(point) != nd:
        raise ValueError(f"point needs {nd} indices, got {point}")
    index = tuple(None if i in ax else point[i] for i in range(nd))
    for i, (idx, size) in enumerate(zip(index, shape)):
        if idx is not None and not 0 <= idx < size:
            raise ValueError(f"slice index {idx} on axis {i} is outside the image (size {size})")
    sl = tuple(slice(None) if i is None else i for i in index)
    plane = np.asarray(data[sl])
    if rgb:
        plane = plane[..., :3].astype(np.float32).mean(axis=-1)
    scale = tuple(float(s) for s in (scale if scale is not None else [1.0] * nd))[-nd:]
    translate = tuple(float(t) for t in (translate if translate is not None else [0.0] * nd))[-nd:]
    return Plane(plane, nd, ax, index, scale, translate)


@dataclass
class OverlayLayer:
    """One layer to show: data on the image's grid plus how to draw it.

    Attributes:
        kind: ``"image"`` or ``"labels"``.
        name: layer name.
        data: the array, in the source image's axes.
        scale: per axis, as the image's.
        translate: per axis (shifted onto the slice for a plane).
        style: drawing keywords for the layer (``blending``, ``colormap``, ``opacity``, ``contrast_limits``,
            ``visible``).
        metadata: facts about how it was made (method, seed, ratios, threshold, head).
    """

    kind: str
    name: str
    data: np.ndarray
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    style: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _layer(plane: Plane, kind: str, name: str, arr: np.ndarray, style: dict, meta: dict) -> OverlayLayer:
    return OverlayLayer(kind, name, plane.embed(arr), **plane.geometry(), style=style, metadata=meta)


# -- model input / output resizing ----------------------------------------------------------------------------
def model_input(plane: np.ndarray, model: Any, device: Any = "cpu") -> Any:
    """A plane as the model's input tensor ``(1, C, Y, X)``: normalised to [0, 1], resized to its input size.

    The grey plane is repeated over ``model.in_chans`` channels.
    """
    import torch
    import torch.nn.functional as F

    from napari_medssl.transforms import normalize_intensity

    x = torch.from_numpy(normalize_intensity(plane))[None, None]
    size = model.spec.input_size
    if size is not None and tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    chans = model.spec.in_chans
    return x.repeat(1, chans, 1, 1).to(device)


def resize_to(arr: Any, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize ``(..., y, x)`` maps (tensor or array) to ``(..., *shape)``; nearest for masks and labels."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(arr) if not isinstance(arr, torch.Tensor) else arr).detach().cpu()
    lead = t.shape[:-2]
    if tuple(t.shape[-2:]) == tuple(shape):
        return t.numpy()
    flat = t.reshape(1, -1, *t.shape[-2:])
    if nearest:
        out = F.interpolate(flat.float(), size=shape, mode="nearest-exact")
        out = out.to(t.dtype)
    else:
        out = F.interpolate(flat.float(), size=shape, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *shape).numpy()


def _grid_to_plane(
    grid: Any, patch: int, input_hw: tuple[int, int], plane_hw: tuple[int, int], nearest: bool
):
    """Patch-grid maps ``(..., gh, gw)`` -> the plane's pixels: repeat each patch ``p × p`` (as DINO's script
    does), crop the padding, resize to the plane."""
    import torch

    t = torch.as_tensor(grid)
    t = t.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)[..., : input_hw[0], : input_hw[1]]
    return resize_to(t, plane_hw, nearest=nearest)


def _vit_of(model: Any) -> Any:
    vit = getattr(model, "backbone", model)
    if not hasattr(vit, "cls_attention"):
        raise ValueError(
            f"attention overlays need a ViT-based model (dino, mae, msmae, miram, vit), got {type(model).__name__}"
        )
    return vit


def _check_plane(plane: Plane) -> None:
    if not isinstance(plane, Plane):
        raise ValueError(f"expected a Plane (see take_plane), got {type(plane).__name__}")


# -- DINO -----------------------------------------------------------------------------------------------------
def tissue_lift(maps: np.ndarray, image: np.ndarray) -> np.ndarray:
    """How much each attention map looks at tissue rather than background.

    Tissue is the image's pixels above its Otsu threshold (the body, the breast: images with a dark
    background). Per head: (share of the head's attention that falls on tissue) / (share of the image that is
    tissue). 1 is a map blind to anatomy (uniform, or as often on background as on tissue); above 1 the head
    attends to tissue, below 1 to the background.

    Args:
        maps: ``(H, Y, X)`` non-negative attention maps (raw softmax weights or normalised maps).
        image: ``(Y, X)`` intensities on the same grid.

    Returns:
        ``(H,)`` float64 lifts; NaN where the image has no tissue/background split (constant image).

    Raises:
        ValueError: the shapes do not match.
    """
    from skimage.filters import threshold_otsu

    maps = np.asarray(maps, dtype=np.float64)
    image = np.asarray(image, dtype=np.float64)
    if maps.ndim != 3 or maps.shape[1:] != image.shape:
        raise ValueError(f"maps {maps.shape} must be (H, *image.shape) with image {image.shape}")
    if not np.isfinite(image).all() or image.max() <= image.min():
        return np.full(len(maps), np.nan)
    tissue = image > threshold_otsu(image)
    share = tissue.mean()
    total = maps.sum(axis=(1, 2))
    mass = (maps * tissue).sum(axis=(1, 2)) / np.where(total > 0, total, np.nan)
    return mass / share


def dino_overlays(
    model: Any,
    plane: Plane,
    threshold: float = 0.6,
    head: int | None = None,
    device: Any = "cpu",
    stack_heads: bool = False,
) -> list[OverlayLayer]:
    """DINO's per-head [CLS] attention and mass-threshold masks for one plane.

    Args:
        model: a ViT-based model (DINO uses its teacher); see ``models.dino.attention_maps``.
        plane: the 2D image or slice (:func:`take_plane`).
        threshold: fraction of each head's attention mass its mask keeps, in (0, 1].
        head: show only this head (0-based); ``None`` for all heads.
        device: torch device for the forward pass.
        stack_heads: one image layer with a leading head axis instead of one additive layer per head.

    Returns:
        Image layers (per head, additive blending, [0, 1] min-max normalised) then Labels layers with each
        head's mask (value ``head + 1``).

    Raises:
        ValueError: not a ViT-based model, a head out of range or a bad threshold.
    """
    import torch

    from napari_medssl.models.dino import attention_grid, shape_attention
    from napari_medssl.models.vit import mass_threshold_masks

    _check_plane(plane)
    vit = _vit_of(model)
    n_heads = int(vit.num_heads)
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range: this model has {n_heads} heads (0..{n_heads - 1})")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    x = model_input(plane.data, model, device)
    with torch.no_grad():  # one forward pass; the three views of it below
        raw, pixels = attention_grid(model, x)  # (1, H, gh, gw) softmax weights
    size = tuple(x.shape[-2:])
    maps = shape_attention(raw, pixels, size)[0]  # (H, y, x) in [0, 1], at the model's input size
    masks = mass_threshold_masks(raw, threshold)[0]  # (H, gh, gw)
    shape = plane.data.shape
    raw_px = shape_attention(raw, pixels, size, normalize=False)[0].numpy()  # (H, y, x) weights per pixel
    lift = tissue_lift(raw_px, x[0, 0].float().cpu().numpy())
    maps = resize_to(maps, shape, nearest=True)
    masks = _grid_to_plane(masks, vit.patch_size, tuple(x.shape[-2:]), shape, nearest=True)
    heads = range(n_heads) if head is None else [head]
    meta = {"method": "dino", "threshold": threshold, "tissue_lift": [round(float(v), 3) for v in lift]}
    out: list[OverlayLayer] = []
    if stack_heads:
        sel = np.stack([maps[h] for h in heads])  # (H, Y, X): heads as a leading axis
        layer = _layer(
            plane, "image", "attention heads", sel, {"colormap": "inferno", "blending": "additive"}, meta
        )
        layer.scale = (1.0, *layer.scale)
        layer.translate = (0.0, *layer.translate)
        out.append(layer)
    else:
        for h in heads:
            style = {
                "colormap": HEAD_COLORMAPS[h % len(HEAD_COLORMAPS)],
                "blending": "additive",
                "contrast_limits": (0.0, 1.0),
                "opacity": 0.7,
            }
            out.append(
                _layer(
                    plane,
                    "image",
                    f"attention head {h}",
                    maps[h].astype(np.float32),
                    style,
                    {**meta, "head": h},
                )
            )
    for h in heads:
        labels = masks[h].astype(np.uint8) * np.uint8(h + 1)
        colour = (*HEAD_COLORS[h % len(HEAD_COLORS)], 1.0)
        style = {
            "colormap": label_colors({h + 1: colour}),
            "contour": 1,
            "visible": head is not None or h == 0,
        }
        out.append(
            _layer(
                plane,
                "labels",
                f"attention mask head {h} ({threshold:.0%})",
                labels,
                style,
                {**meta, "head": h},
            )
        )
    return out


# -- MSMAE ----------------------------------------------------------------------------------------------------
MSMAE_VALUES = {0: "none", 1: "keep", 2: "mask", 3: "throw"}


def msmae_overlays(model: Any, plane: Plane, seed: int = 0, device: Any = "cpu") -> list[OverlayLayer]:
    """MSMAE's attention weight map and its sampled mask / throw / keep pattern for one plane.

    Args:
        model: an MSMAE model (``masking_pattern``).
        plane: the 2D image or slice.
        seed: seed of the sampled pattern.
        device: torch device.

    Returns:
        An image layer (weights in [0, 1]) and a Labels layer: 1 keep (encoded), 2 mask (reconstructed),
        3 throw (dropped), see :data:`MSMAE_VALUES`.

    Raises:
        ValueError: the model has no ``masking_pattern``.
    """
    _check_plane(plane)
    if not hasattr(model, "masking_pattern"):
        raise ValueError(f"MSMAE overlays need an MSMAE model, got {type(model).__name__}")
    x = model_input(plane.data, model, device)
    weights, labels = model.masking_pattern(x, seed=int(seed))  # (1, gh, gw) each
    shape = plane.data.shape
    hw = tuple(x.shape[-2:])
    w = _grid_to_plane(weights[0].float().cpu(), model.patch_size, hw, shape, nearest=True).astype(np.float32)
    lab = _grid_to_plane(labels[0].cpu() + 1, model.patch_size, hw, shape, nearest=True).astype(np.uint8)
    meta = {"method": "msmae", "seed": int(seed), "values": MSMAE_VALUES}
    fractions = {MSMAE_VALUES[v]: float((labels + 1 == v).float().mean()) for v in (1, 2, 3)}
    return [
        _layer(
            plane,
            "image",
            "MSMAE weights",
            w,
            {"colormap": "inferno", "blending": "additive", "contrast_limits": (0.0, 1.0), "opacity": 0.6},
            meta,
        ),
        _layer(
            plane,
            "labels",
            f"MSMAE keep/mask/throw (seed {seed})",
            lab,
            {"colormap": label_colors(MSMAE_COLORS)},
            {**meta, "fractions": fractions},
        ),
    ]


# -- MAE ------------------------------------------------------------------------------------------------------
def mae_overlays(
    model: Any, plane: Plane, mask_ratio: float = 0.75, seed: int = 0, device: Any = "cpu"
) -> list[OverlayLayer]:
    """MAE's random mask and reconstruction for one plane.

    Args:
        model: an MAE-family model (``reconstruct``).
        plane: the 2D image or slice.
        mask_ratio: fraction of patches hidden, in [0, 1).
        seed: seed of the random mask.
        device: torch device.

    Returns:
        Image layers ``masked input``, ``reconstruction`` (hidden), ``reconstruction + visible`` (values in the
        model's [0, 1] intensity scale) and a Labels layer with the mask (1 = masked).

    Raises:
        ValueError: a model without ``reconstruct`` or a ratio outside [0, 1).
    """
    _check_plane(plane)
    if not hasattr(model, "reconstruct"):
        raise ValueError(f"MAE overlays need an MAE-family model (mae, msmae), got {type(model).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    x = model_input(plane.data, model, device)
    out = model.reconstruct(x, mask_ratio=float(mask_ratio), seed=int(seed))
    shape = plane.data.shape
    recon = resize_to(out["reconstruction"][0].float().mean(0).cpu(), shape)
    pasted = resize_to(out["pasted"][0].float().mean(0).cpu(), shape)
    mask = resize_to(out["mask"][0, 0].cpu() > 0.5, shape, nearest=True)
    masked = resize_to(x[0].float().mean(0).cpu(), shape) * (1 - mask)
    meta = {"method": "mae", "mask_ratio": float(mask_ratio), "seed": int(seed)}
    grey = {"colormap": "gray", "contrast_limits": (0.0, 1.0)}
    return [
        _layer(
            plane, "image", "MAE masked input", masked.astype(np.float32), {**grey, "visible": False}, meta
        ),
        _layer(
            plane, "image", "MAE reconstruction", recon.astype(np.float32), {**grey, "visible": False}, meta
        ),
        _layer(plane, "image", "MAE reconstruction + visible", pasted.astype(np.float32), grey, meta),
        _layer(
            plane,
            "labels",
            f"MAE mask ({mask_ratio:.0%}, seed {seed})",
            mask.astype(np.uint8),
            {"colormap": label_colors({1: (0.15, 0.45, 1.0, 0.3)})},
            meta,
        ),
    ]


# -- MiM ------------------------------------------------------------------------------------------------------
def mim_overlays(
    shape: Sequence[int],
    ratios: Sequence[float] = (0.5, 0.6, 0.5),
    seed: int = 0,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    model: Any = None,
    cell_size: int | None = None,
) -> list[OverlayLayer]:
    """MiM's nested 3D masks on a volume, one Labels layer whose value is the deepest level masked.

    Level ``k`` (1-based) is masked inside level ``k - 1``'s masked region, so value ``k`` means "masked at
    levels 1..k". Masks at another size than the volume are resized (nearest) onto its grid.

    Args:
        shape: the volume's ``(Z, Y, X)``.
        ratios: mask ratio per level, coarse to fine.
        seed: seed of the masks.
        scale: the volume's scale.
        translate: the volume's translate.
        model: a MiM model: its ``cell_size`` (level-0 cell side in voxels) is used.
        cell_size: the level-0 cell side when there is no model (default 16); must split in halves per level.

    Raises:
        ValueError: not a 3D shape, ratios outside (0, 1), or a cell size that does not halve per level.
    """
    from napari_medssl.models import mim

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"MiM masks are 3D: expected a (Z, Y, X) volume shape, got {shape}")
    if not ratios or any(not 0.0 < float(r) < 1.0 for r in ratios):
        raise ValueError(f"each MiM ratio must be in (0, 1), got {tuple(ratios)}")
    cell = int(cell_size or getattr(model, "cell_size", 0) or 16)
    masks = mim.nested_masks(shape, tuple(float(r) for r in ratios), int(seed), cell_size=cell)
    levels = np.zeros(shape, dtype=np.uint8)
    fractions = []
    for k, mask in enumerate(masks):
        m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask).astype(bool)
        m = m.reshape(m.shape[-3:])
        if m.shape != shape:
            m = _resize_3d_nearest(m, shape)
        fractions.append(float(m.mean()))
        levels[m] = k + 1
    nd = len(shape)
    scale = tuple(float(s) for s in (scale if scale is not None else [1.0] * nd))
    translate = tuple(float(t) for t in (translate if translate is not None else [0.0] * nd))
    meta = {
        "method": "mim",
        "ratios": [float(r) for r in ratios],
        "seed": int(seed),
        "cell_size": cell,
        "fractions": fractions,
    }
    name = f"MiM nested masks ({', '.join(f'{r:g}' for r in ratios)}; seed {seed})"
    colors = {k: MIM_COLORS[min(k, max(MIM_COLORS))] for k in range(1, len(masks) + 1)}
    return [OverlayLayer("labels", name, levels, scale, translate, {"colormap": label_colors(colors)}, meta)]


def _resize_3d_nearest(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = [np.minimum((np.arange(n) * m / n).astype(int), m - 1) for n, m in zip(shape, mask.shape)]
    return mask[np.ix_(*idx)]
