"""Fast adaptation to a new structure from a few painted slices: ``adapt_events`` (a generator of events).

The headless ``medssl finetune --labels`` and the Fine-tune dock (in its separate process) run this. Design,
for a one-minute budget on a CPU:

- 2.5D input (:mod:`napari_medssl.slices25d`): each slice with its neighbours as channels, normalised over the
  whole volume, resampled in-plane to ``in_plane_mm`` (1 mm by default); the conventions go into every
  checkpoint, so ``medssl predict`` and the Model dock apply them;
- crops of ``crop`` pixels centred on painted voxels, each class drawn equally often (positive-balanced),
  only painted voxels count in the loss (cross-entropy + soft Dice);
- strong augmentation: flips in-plane, rotation ±20°, scale 0.8–1.25, gamma, contrast, noise;
- a pretrained starting point keeps its encoder and gets a fresh decoder and head (``fresh_decoder``; a
  checkpoint already adapted from paint keeps everything); optionally its encoder is frozen for the first
  ``freeze_fraction`` of the budget (off by default); the learning rate decays on time;
- ``best.safetensors`` written after ``first_checkpoint_s`` and then every ``checkpoint_every_s`` (there is
  no held-out paint to validate on, so the latest weights are kept), atomically;
- ``preview_slice``: a prediction of that slice comes with every checkpoint (``{"event": "preview"}``).

Events: those of :mod:`napari_medssl.engine.loop` (``step``, ``checkpoint``, ``done``) plus ``preview``
(``slice``, ``labels``: painted-value convention, 0 where background).

Axis legend: B batch, C channels, Z Y X space, K classes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from napari_medssl import slices25d
from napari_medssl.engine.augment import IGNORE, random_affine, random_flips, random_intensity

DEFAULT_START = "unet_start_medical"  # the zoo's starting point for new structures
BEST = "best.safetensors"


@dataclass
class AdaptConfig:
    """Settings of one adaptation run (see the module docstring)."""

    out_dir: str
    model: str | None = None  # zoo name, checkpoint or run folder; None: DEFAULT_START
    max_minutes: float = 1.0
    max_steps: int = 1_000_000
    batch_size: int = 8
    crop: int = 96
    lr: float = 2e-3
    weight_decay: float = 1e-4
    context: int = 1  # for a starting model without recorded conventions and 1 + 2·context channels
    in_plane_mm: float | None = 1.0
    coords: bool = True  # position channels (CoordConv) added to a starting model without them
    roi_margin_mm: float | None = 12.0  # predictions kept within this distance of the painted box (None: off)
    near_mm: float | None = 10.0  # on the painted series: kept within this distance of the paint (None: box only)
    freeze_fraction: float = 0.0  # 0.15 froze the start's encoder first: worse on every scenario (2026-12-03)
    fresh_decoder: bool = True  # a pretrained start (not itself adapted from paint) keeps only its encoder
    first_checkpoint_s: float = 4.0
    checkpoint_every_s: float = 10.0
    seed: int = 0
    device: str = "cpu"
    preview_slice: int | None = None
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the checkpoints (e.g. the command)
    clock: str = "wall"  # "cpu": budget and checkpoint times in this process's CPU seconds (benchmarks)


# -- checks before anything starts ---------------------------------------------------------------------------
def painted_classes(painted: np.ndarray) -> list[int]:
    """Class indices painted (value ``k + 1`` = class ``k``), after checking there is something to learn.

    Two classes at least must be painted: with background alone there is no structure to learn, and with a
    structure alone no boundary (the loss would be met by painting the structure everywhere). So "only
    background" and "only one class, no background" are refused, naming what to paint.

    Raises:
        ValueError: negative or non-integer values, nothing painted, or a single class.
    """
    painted = np.asarray(painted)
    if not (np.issubdtype(painted.dtype, np.integer) or painted.dtype == bool):
        if not np.array_equal(painted, np.round(painted)):
            raise ValueError(
                f"painted labels must be whole numbers, got dtype {painted.dtype} with fractions"
            )
    if painted.size and painted.min() < 0:
        raise ValueError(
            "painted labels must be non-negative (0 = unlabelled, 1 = background, k + 1 = class k)"
        )
    classes = sorted(int(v) - 1 for v in np.unique(painted) if v > 0)
    if not classes:
        raise ValueError("nothing is painted: paint the structure (label 2) and some background (label 1)")
    if len(classes) == 1:
        what = "background (label 1)" if classes == [0] else f"one class (label {classes[0] + 1})"
        need = (
            "the structure too (label 2 = first class)" if classes == [0] else "some background too (label 1)"
        )
        raise ValueError(
            f"only {what} is painted; a model cannot learn a boundary from one class: paint {need}"
        )
    return classes


def check_grid(
    image_shape: tuple[int, ...],
    labels_shape: tuple[int, ...],
    image_affine: np.ndarray | None = None,
    labels_affine: np.ndarray | None = None,
    spacing: tuple[float, ...] | None = None,
) -> None:
    """Refuse labels that are not on the image's grid: another shape, or (when both carry one) another
    index→mm mapping: the corner voxels' positions may differ by a quarter of the smallest voxel side
    (``spacing``; 0.01 mm without it), so headers that describe the same grid differently (float32 NIfTI
    affines, DICOM vs NIfTI) pass.

    Raises:
        ValueError: naming both shapes or the largest corner offset.
    """
    if tuple(image_shape) != tuple(labels_shape):
        raise ValueError(
            f"the labels' shape {tuple(labels_shape)} differs from the image's {tuple(image_shape)}: "
            "paint on the image's own grid (same series)"
        )
    if image_affine is None or labels_affine is None:
        return
    a, b = np.asarray(image_affine, float), np.asarray(labels_affine, float)
    corners = np.array(np.meshgrid(*[[0, max(0, s - 1)] for s in image_shape[-3:]], indexing="ij"))
    corners = corners.reshape(len(image_shape[-3:]), -1)
    pad = np.zeros((3 - corners.shape[0], corners.shape[1]))
    pts = np.vstack([pad, corners, np.ones((1, corners.shape[1]))])
    gap = float(np.abs((a @ pts)[:3] - (b @ pts)[:3]).max())
    tol_mm = 0.25 * min(spacing) if spacing else 0.01
    if gap > tol_mm:
        raise ValueError(
            f"the labels lie on another grid than the image: same shape {tuple(image_shape)} but voxel "
            f"positions differ by up to {gap:.2f} mm (a different series or a resampled file?)"
        )


def start_model(spec: str | None, num_classes: int, image: np.ndarray, cfg: AdaptConfig) -> tuple[Any, Any]:
    """The starting model (head resized to ``num_classes``) and its 2.5D conventions, checked on the image.

    Raises:
        ValueError: a model that cannot take the image (not a 2D segmenter of any input size, an ensemble,
            an even number of input channels, an RGB or 1D image).
    """
    from napari_medssl.engine.build import build_model

    spec = spec or DEFAULT_START
    extra_chans = 2 if cfg.coords else 0
    model, info = build_model(spec, "segment", num_classes, in_chans=2 * cfg.context + 1 + extra_chans)
    rec = (info.get("extra") or {}).get(slices25d.KEY)
    name = info.get("name", spec)
    if model.spec.input_size is not None:
        raise ValueError(
            f"{spec} ({name}) takes a fixed input size {model.spec.input_size}; pick a U-Net-like model"
        )
    if model.spec.spatial_dims != 2:
        raise ValueError(
            f"{spec} is a 3D model; fast adaptation trains a 2.5D slice model: leave --model out for the "
            f"default starting point ({DEFAULT_START}) or give a 2D segmenter"
        )
    chans = model.spec.in_chans
    slices25d.check_image(image)
    if isinstance(rec, dict) and rec.get("kind") == "2.5d":
        conv = slices25d.Conventions(
            context=int(rec["context"]), in_plane_mm=rec.get("in_plane_mm"), coords=bool(rec.get("coords"))
        )
    elif info["source"] == "fresh":
        conv = slices25d.Conventions(context=cfg.context, in_plane_mm=cfg.in_plane_mm, coords=cfg.coords)
    else:
        if chans % 2 == 0:
            raise ValueError(
                f"{spec} takes {chans} input channels; a 2.5D model needs an odd number (1, 3 ...)"
            )
        conv = slices25d.Conventions(context=(chans - 1) // 2, in_plane_mm=cfg.in_plane_mm)
    if cfg.fresh_decoder and info["source"] != "fresh" and "adapt" not in (info.get("extra") or {}):
        reset_decoder(model, cfg.seed)
    if cfg.coords and not conv.coords:
        widen_input(model, 2)
        conv = slices25d.Conventions(context=conv.context, in_plane_mm=conv.in_plane_mm, coords=True)
    if conv.in_chans != model.spec.in_chans:
        raise ValueError(
            f"{spec}: its checkpoint records {conv.in_chans} channels but the model takes {chans}"
        )
    return model, conv


def reset_decoder(model: Any, seed: int = 0) -> None:
    """Give a pretrained U-Net-like ``model`` a freshly initialised decoder and head (``ups``, ``decoders``,
    ``head``), keeping its encoder: the starting point's decoder learned its pretraining targets (synthetic
    lesions), which transferred worse to a patient's follow-up study than a fresh one (2026-12-03 study)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 2000)
    try:
        for name, module in model.named_modules():
            if name.split(".")[0] in ("ups", "decoders", "head") and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)


