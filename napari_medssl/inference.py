"""Classify and segment arrays with a model: 2D images, volumes slice by slice (2D models) or whole (3D models).

One code path for the viewer, the CLI and validation during training. Every function takes the *raw* array
(any intensity range) and applies :func:`napari_medssl.transforms.normalize_intensity` to the whole image or
volume, exactly as training does, then:

- ``segment``: forwards at native resolution. Models with a fixed ``input_size`` (or a training ``sample_size``
  recorded in their checkpoint) see windows of that size: smaller images are zero-padded and cropped back,
  larger ones are covered by overlapping sliding windows whose softmax outputs are averaged.
- ``classify``: resizes each image (or slice) to the model's ``input_size`` / ``sample_size`` when set.
- ``mirror`` (segmentation, off by default): test-time augmentation by mirroring, as nnU-Net does: the softmax
  outputs of the image and of its flips along the given spatial axes (every combination) are averaged. Use axes
  the model was trained to be flip-invariant on (:func:`training_flip_axes`).

Image layouts: ``(Y, X)``, ``(Y, X, 3)`` RGB, ``(Z, Y, X)`` volumes. A 2D model works on a volume slice by
slice along ``slice_axis``. Long runs take ``progress(done, total)`` and ``cancel`` (a callable returning
``True``, or a ``threading.Event``); a cancelled run raises :class:`Cancelled`.

Axis legend: B batch, C channels, Z Y X space, K classes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from napari_medssl import slices25d
from napari_medssl.transforms import normalize_intensity

__all__ = [
    "Cancelled",
    "classify",
    "image_spatial_dims",
    "pick_device",
    "training_flip_axes",
    "predict",
    "prepare_image",
    "resize",
    "segment",
    "segment_prepared",
    "segment_probabilities",
]

Progress = Callable[[int, int], Any] | None
Cancel = Callable[[], bool] | Any | None
DEVICES = ("auto", "cpu", "cuda", "mps")


class Cancelled(RuntimeError):
    """Raised when an inference run is cancelled through its ``cancel`` argument."""


def pick_device(kind: str | torch.device = "auto") -> torch.device:
    """The torch device for ``kind``: ``"auto"`` tries CUDA, then Apple MPS, then the CPU.

    Raises:
        ValueError: an unknown kind, or a device that is not available here.
    """
    if isinstance(kind, torch.device):
        return kind
    kind = str(kind).lower()
    base = kind.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"unknown device {kind!r}; use one of {', '.join(DEVICES)} (or cuda:N)")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is available; use 'auto' or 'cpu'")
    if base == "mps" and not mps_ok:
        raise ValueError("device 'mps' asked for, but Apple MPS is not available; use 'auto' or 'cpu'")
    return torch.device(kind)


def _check_cancel(cancel: Cancel) -> None:
    if cancel is None:
        return
    flag = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if flag:
        raise Cancelled("inference cancelled")


def image_spatial_dims(image: np.ndarray, rgb: bool | None = None) -> int:
    """2 for ``(Y, X)`` and ``(Y, X, 3)``, 3 for ``(Z, Y, X)``; ``rgb`` settles a ``(Y, X, 3)``-shaped volume.

    Raises:
        ValueError: any other number of axes.
    """
    if image.ndim == 2:
        return 2
    if image.ndim == 3:
        if rgb is None:
            rgb = image.shape[-1] in (3, 4) and image.shape[0] > 4
        return 2 if rgb else 3
    if image.ndim == 4 and image.shape[-1] in (3, 4):
        return 3
    raise ValueError(f"expected (Y, X), (Y, X, 3) or (Z, Y, X) image, got shape {image.shape}")


def prepare_image(image: np.ndarray, in_chans: int, rgb: bool | None = None) -> np.ndarray:
    """Normalise intensities and move channels first: ``(C, *spatial)`` float32 in [0, 1], ``C = in_chans``.

    Gray images are repeated to 3 channels for RGB models; RGB images are averaged for 1-channel models.
    """
    image = np.asarray(image)
    dims = image_spatial_dims(image, rgb)
    arr = image[None] if image.ndim == dims else np.moveaxis(image[..., :3], -1, 0)
    return match_channels(normalize_intensity(arr), in_chans)


def match_channels(arr: np.ndarray, in_chans: int) -> np.ndarray:
    """``(C, *spatial)`` → ``(in_chans, *spatial)``: repeat gray to RGB, average RGB to gray."""
    c = arr.shape[0]
    if c == in_chans:
        return arr
    if c == 1:
        return np.repeat(arr, in_chans, axis=0)
    if in_chans == 1:
        return arr.mean(axis=0, keepdims=True)
    raise ValueError(f"cannot feed a {c}-channel image to a model with {in_chans} input channels")


def resize(x: torch.Tensor, size: tuple[int, ...], mask: bool = False) -> torch.Tensor:
    """Resize ``(B, C, *spatial)`` to ``size``: (bi/tri)linear with antialiasing for images, nearest for masks."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mask:
        return F.interpolate(x.float(), size=size, mode="nearest").to(x.dtype)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    antialias = len(size) == 2 and any(s > t for s, t in zip(x.shape[2:], size))
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


