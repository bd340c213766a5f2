"""``TrainConfig``: every choice a training run makes, saved as ``config.json`` in its run folder."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("pretrain", "classify", "segment")


@dataclass
class TrainConfig:
    """One training run (pretraining or fine-tuning).

    Attributes:
        model: a registered model name (``"unet_tiny"``), a zoo name or a ``.safetensors`` checkpoint path.
        task: ``"pretrain"`` (the model's ``pretrain_loss``), ``"classify"`` or ``"segment"``.
        data: a data path (MSD folder, DICOM folder, PNG/TIFF folder, mini-MIAS folder, MedMNIST ``.npz``), a
            list of them (concatenated), or a :class:`~napari_medssl.engine.data.DataSource` (e.g. in-memory
            arrays from the viewer).
        out_dir: the run folder (config, split, checkpoints, ``events.jsonl``).
        max_steps: optimiser steps in total (a resumed run continues up to this number).
        max_minutes: a wall-clock budget as well (training time of all sessions of the run, resumes included;
            validation counted): the run ends at whichever of ``max_steps`` and ``max_minutes`` comes first,
            and the learning-rate cosine (and models' own schedules, e.g. DINO's teacher momentum) follow the
            run's progress, the larger of steps done / ``max_steps`` and minutes spent / ``max_minutes``, so a
            time-bound run still ends with a decayed learning rate. ``None``: steps only.
        batch_size: samples per step and process.
        lr: peak learning rate (AdamW), reached after ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``.
        weight_decay: AdamW weight decay (not applied to biases and norms).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        grad_clip: clip the gradient norm to this (0 = off).
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``.
        seed: seeds the split, the sampling order, the augmentations and the model's initialisation.
        val_every: validate (and checkpoint) every this many steps, and at the end.
        val_fraction: share of cases (groups: a patient, a woman's two mammograms) held out for validation;
            MedMNIST files use their official ``val`` split instead.
        split_file: a ``split.json`` from another run to reuse (same split across models); overrides the
            seeded split.
        num_workers: DataLoader worker processes (0 = load in the training process).
        num_classes: classes for a new head (0 = take it from the data).
        ignore_index: a label value meaning "unlabelled" (painted labels use 0): those voxels do not count in
            the loss or the metrics. Applied before ``label_map``.
        label_map: remap label values after ``ignore_index`` (``{1: 0, 2: 1}`` turns painted 1, 2 into classes
            0, 1).
        augment: random flips, a small affine and intensity gamma/noise during training.
        flip_axes: spatial axes (counted from the end, ``-1`` = X) that may be flipped; leave out axes where a
            flip changes anatomy's meaning.
        slice_axis: the volume axis (Z Y X = 0 1 2) that 2D models slice along.
        patch_size: spatial size of training samples for segmentation (crop/pad) and classification (resize)
            when the model has no ``input_size``; ``None`` picks one from the data.
        model_overrides: extra keyword arguments for ``create_model`` (``{"drop_path_rate": 0.1}``).
        balance_classes: weight the classification loss by inverse class frequency.
        best_metric: validation metric that picks ``best.safetensors`` (``None``: ``mean_dice`` for
            segmentation, ``auc`` for classification, ``val_loss`` for pretraining).
        resume: continue from ``out_dir/last.json`` when it exists.
        amp: bf16 autocast on CUDA.
        teacher: knowledge distillation (Hinton et al. 2015): a trained model of the same task, classes,
            channels and spatial dims (a checkpoint, a zoo name or a run folder; an ensemble works when its
            members take the student's inputs). It sees every augmented training batch (no gradients, eval
            mode, never saved with the student) and the loss gains ``distill_weight · T² · KL(teacher ‖
            student)`` over the labelled voxels (images), at temperature ``T = distill_temperature``. The
            student is the same model at the same size: only its training signal changes.
        distill_weight: weight of the distillation term (the hard-label loss keeps weight 1).
        distill_temperature: softmax temperature ``T`` of both sides of the KL term.
        ema_decay: keep an exponential moving average of the weights (Polyak averaging, timm's
            ``ModelEmaV3`` with its decay warm-up: ``1 - (1 + step)^(-2/3)``, capped at this value; 0 = off).
            Validation scores the averaged weights and ``best.safetensors`` holds them; the raw weights
            keep training and both are checkpointed for resume. Classifiers and segmenters only.
    """

    model: str
    task: str = "segment"
    data: Any = None
    out_dir: str = "runs/medssl"
    max_steps: int = 1000
    max_minutes: float | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    device: str = "auto"
    seed: int = 0
    val_every: int = 200
    val_fraction: float = 0.2
    split_file: str | None = None
    num_workers: int = 0
    num_classes: int = 0
    ignore_index: int | None = None
    label_map: dict[int, int] | None = None
    augment: bool = True
    flip_axes: tuple[int, ...] = (-1,)
    slice_axis: int = 0
    patch_size: tuple[int, ...] | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    balance_classes: bool = True
    best_metric: str | None = None
    resume: bool = True
    amp: bool = True
    teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        for name in ("max_steps", "batch_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive, got {self.max_minutes!r}")
        if not self.distill_weight >= 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be positive, got {self.distill_temperature!r}")
        if self.teacher is not None and self.task == "pretrain":
            raise ValueError(
                "a teacher distils a classifier or a segmenter; pretraining has its own objective"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay!r}")
        if self.ema_decay and self.task == "pretrain":
            raise ValueError(
                "ema_decay averages a classifier's or segmenter's weights; pretraining models keep their own "
                "moving averages (DINO's teacher)"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (Z, Y, X), got {self.slice_axis!r}")
        if self.label_map is not None:
            self.label_map = {int(k): int(v) for k, v in self.label_map.items()}
        self.flip_axes = tuple(int(a) for a in self.flip_axes)
        if self.patch_size is not None:
            self.patch_size = tuple(int(s) for s in self.patch_size)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (data sources that are not paths are recorded by their description)."""
        out = dataclasses.asdict(self)
        out["data"] = _describe_data(self.data)
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_json` output (unknown keys are refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (atomically)."""
        from napari_medssl._atomic import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2))


def _describe_data(data: Any) -> Any:
    if data is None or isinstance(data, str | int | float):
        return data
    if isinstance(data, os.PathLike):
        return os.fspath(data)
    if isinstance(data, list | tuple):
        return [_describe_data(d) for d in data]
    return getattr(data, "description", type(data).__name__)