def widen_input(model: Any, extra: int) -> None:
    """Give ``model`` ``extra`` more input channels: its first convolution gets zero weights for them, so it
    starts computing exactly what it computed before (and learns to use them)."""
    chans = int(model.in_chans)
    conv = next(
        (m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == chans), None
    )
    if conv is None:
        raise ValueError(
            f"cannot add input channels to {type(model).__name__}: no first 2D convolution found"
        )
    w = conv.weight.data
    conv.weight = torch.nn.Parameter(torch.cat([w, torch.zeros(w.shape[0], extra, *w.shape[2:])], 1))
    conv.in_channels = chans + extra
    model.in_chans = chans + extra
    model.config = {**getattr(model, "config", {}), "in_chans": chans + extra}
    if getattr(model, "spec", None) is not None:
        import dataclasses

        model.spec = dataclasses.replace(model.spec, in_chans=chans + extra)


def preflight(
    image: np.ndarray, painted: np.ndarray, config: dict[str, Any] | AdaptConfig, rgb: bool = False
) -> tuple[Any, Any, list[int]]:
    """Every check of a run, before anything trains or a process starts: the grid (shape), the painted
    classes, and a starting model that takes the image. Returns ``(model, conventions, classes)``.

    Raises:
        ValueError: naming what is wrong (nothing is written, the painted array is not changed).
    """
    cfg = config if isinstance(config, AdaptConfig) else AdaptConfig(**config)
    if rgb:
        slices25d.check_image(image, rgb=True)
    check_grid(np.shape(image), np.shape(painted))
    classes = painted_classes(painted)
    model, conv = start_model(cfg.model, max(2, max(classes) + 1), image, cfg)
    return model, conv, classes