def model_window(model: nn.Module) -> tuple[int, ...] | None:
    """The spatial size a model wants: ``input_size``, else the ``sample_size`` it was trained on, else None."""
    return model.spec.window


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits of ``x (N, C, *S)`` on the CPU; on out-of-memory the batch is split in halves and retried.

    Raises:
        MemoryError: even a single image or window does not fit on ``device``.
    """
    try:
        with torch.inference_mode(), _autocast(device):
            return model(x.to(device)).float().cpu()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(x) == 1:
            advice = "run on the CPU (device 'cpu')" if device.type != "cpu" else "free some memory"
            raise MemoryError(
                f"out of memory on {device} for a single input of shape {tuple(x.shape[1:])}; {advice}"
            ) from None
    half = len(x) // 2  # outside the handler, so the failed attempt's memory is released first
    return torch.cat([_forward(model, x[:half], device), _forward(model, x[half:], device)])


def _windows(shape: tuple[int, ...], window: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    starts = []
    for s, w in zip(shape, window):
        if s <= w:
            starts.append([0])
            continue
        step = max(1, int(w * (1 - overlap)))
        n = math.ceil((s - w) / step) + 1
        starts.append(sorted({min(i * step, s - w) for i in range(n)}))
    return [tuple(slice(a, a + w) for a, w in zip(st, window)) for st in itertools.product(*starts)]


def _pad_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    pad: list[int] = []
    for s, w in zip(reversed(x.shape[2:]), reversed(size)):
        pad += [0, max(0, w - s)]
    return F.pad(x, pad) if any(pad) else x


def _window_weights(window: tuple[int, ...], gaussian: bool) -> torch.Tensor:
    """Each window pixel's weight when overlapping windows are averaged: 1, or nnU-Net's Gaussian importance
    (sigma 1/8 of the side, floored at 1e-3), so a pixel counts most from windows centred near it."""
    if not gaussian:
        return torch.ones(window)
    axes = [torch.exp(-((torch.arange(w) - (w - 1) / 2) ** 2) / (2 * (w / 8) ** 2)) for w in window]
    weight = axes[0]
    for a in axes[1:]:
        weight = weight[..., None] * a
    return (weight / weight.max()).clamp_min(1e-3)


def _segment_batch(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    window: tuple[int, ...] | None,
    overlap: float = 0.25,
    batch_size: int = 8,
    progress: Progress = None,
    cancel: Cancel = None,
    gaussian: bool = False,
) -> torch.Tensor:
    """``(N, C, *S)`` → softmax probabilities ``(N, K, *S)``, whole or by sliding windows of size ``window``
    (averaged with :func:`_window_weights`)."""
    spatial = tuple(x.shape[2:])
    _check_cancel(cancel)
    if window is None:
        out = []
        total = math.ceil(len(x) / batch_size)
        for i in range(0, len(x), batch_size):
            out.append(torch.softmax(_forward(model, x[i : i + batch_size], device), 1))
            if progress is not None:
                progress(i // batch_size + 1, total)
            _check_cancel(cancel)
        return torch.cat(out)
    padded = _pad_to(x, window)
    big = tuple(padded.shape[2:])
    wins = _windows(big, window, overlap)
    jobs = [(n, w) for n in range(len(x)) for w in wins]
    weight = _window_weights(window, gaussian)
    total = math.ceil(len(jobs) / batch_size)
    out_sum: torch.Tensor | None = None
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        batch = torch.stack([padded[n][(slice(None), *w)] for n, w in chunk])
        probs = torch.softmax(_forward(model, batch, device), 1)
        if out_sum is None:
            out_sum = torch.zeros((len(x), probs.shape[1], *big))
        for (n, w), p in zip(chunk, probs):
            out_sum[n][(slice(None), *w)] += p * weight
        if progress is not None:
            progress(i // batch_size + 1, total)
        _check_cancel(cancel)
    count = torch.zeros((1, 1, *big))
    for w in wins:
        count[(0, 0, *w)] += weight
    assert out_sum is not None
    return (out_sum / count)[(slice(None), slice(None), *(slice(0, s) for s in spatial))]


def training_flip_axes(model: nn.Module) -> tuple[int, ...]:
    """The spatial axes (negative, from the end) a checkpoint's training run flipped at random: the axes
    mirroring test-time augmentation may use. ``()`` when the run did not augment or nothing is recorded."""
    return model.spec.flip_axes  # an ensemble: its members' axes (each mirrors along its own, see below)


def _mirror_sets(axes: tuple[int, ...], dims: int) -> list[tuple[int, ...]]:
    """Every non-empty combination of the (distinct, in-range) mirror axes, as tensor dims counted from the end."""
    bad = [a for a in axes if not -dims <= int(a) < dims]
    if bad:
        raise ValueError(f"mirror axes {bad} are out of range for a {dims}D input (use -{dims}..{dims - 1})")
    norm = sorted({int(a) % dims - dims for a in axes})
    if len(norm) != len(axes):
        raise ValueError(f"mirror axes {tuple(axes)} must be distinct spatial axes of a {dims}D input")
    return [c for r in range(1, len(norm) + 1) for c in itertools.combinations(norm, r)]


def segment_probabilities(
    model: nn.Module,
    image: np.ndarray,
    *,
    device: str | torch.device | None = None,
    slice_axis: int = 0,
    batch_size: int = 8,
    overlap: float = 0.25,
    rgb: bool | None = None,
    mirror: tuple[int, ...] = (),
    progress: Progress = None,
    cancel: Cancel = None,
    spacing: tuple[float, ...] | None = None,
    affine: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities ``(K, *spatial)`` for an image or volume (see the module docstring).

    Args:
        model: a ``"segment"`` model (2D or 3D).
        image: ``(Y, X)``, ``(Y, X, 3)`` or ``(Z, Y, X)``, raw intensities.
        device: where to run (the model is moved there; default: where the model is).
        slice_axis: volume axis a 2D model slices along (0 = Z).
        batch_size: slices or windows per forward pass.
        overlap: sliding-window overlap fraction.
        rgb: whether a 3-axis array with 3 last entries is RGB (default: guessed).
        mirror: spatial axes of the model's input (negative, from the end: ``-1`` = X) for mirroring test-time
            augmentation; ``()`` for none (see the module docstring).
        progress: called as ``progress(done, total)`` after each forward pass.
        cancel: a callable or ``threading.Event``; when it turns true, :class:`Cancelled` is raised.
        spacing: the image's voxel size in mm (per spatial axis), for models whose checkpoint records 2.5D
            input conventions with an in-plane spacing (:mod:`napari_medssl.slices25d`); others ignore it.
        affine: the volume's index → RAS mm matrix, for 2.5D models recording where the structure was painted
            (their ``roi``); others ignore it.
    """
    dev = _on_device(model, device)
    conv = slices25d.conventions(model)
    if conv is not None:  # a 2.5D model: neighbouring slices as channels, at its recorded in-plane spacing
        if rgb or (rgb is None and image_spatial_dims(np.asarray(image)) == 2 and np.ndim(image) == 3):
            raise ValueError(f"a 2.5D gray-scale model cannot take an RGB image (shape {np.shape(image)})")
        moved = np.moveaxis(np.asarray(image), slice_axis, 0) if np.ndim(image) == 3 else np.asarray(image)
        yx = None if spacing is None else tuple(float(s) for s in spacing)[-2:]
        if yx is not None and np.ndim(image) == 3 and slice_axis != 0:
            yx = tuple(float(s) for i, s in enumerate(spacing) if i != slice_axis)  # type: ignore[assignment]
        roi_affine = affine if slice_axis == 0 else None
        probs = slices25d.segment_probabilities(
            model, moved, conv, dev, yx, batch_size, mirror, progress, cancel, affine=roi_affine
        )
        return np.moveaxis(probs, 1, slice_axis + 1) if np.ndim(image) == 3 else probs
    x = torch.from_numpy(prepare_image(image, model.spec.in_chans, rgb))
    probs = segment_prepared(model, x, dev, slice_axis, batch_size, overlap, progress, cancel, mirror)
    return probs.numpy()


