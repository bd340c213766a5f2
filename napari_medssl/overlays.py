"""Pictures of what the models attend to and how they mask, for display over an image (numpy/torch, no Qt).

Every function takes a :class:`Plane` (a 2D image, or one slice of a volume, with its geometry) or a volume,
and returns :class:`OverlayLayer` records: an array, its kind (``"image"`` or ``"labels"``), the ``scale`` and
``translate`` that put it on the image's grid, and plain style keywords (blending, colormap). The viewer turns
each record into a napari layer; a notebook can plot the arrays.

- :func:`dino_overlays` — DINO's per-head [CLS] attention (``models.attention.attention_maps``, the same function the
  DINO-attention CNN feeds on) and the per-head mass-threshold masks (``models.attention.mass_threshold_masks``): one
  layer per kind with a leading head axis (a slider in the viewer), drawn with :data:`ATTENTION_COLORMAP`,
  whose opacity follows the attention so the image stays visible.
- :func:`msmae_overlays` — MSMAE's attention weight map and its sampled mask / throw / keep pattern.
- :func:`mae_overlays` — MAE's random mask, its reconstruction and the reconstruction with visible patches
  pasted back.
- :func:`mim_overlays` — MiM's nested 3D masks on a volume, drawn as one outline per level.
- :func:`saliency_overlays` — for ViT classifiers: class-specific Grad-CAM beside attention rollout and raw
  attention (:mod:`napari_medssl.explain`).

Resolution: the ViT overlays run the model at :func:`attention_input_size` (the image's own size, capped by a
time/memory budget per device, never below a 64 × 64 patch grid; or the long side the caller picks) through the
ViT's interpolated position embeddings, not at the 64-px training size. Each layer's metadata records the patch
``grid`` and the ``input_size`` used. Maps are repeated over the pixels each patch covers and resized back to
the plane's pixel grid, so a layer always covers the image exactly. A slice of a volume comes back as a
one-slice volume (``(1, Y, X)`` for an axial slice) placed at that slice, so it does not smear over the others.

Axis legend: B batch, C channels, Z Y X space, H heads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEAD_COLORS = ((1, 0, 1), (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 0, 0), (0, 0, 1), (1, 0.55, 0), (0.6, 0.2, 1))
MSMAE_COLORS = {1: (0.2, 0.85, 0.3, 0.25), 2: (0.15, 0.45, 1.0, 0.6), 3: (0.0, 0.0, 0.0, 0.8)}
MIM_COLORS = {  # outlines: opaque enough to read as lines over the image
    1: (1.0, 0.9, 0.1, 0.9),
    2: (1.0, 0.45, 0.0, 0.9),
    3: (0.95, 0.0, 0.3, 0.95),
    4: (0.6, 0.1, 1.0, 0.95),
}
CLEAR = (0.0, 0.0, 0.0, 0.0)
# attention 0 → fully transparent, 1 → opaque yellow-white: the image shows through where the head does not look
ATTENTION_COLORMAP = {
    "name": "medssl attention",
    "colors": [
        [1.0, 0.1, 0.0, 0.0],
        [1.0, 0.25, 0.0, 0.3],
        [1.0, 0.6, 0.0, 0.6],
        [1.0, 0.95, 0.3, 0.85],
    ],
}
ATTENTION_LEGEND = (
    "Colour: where the last layer's [CLS] token looks (per head: transparent = little attention, bright yellow "
    "= most); not an explanation of a decision."
)
MIN_GRID = 64  # default resolution: at least this many patches along the short side
MAX_SIDE = {"cpu": 512, "gpu": 1024}  # default resolution: at most the image's own long side, capped here
MAX_TOKENS = 16384  # hard ceiling (a 128 × 128 patch grid) for any resolution asked for


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
def attention_input_size(
    shape: Sequence[int], patch: int, size: int | None = None, device: Any = "cpu"
) -> tuple[int, int]:
    """The ``(Y, X)`` a ViT overlay runs at for a plane of ``shape``: aspect kept, sides patch multiples.

    Args:
        shape: the plane's ``(Y, X)``.
        patch: the ViT's patch side in pixels.
        size: the long side asked for (pixels). ``None``: the image's own long side, capped at
            :data:`MAX_SIDE` (512 on a CPU, 1024 on a GPU), then raised until the short side holds
            :data:`MIN_GRID` patches (64 × 64 at least: 512 px with 8-px patches, so a 320 × 260 MR slice runs
            at 632 × 512).
        device: where the model runs (sets the default cap).

    Raises:
        ValueError: a bad shape or size, or a size whose patch grid exceeds :data:`MAX_TOKENS`.
    """
    h, w = (int(s) for s in tuple(shape)[-2:])
    if h < 1 or w < 1 or patch < 1:
        raise ValueError(f"need a non-empty plane and a positive patch size, got {tuple(shape)}, {patch}")
    long_, short = max(h, w), min(h, w)
    if size is None:
        kind = "gpu" if str(device).split(":")[0] in ("cuda", "mps") else "cpu"
        side = max(min(long_, MAX_SIDE[kind]), math.ceil(MIN_GRID * patch * long_ / short))
    else:
        side = int(size)
        if side < patch:
            raise ValueError(f"the overlay resolution must be at least one patch ({patch} px), got {size}")
    out = tuple(max(patch, round(s * side / long_ / patch) * patch) for s in (h, w))
    if size is None:
        out = tuple(max(o, MIN_GRID * patch) for o in out)
    tokens = (out[0] // patch) * (out[1] // patch)
    if tokens > MAX_TOKENS:
        raise ValueError(
            f"an overlay at {out[0]} x {out[1]} px needs {tokens} patches, over the limit of {MAX_TOKENS}; "
            "pick a smaller resolution"
        )
    return out


def model_input(plane: np.ndarray, model: Any, device: Any = "cpu", size: Sequence[int] | None = None) -> Any:
    """A plane as the model's input tensor ``(1, C, Y, X)``: normalised to [0, 1], resized to ``size`` (default
    the model's input size; antialiased when shrinking).

    The grey plane is repeated over ``model.in_chans`` channels.
    """
    import torch
    import torch.nn.functional as F

    from napari_medssl.transforms import normalize_intensity

    x = torch.from_numpy(normalize_intensity(plane))[None, None]
    size = model.spec.input_size if size is None else size
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


def attention_heads(model: Any, plane: Plane, size: int | None = None, device: Any = "cpu") -> dict[str, Any]:
    """One forward pass: every head's last-layer [CLS] attention for a plane, at the overlay resolution.

    Args:
        model: a ViT-based model (DINO uses its teacher).
        plane: the 2D image or slice.
        size: the long side to run at (see :func:`attention_input_size`; ``None`` = the default).
        device: torch device.

    Returns:
        ``raw`` ``(H, gh, gw)`` softmax weights on the patch grid, ``weights`` ``(H, Y, X)`` float32: each
        pixel of the plane carries the weight of the patch covering it (nearest), ``grid`` ``(gh, gw)``,
        ``input_size`` ``(y, x)`` and ``patch_pixels`` (input pixels per patch side), ``tissue_lift`` ``(H,)``
        (:func:`tissue_lift` of ``weights`` against the plane's own intensities).
    """
    import torch

    from napari_medssl.models.attention import attention_grid, shape_attention

    _check_plane(plane)
    vit = _vit_of(model)
    hw = attention_input_size(plane.data.shape, int(vit.patch_size), size, device)
    x = model_input(plane.data, model, device, size=hw)
    with torch.no_grad():
        raw, pixels = attention_grid(model, x)  # (1, H, gh, gw)
    raw = raw[0].cpu()
    px = shape_attention(raw, pixels, hw, normalize=False)  # (H, y, x): each patch's weight on its pixels
    weights = resize_to(px, tuple(plane.data.shape), nearest=True).astype(np.float32)
    image = np.asarray(plane.data, dtype=np.float64)
    return {
        "raw": raw,
        "weights": weights,
        "grid": tuple(int(g) for g in raw.shape[-2:]),
        "input_size": tuple(int(v) for v in hw),
        "patch_pixels": int(pixels),
        "tissue_lift": tissue_lift(weights, np.nan_to_num(image)),
    }


def minmax(maps: np.ndarray) -> np.ndarray:
    """Per map (leading axis) min-max normalised to [0, 1], float32."""
    maps = np.asarray(maps, dtype=np.float32)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    return ((maps - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


def _head_layer(plane: Plane, kind: str, name: str, arr: np.ndarray, style: dict, meta: dict) -> OverlayLayer:
    """A layer whose leading axis is the head (``(H, *source axes)``; scale 1 on that axis)."""
    layer = _layer(plane, kind, name, arr, style, meta)
    if arr.ndim == 3:
        layer.scale = (1.0, *layer.scale)
        layer.translate = (0.0, *layer.translate)
    return layer


def dino_overlays(
    model: Any,
    plane: Plane,
    threshold: float = 0.6,
    head: int | None = None,
    device: Any = "cpu",
    size: int | None = None,
) -> list[OverlayLayer]:
    """DINO's per-head [CLS] attention and mass-threshold masks for one plane, at the overlay resolution.

    Args:
        model: a ViT-based model (DINO uses its teacher); see ``models.attention.attention_maps``.
        plane: the 2D image or slice (:func:`take_plane`).
        threshold: fraction of each head's attention mass its mask keeps, in (0, 1].
        head: show only this head (0-based); ``None`` for all heads, stacked on a leading head axis.
        device: torch device for the forward pass.
        size: the long side to run the model at, in pixels (``None``: :func:`attention_input_size`'s default).

    Returns:
        Two layers: ``attention`` (image; per head min-max normalised to [0, 1], drawn with
        :data:`ATTENTION_COLORMAP`) and ``attention mask`` (labels, value ``head + 1`` on the patches holding
        ``threshold`` of the head's mass, outlined). With all heads both have a leading head axis ``(H, ...)``
        (a slider in the viewer). Metadata: ``grid``, ``input_size``, ``tissue_lift`` per head, ``heads``.

    Raises:
        ValueError: not a ViT-based model, a head out of range or a bad threshold.
    """
    from napari_medssl.models.attention import mass_threshold_masks

    _check_plane(plane)
    n_heads = int(_vit_of(model).num_heads)
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range: this model has {n_heads} heads (0..{n_heads - 1})")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    att = attention_heads(model, plane, size, device)
    masks = mass_threshold_masks(att["raw"][None], threshold)[0]  # (H, gh, gw)
    masks = _grid_to_plane(masks, att["patch_pixels"], att["input_size"], plane.data.shape, nearest=True)
    heads = list(range(n_heads)) if head is None else [head]
    meta = {
        "method": "dino",
        "threshold": threshold,
        "tissue_lift": [round(float(v), 3) for v in att["tissue_lift"]],
        "grid": list(att["grid"]),
        "input_size": list(att["input_size"]),
        "heads": heads,
        "legend": ATTENTION_LEGEND,
    }
    maps = minmax(att["weights"][heads])
    labels = np.stack([masks[h].astype(np.uint8) * np.uint8(h + 1) for h in heads])
    if head is not None:
        maps, labels = maps[0], labels[0]
    suffix = "" if head is None else f" head {head}"
    style = {"colormap": ATTENTION_COLORMAP, "blending": "translucent", "contrast_limits": (0.0, 1.0)}
    colours = {h + 1: (*HEAD_COLORS[h % len(HEAD_COLORS)], 1.0) for h in heads}
    return [
        _head_layer(plane, "image", f"attention{suffix}", maps, style, meta),
        _head_layer(
            plane,
            "labels",
            f"attention mask{suffix} ({threshold:.0%})",
            labels,
            {"colormap": label_colors(colours), "contour": 1},
            meta,
        ),
    ]


# -- classifiers ----------------------------------------------------------------------------------------------
SALIENCY_LEGEND = (
    "Grad-CAM: patches whose features raise the chosen class's score (rollout and raw attention beside it, "
    "hidden); at the classifier's own input size. Which map is more faithful on our data: benchmarks/README.md."
)


def saliency_overlays(
    model: Any, plane: Plane, target: int | None = None, device: Any = "cpu"
) -> list[OverlayLayer]:
    """A ViT classifier's class-specific Grad-CAM, attention rollout and raw [CLS] attention for one plane.

    The classifier runs at its own input size (what it was trained for; a classifier's decision is only
    defined there), so the maps have its patch grid (8 × 8 for the 64-px mini-MIAS models).

    Args:
        model: a ViT classifier (``explain.grad_cam``).
        plane: the 2D image or slice.
        target: class index; ``None``: the predicted class.
        device: torch device.

    Returns:
        Three image layers (per map min-max normalised, :data:`ATTENTION_COLORMAP`): ``Grad-CAM (<class>)``,
        then ``attention rollout`` and ``raw attention`` (hidden). Metadata: class, its probability, grid.

    Raises:
        ValueError: not a ViT classifier, or a target out of range.
    """
    import torch

    from napari_medssl import explain

    _check_plane(plane)
    x = model_input(plane.data, model, device)
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
    target = int(probs.argmax()) if target is None else int(target)
    if not 0 <= target < len(probs):
        raise ValueError(f"class {target} out of range: the model has {len(probs)} classes")
    maps = {
        "Grad-CAM": explain.grad_cam(model, x, target)[0],
        "attention rollout": explain.attention_rollout(model, x)[0],
        "raw attention": explain.raw_attention(model, x)[0],
    }
    names = model.spec.class_names or tuple(str(i) for i in range(len(probs)))
    hw = tuple(x.shape[-2:])
    grid = list(maps["Grad-CAM"].shape)
    pixels = explain.patch_pixels(model, x)
    meta = {
        "method": "saliency",
        "class": names[target],
        "probability": round(float(probs[target]), 4),
        "grid": grid,
        "input_size": list(hw),
        "legend": SALIENCY_LEGEND,
    }
    style = {"colormap": ATTENTION_COLORMAP, "blending": "translucent", "contrast_limits": (0.0, 1.0)}
    out = []
    for i, (name, m) in enumerate(maps.items()):
        arr = minmax(_grid_to_plane(m.cpu(), pixels, hw, plane.data.shape, nearest=True)[None])[0]
        label = f"{name} ({names[target]})" if name == "Grad-CAM" else name
        out.append(_layer(plane, "image", label, arr, {**style, "visible": i == 0}, meta))
    return out


# -- MSMAE ----------------------------------------------------------------------------------------------------
MSMAE_VALUES = {0: "none", 1: "keep", 2: "mask", 3: "throw"}


def msmae_overlays(
    model: Any, plane: Plane, seed: int = 0, device: Any = "cpu", size: int | None = None
) -> list[OverlayLayer]:
    """MSMAE's attention weight map and its sampled mask / throw / keep pattern for one plane.

    Args:
        model: an MSMAE model (``masking_pattern``).
        plane: the 2D image or slice.
        seed: seed of the sampled pattern.
        device: torch device.
        size: the long side to run at (``None``: :func:`attention_input_size`'s default, a patch grid of
            64 × 64 or more instead of the training size's 8 × 8).

    Returns:
        An image layer (weights in [0, 1]) and a Labels layer: 1 keep (encoded), 2 mask (reconstructed),
        3 throw (dropped), see :data:`MSMAE_VALUES`.

    Raises:
        ValueError: the model has no ``masking_pattern``.
    """
    _check_plane(plane)
    if not hasattr(model, "masking_pattern"):
        raise ValueError(f"MSMAE overlays need an MSMAE model, got {type(model).__name__}")
    hw = attention_input_size(plane.data.shape, int(model.patch_size), size, device)
    x = model_input(plane.data, model, device, size=hw)
    weights, labels = model.masking_pattern(x, seed=int(seed))  # (1, gh, gw) each
    shape = plane.data.shape
    w = _grid_to_plane(weights[0].float().cpu(), model.patch_size, hw, shape, nearest=True).astype(np.float32)
    lab = _grid_to_plane(labels[0].cpu() + 1, model.patch_size, hw, shape, nearest=True).astype(np.uint8)
    meta = {
        "method": "msmae",
        "seed": int(seed),
        "values": MSMAE_VALUES,
        "grid": list(weights.shape[-2:]),
        "input_size": list(hw),
    }
    fractions = {MSMAE_VALUES[v]: float((labels + 1 == v).float().mean()) for v in (1, 2, 3)}
    return [
        _layer(
            plane,
            "image",
            "MSMAE weights",
            w,
            {"colormap": ATTENTION_COLORMAP, "blending": "translucent", "contrast_limits": (0.0, 1.0)},
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
    model: Any,
    plane: Plane,
    mask_ratio: float = 0.75,
    seed: int = 0,
    device: Any = "cpu",
    size: int | None = None,
) -> list[OverlayLayer]:
    """MAE's random mask and reconstruction for one plane.

    Args:
        model: an MAE-family model (``reconstruct``).
        plane: the 2D image or slice.
        mask_ratio: fraction of patches hidden, in [0, 1).
        seed: seed of the random mask.
        device: torch device.
        size: the long side to run at (``None``: :func:`attention_input_size`'s default). The decoder's
            position table is interpolated like the encoder's, so the reconstruction has the finer grid.

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
    hw = attention_input_size(plane.data.shape, int(model.patch_size), size, device)
    x = model_input(plane.data, model, device, size=hw)
    out = model.reconstruct(x, mask_ratio=float(mask_ratio), seed=int(seed))
    shape = plane.data.shape
    recon = resize_to(out["reconstruction"][0].float().mean(0).cpu(), shape)
    pasted = resize_to(out["pasted"][0].float().mean(0).cpu(), shape)
    mask = resize_to(out["mask"][0, 0].cpu() > 0.5, shape, nearest=True)
    masked = resize_to(x[0].float().mean(0).cpu(), shape) * (1 - mask)
    grid = [v // int(model.patch_size) for v in hw]
    meta = {
        "method": "mae",
        "mask_ratio": float(mask_ratio),
        "seed": int(seed),
        "grid": grid,
        "input_size": list(hw),
    }
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
    """MiM's nested 3D masks on a volume, drawn as outlines: one Labels layer, value ``k`` on the in-plane
    (Y, X) border of level ``k``'s masked region.

    Level ``k`` (1-based) is masked inside level ``k - 1``'s masked region, so the outlines nest: a finer
    level's outline lies inside the coarser one's (where borders coincide the finer level is drawn). Filled
    blocks would hide the image and the coarser levels; outlines keep both visible. Masks at another size than
    the volume are resized (nearest) onto its grid.

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
        levels[outline_yx(m)] = k + 1
    nd = len(shape)
    scale = tuple(float(s) for s in (scale if scale is not None else [1.0] * nd))
    translate = tuple(float(t) for t in (translate if translate is not None else [0.0] * nd))
    meta = {
        "method": "mim",
        "ratios": [float(r) for r in ratios],
        "seed": int(seed),
        "cell_size": cell,
        "fractions": fractions,
        "drawn": "outlines per level (in-plane border of each level's masked region)",
    }
    name = f"MiM nested masks ({', '.join(f'{r:g}' for r in ratios)}; seed {seed})"
    colors = {k: MIM_COLORS[min(k, max(MIM_COLORS))] for k in range(1, len(masks) + 1)}
    return [OverlayLayer("labels", name, levels, scale, translate, {"colormap": label_colors(colors)}, meta)]


def outline_yx(mask: np.ndarray) -> np.ndarray:
    """The in-plane border of a boolean ``(..., Y, X)`` mask: masked pixels with a 4-neighbour in Y or X that
    is not masked (or outside the array)."""
    m = np.asarray(mask, dtype=bool)
    pad = np.pad(m, [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)], constant_values=False)
    inner = pad[..., :-2, 1:-1] & pad[..., 2:, 1:-1] & pad[..., 1:-1, :-2] & pad[..., 1:-1, 2:]
    return m & ~inner


def _resize_3d_nearest(mask: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    idx = [np.minimum((np.arange(n) * m / n).astype(int), m - 1) for n, m in zip(shape, mask.shape)]
    return mask[np.ix_(*idx)]