def choose_start(source: str | None, num_classes: int) -> tuple[str, str]:
    """The starting point for painted labels: ``(model source, why)``.

    The Model dock's model is kept when it was itself adapted this way (its checkpoint records 2.5D input
    conventions) and has at least the painted classes; any other model (a hippocampus U-Net, a classifier, a
    3D model) was not made for this input, so the default starting point :data:`DEFAULT_START` is used.
    """
    if source:
        try:
            from napari_medssl.engine.build import resolve_checkpoint
            from napari_medssl.models.registry import read_checkpoint

            path = resolve_checkpoint(source)
            extra = read_checkpoint(path)[2] if path is not None else {}
        except (OSError, ValueError):
            extra = {}
        rec = extra.get(slices25d.KEY) or {}
        if rec.get("kind") == "2.5d" and int(extra.get("num_classes") or 0) >= num_classes:
            return (
                source,
                f"continuing from {Path(source).name} (a 2.5D model with {extra['num_classes']} classes)",
            )
        return (
            DEFAULT_START,
            f"{Path(source).name} was not made for painted slices: starting from {DEFAULT_START}",
        )
    return DEFAULT_START, f"starting from {DEFAULT_START}"


# -- samples -------------------------------------------------------------------------------------------------
class PaintedCrops:
    """Random crops around painted voxels of a normalised, rescaled volume (see the module docstring).

    Args:
        vol: ``(Z, Y, X)`` normalised volume at the model's in-plane spacing.
        labels: ``(Z, Y, X)`` class indices, :data:`IGNORE` where unpainted.
        context: neighbouring slices as channels.
        crop: crop side in pixels.
        seed: the sampler's seed.
    """

    def __init__(
        self,
        vol: torch.Tensor,
        labels: torch.Tensor,
        context: int,
        crop: int,
        seed: int = 0,
        coords: bool = False,
    ) -> None:
        self.context, self.crop = context, crop
        half = crop // 2
        grid = slices25d.coord_channels(vol.shape[1:])[None]
        self.coords = F.pad(grid, (half,) * 4, mode="replicate")[0] if coords else None
        self.vol = F.pad(vol, (half, half, half, half))
        self.labels = F.pad(labels, (half, half, half, half), value=IGNORE)
        self.classes = [int(c) for c in torch.unique(labels) if c != IGNORE]
        self.where = {c: torch.nonzero(self.labels == c) for c in self.classes}
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (n, 2·context + 1, crop, crop)``, ``y (n, crop, crop)``."""
        xs, ys = [], []
        z_max = self.vol.shape[0] - 1
        for _ in range(n):
            cls = self.classes[int(self.rng.integers(len(self.classes)))]  # each class equally often
            pts = self.where[cls]
            z, cy, cx = pts[int(self.rng.integers(len(pts)))].tolist()
            jitter = self.rng.integers(-self.crop // 4, self.crop // 4 + 1, size=2)
            y0 = int(np.clip(cy + jitter[0] - self.crop // 2, 0, self.vol.shape[1] - self.crop))
            x0 = int(np.clip(cx + jitter[1] - self.crop // 2, 0, self.vol.shape[2] - self.crop))
            idx = [min(max(z + o, 0), z_max) for o in range(-self.context, self.context + 1)]
            x = self.vol[idx, y0 : y0 + self.crop, x0 : x0 + self.crop]
            if self.coords is not None:
                x = torch.cat([x, self.coords[:, y0 : y0 + self.crop, x0 : x0 + self.crop]])
            xs.append(x)
            ys.append(self.labels[z, y0 : y0 + self.crop, x0 : x0 + self.crop])
        return torch.stack(xs), torch.stack(ys)


def strong_augment(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, image_chans: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-plane flips, rotation ±20° and scale 0.8–1.25 (p 0.7), gamma/noise, contrast and brightness; the
    intensity changes only on the first ``image_chans`` channels (the others, coordinates, move with them)."""
    x, y = random_flips(x, y, (-1, -2), gen)
    x, y = random_affine(x, y, gen, max_degrees=20.0, scale=(0.8, 1.25), shift=0.05, p=0.7)
    n = x.shape[1] if image_chans is None else image_chans
    return torch.cat([strong_intensity(x[:, :n], gen), x[:, n:]], 1), y