def segment_prepared(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    slice_axis: int = 0,
    batch_size: int = 8,
    overlap: float = 0.25,
    progress: Progress = None,
    cancel: Cancel = None,
    mirror: tuple[int, ...] = (),
) -> torch.Tensor:
    """Probabilities ``(K, *spatial)`` for a prepared image ``(C, *spatial)`` (see :func:`prepare_image`);
    ``mirror``: axes for mirroring test-time augmentation (see :func:`segment_probabilities`)."""
    if model.spec.is_ensemble:
        return _segment_ensemble(model, x, device, slice_axis, batch_size, overlap, progress, cancel, mirror)
    dims = x.ndim - 1
    model_dims = model.spec.spatial_dims
    window = model_window(model)
    if model_dims == 3 and dims == 2:
        raise ValueError("a 3D model needs a (Z, Y, X) volume, got a 2D image")
    batch = x.movedim(slice_axis + 1, 0) if model_dims == 2 and dims == 3 else x[None]  # (N, C, *S)
    if window is None and batch[0, 0].numel() > (512 * 512 if model_dims == 2 else 128**3):
        window = (256, 256) if model_dims == 2 else (96, 96, 96)
    flips = _mirror_sets(tuple(mirror), model_dims) if mirror else []
    was_training = model.training
    model.eval()
    try:
        passes = len(flips) + 1

        def report(done: int, total: int, k: int = 0) -> None:
            if progress is not None:
                progress(k * total + done, passes * total)

        probs = _segment_batch(model, batch, device, window, overlap, batch_size, report, cancel)
        for k, dims_ in enumerate(flips, start=1):
            flipped = _segment_batch(
                model,
                batch.flip(dims_),
                device,
                window,
                overlap,
                batch_size,
                lambda d, t, k=k: report(d, t, k),
                cancel,
            )
            probs += flipped.flip(dims_)
        if flips:
            probs /= passes
    finally:
        model.train(was_training)
    return probs.movedim(0, slice_axis + 1) if model_dims == 2 and dims == 3 else probs[0]