def strong_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Contrast 0.75–1.25 and brightness ±0.05, then gamma and noise (:func:`random_intensity`)."""
    b = len(x)
    contrast = 0.75 + 0.5 * torch.rand(b, 1, 1, 1, generator=gen)
    bright = 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = (x - 0.5) * contrast + 0.5 + bright
    return random_intensity(x.clamp(0, 1), gen)


def prepare(
    image: np.ndarray, painted: np.ndarray, conv: Any, spacing_yx: tuple[float, float] | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Normalised, rescaled volume ``(Z, Y', X')``, class indices (unpainted :data:`IGNORE`) on that grid, and
    the in-plane factor."""
    factor = conv.factor(spacing_yx)
    vol = slices25d.normalized_slices(image, factor)
    lab = torch.from_numpy(np.asarray(painted).astype(np.int64) - 1)
    lab = lab if lab.ndim == 3 else lab[None]
    lab[lab < 0] = IGNORE
    if tuple(vol.shape[1:]) != tuple(lab.shape[1:]):
        lab = F.interpolate(lab[:, None].float(), size=vol.shape[1:], mode="nearest")[:, 0].long()
    return vol, lab, factor


# -- the run -------------------------------------------------------------------------------------------------
def adapt_events(
    image: np.ndarray,
    painted: np.ndarray,
    config: dict[str, Any] | AdaptConfig,
    spacing_yx: tuple[float, float] | None = None,
    affine: np.ndarray | None = None,
) -> Iterator[dict[str, Any]]:
    """Fine-tune the starting model on ``painted`` (0 unlabelled, 1 background, ``k + 1`` class ``k``); yield
    events (see the module docstring). ``image`` is ``(Z, Y, X)`` or ``(Y, X)``, raw intensities."""
    cfg = config if isinstance(config, AdaptConfig) else AdaptConfig(**config)
    clock = time.process_time if cfg.clock == "cpu" else time.monotonic
    t0, wall0, cpu0 = clock(), time.monotonic(), time.process_time()
    budget = 60.0 * cfg.max_minutes
    torch.manual_seed(cfg.seed)
    model, conv, classes, vol, lab = _setup(image, painted, cfg, spacing_yx, affine)
    num_classes = max(2, max(classes) + 1)
    device = torch.device(cfg.device if cfg.device != "auto" else "cpu")
    model.to(device).train()
    sampler = PaintedCrops(vol, lab, conv.context, conv.window or cfg.crop, cfg.seed, conv.coords)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    encoder = [p for n, p in model.named_parameters() if n.startswith(("encoders.", "encoder."))]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = _extra(cfg, conv, num_classes, classes, painted)
    step, saved = yield from _train_steps(
        model,
        sampler,
        gen,
        optimizer,
        encoder,
        cfg,
        (clock, t0, budget),
        conv,
        out,
        extra,
        image,
        (spacing_yx, affine),
        device,
    )
    elapsed = clock() - t0
    path = next(_checkpoint(model, out, extra, step, elapsed, cfg, None, conv, (spacing_yx, affine), device))[
        "path"
    ]
    if cfg.preview_slice is not None:
        yield _preview(model, image, conv, (spacing_yx, affine), device, cfg.preview_slice)
    record = {
        "steps": step,
        "elapsed_s": round(elapsed, 2),
        "clock": cfg.clock,
        "wall_s": round(time.monotonic() - wall0, 2),
        "cpu_s": round(time.process_time() - cpu0, 2),
        "checkpoints": saved + 1,
        **extra["adapt"],
    }
    (out / "adapt.json").write_text(json.dumps(record, indent=1))
    yield {"event": "checkpoint", "step": step, "path": path, "best": True}
    yield {
        "event": "done",
        "step": step,
        "best_path": path,
        "last_path": path,
        "metrics": {},
        "record": record,
    }