def _segment_ensemble(
    model: nn.Module,
    x: torch.Tensor,
    device: torch.device,
    slice_axis: int,
    batch_size: int,
    overlap: float,
    progress: Progress,
    cancel: Cancel,
    mirror: tuple[int, ...],
) -> torch.Tensor:
    """A :class:`~napari_medssl.models.ensemble.SegmentationEnsemble`: each member run as it runs alone (its
    own window, 2D members slice by slice), probabilities averaged with the ensemble's weights; with
    ``mirror``, each member mirrors along the axes its own training flipped."""
    members = list(model.members)
    total: torch.Tensor | None = None
    for i, (weight, member) in enumerate(zip(model.weights, members)):

        def report(done: int, n: int, i: int = i) -> None:
            if progress is not None:
                progress(i * n + done, len(members) * n)

        axes = training_flip_axes(member) if mirror else ()
        p = segment_prepared(member, x, device, slice_axis, batch_size, overlap, report, cancel, axes)
        total = weight * p if total is None else total + weight * p
    assert total is not None
    return total


def segment(model: nn.Module, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Label image ``(*spatial)`` (argmax of :func:`segment_probabilities`), ``uint8`` or ``uint16``."""
    probs = segment_probabilities(model, image, **kwargs)
    labels = probs.argmax(0)
    return labels.astype(np.uint8 if probs.shape[0] < 256 else np.uint16)


def classify(
    model: nn.Module,
    image: np.ndarray,
    *,
    device: str | torch.device | None = None,
    slice_axis: int = 0,
    batch_size: int = 16,
    rgb: bool | None = None,
    progress: Progress = None,
    cancel: Cancel = None,
) -> np.ndarray:
    """Class probabilities: ``(K,)`` for an image (or a volume with a 3D model), ``(N, K)`` per slice when a
    2D model gets a volume (slices along ``slice_axis``)."""
    dev = _on_device(model, device)
    x = torch.from_numpy(prepare_image(image, model.spec.in_chans, rgb))
    dims = x.ndim - 1
    model_dims = model.spec.spatial_dims
    per_slice = model_dims == 2 and dims == 3
    batch = x.movedim(slice_axis + 1, 0) if per_slice else x[None]
    probs = classify_batch(model, batch, dev, batch_size, progress, cancel)
    return probs if per_slice else probs[0]


def classify_batch(
    model: nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    batch_size: int = 16,
    progress: Progress = None,
    cancel: Cancel = None,
) -> np.ndarray:
    """Probabilities ``(N, K)`` for prepared images ``(N, C, *spatial)`` (resized to the model's size)."""
    size = model_window(model)
    total = math.ceil(len(batch) / batch_size)
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(batch), batch_size):
            _check_cancel(cancel)
            chunk = batch[i : i + batch_size]
            if size is not None:
                chunk = resize(chunk, size)
            out.append(torch.softmax(_forward(model, chunk, device), 1))
            if progress is not None:
                progress(i // batch_size + 1, total)
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def predict(model: nn.Module, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """:func:`segment` or :func:`classify`, by ``model.task``.

    Raises:
        ValueError: a model without a supervised head (task ``"pretrain"``).
    """
    task = model.spec.task
    if task == "segment":
        return segment(model, image, **kwargs)
    if task == "classify":
        return classify(model, image, **kwargs)
    raise ValueError(f"model task {task!r} cannot predict; fine-tune it for 'classify' or 'segment' first")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _on_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on: ``device`` (the model is moved there when it is elsewhere) or the model's own."""
    if device is None:
        return _model_device(model)
    dev = pick_device(device)
    current = _model_device(model)
    if (current.type, current.index or 0) != (dev.type, dev.index or 0):
        model.to(dev)
    return dev