def _setup(
    image: np.ndarray,
    painted: np.ndarray,
    cfg: AdaptConfig,
    spacing_yx: tuple[float, float] | None,
    affine: np.ndarray | None,
) -> tuple[Any, Any, list[int], torch.Tensor, torch.Tensor]:
    """The starting model, the run's conventions (train factor, painted ROI), the painted classes, and the
    prepared volume and labels (:func:`prepare`)."""
    model, conv, classes = preflight(image, painted, cfg)
    vol, lab, factor = prepare(image, painted, conv, spacing_yx)
    roi = None
    if affine is not None and cfg.roi_margin_mm is not None and np.ndim(painted) == 3:
        roi = slices25d.painted_boxes(
            np.asarray(painted).astype(np.int64) - 1, affine, cfg.roi_margin_mm, cfg.near_mm
        )
    conv = slices25d.Conventions(
        context=conv.context,
        in_plane_mm=conv.in_plane_mm,
        train_factor=factor,
        coords=conv.coords,
        roi=roi,
        window=min(cfg.crop, _crop_cap(vol)),  # predicted by windows of the training crop (slices25d)
    )
    return model, conv, classes, vol, lab


def _train_steps(
    model: Any,
    sampler: PaintedCrops,
    gen: torch.Generator,
    optimizer: torch.optim.Optimizer,
    encoder: list,
    cfg: AdaptConfig,
    timing: tuple[Callable[[], float], float, float],
    conv: Any,
    out: Path,
    extra: dict,
    image: np.ndarray,
    geometry: tuple,
    device: torch.device,
) -> Generator[dict[str, Any], None, tuple[int, int]]:
    """The training loop: step and checkpoint events until the budget or ``cfg.max_steps`` is spent; returns
    the steps taken and the checkpoints saved."""
    clock, t0, budget = timing
    spacing_yx, affine = geometry
    step, last_save, saved = 0, None, 0
    from napari_medssl.engine.loop import soft_dice_loss

    while step < cfg.max_steps:
        elapsed = clock() - t0
        progress = elapsed / budget if budget > 0 else 1.0
        if progress >= 1.0 and step > 0:
            break
        for p in encoder:  # frozen encoder first, then everything
            p.requires_grad_(progress >= cfg.freeze_fraction)
        lr = cfg.lr * min(1.0, (step + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for group in optimizer.param_groups:
            group["lr"] = max(lr, cfg.lr * 0.02)
        x, y = strong_augment(*sampler.batch(cfg.batch_size), gen, image_chans=2 * conv.context + 1)
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE) + soft_dice_loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        yield {
            "event": "step",
            "step": step,
            "total_steps": cfg.max_steps,
            "loss": loss.item(),
            "lr": lr,
            "progress": min(1.0, (clock() - t0) / budget) if budget > 0 else 1.0,
            "remaining_s": max(0.0, budget - (clock() - t0)),
        }
        now = clock() - t0
        due = cfg.first_checkpoint_s if last_save is None else last_save + cfg.checkpoint_every_s
        if now >= due and now < budget:
            yield from _checkpoint(
                model, out, extra, step, now, cfg, image, conv, (spacing_yx, affine), device
            )
            last_save, saved = clock() - t0, saved + 1
    return step, saved


def _crop_cap(vol: torch.Tensor) -> int:
    """The largest crop worth taking: the rescaled slice's longer side, rounded up to a multiple of 16."""
    return int(16 * math.ceil(max(vol.shape[1:]) / 16))


def _extra(cfg: AdaptConfig, conv: Any, k: int, classes: list[int], painted: np.ndarray) -> dict[str, Any]:
    names = list(cfg.class_names or [])
    if len(names) != k:
        names = ["background", *[f"class {i}" for i in range(1, k)]]
    arr = np.asarray(painted)
    arr = arr if arr.ndim == 3 else arr[None]
    painted_slices = [int(z) for z in np.flatnonzero(arr.reshape(len(arr), -1).any(1))]
    return {
        "task": "segment",
        "num_classes": k,
        "class_names": names,
        "label_values": None,
        "slice_axis": 0,
        slices25d.KEY: conv.to_extra(),
        "train_config": {"augment": True, "flip_axes": [-1, -2]},
        "adapt": {
            "start": cfg.model or DEFAULT_START,
            "classes_painted": classes,
            "painted_slices": painted_slices,
            "config": {k_: v for k_, v in asdict(cfg).items() if k_ != "extra"},
        },
        **cfg.extra,
    }


def _checkpoint(
    model: Any,
    out: Path,
    extra: dict,
    step: int,
    elapsed: float,
    cfg: AdaptConfig,
    image: Any,
    conv: Any,
    geometry: tuple,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    """Write ``best.safetensors`` (atomic) and yield its event, then a preview when asked for."""
    from napari_medssl.models.registry import save_model

    path = save_model(model, out / BEST, extra={**extra, "step": step, "elapsed_s": round(elapsed, 2)})
    yield {"event": "checkpoint", "step": step, "path": str(path), "best": True, "elapsed_s": elapsed}
    if image is not None and cfg.preview_slice is not None:
        yield _preview(model, image, conv, geometry, device, cfg.preview_slice)


def _preview(model: Any, image: np.ndarray, conv: Any, geometry: tuple, device: torch.device, z: int) -> dict:
    """``{"event": "preview", "slice", "labels"}``: slice ``z`` predicted (class ``k`` → ``k + 1``, else 0);
    ``geometry`` is ``(spacing_yx, affine)``."""
    n = 1 if np.ndim(image) == 2 else np.shape(image)[0]
    z = int(min(max(z, 0), n - 1))
    spacing_yx, affine = geometry
    probs = slices25d.segment_probabilities(model, image, conv, device, spacing_yx, slices=[z], affine=affine)
    lab = probs[:, z] if np.ndim(image) == 3 else probs
    cls = lab.argmax(0)
    labels = np.where(cls > 0, cls + 1, 0).astype(np.uint8)
    return {"event": "preview", "slice": z, "labels": labels}
