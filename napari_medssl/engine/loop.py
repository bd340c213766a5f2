"""Training as a generator of events: ``train(config)`` for pretraining and fine-tuning alike.

Events are plain dicts (see ``napari_medssl/README.md``)::

    {"event": "step", "step", "total_steps", "loss", "lr"}
    {"event": "val", "step", "metrics": {...}}
    {"event": "checkpoint", "step", "path", "best": bool}
    {"event": "done", "best_path", "metrics", "last_path", "step"}

The loop never prints or exits; closing the generator stops training. Under ``torchrun`` (``WORLD_SIZE`` > 1
in the environment) it runs with DistributedDataParallel (gloo on CPU, NCCL on CUDA) and a distributed
sampler; every rank yields step events, only rank 0 validates, writes and yields val/checkpoint events.

Axis legend: B batch, C channels, Z Y X space, K classes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from napari_medssl.engine import distributed as dist_utils
from napari_medssl.engine.augment import IGNORE, augment_batch
from napari_medssl.engine.build import (
    build_model,
    check_task,
    count_params,
    param_groups,
    resolve_checkpoint,
)
from napari_medssl.engine.checkpoint import RunFolder
from napari_medssl.engine.config import TrainConfig
from napari_medssl.engine.data import DataSource, open_data
from napari_medssl.engine.evaluate import evaluate_cases
from napari_medssl.engine.samples import SampleSet, choose_size
from napari_medssl.engine.split import load_split, save_split, select, split_for
from napari_medssl.inference import pick_device
from napari_medssl.models.spec import attach_spec
from napari_medssl.resolve import resolve

DEFAULT_BEST = {"segment": "mean_dice", "classify": "auc", "pretrain": "val_loss"}
LOWER_IS_BETTER = ("val_loss", "loss")
AUGMENT_SEED_STRIDE = 1000  # rank r's augmentation stream: seed * 1000 + r (distinct per rank and per seed)
RESUME_RESEED_STRIDE = 7919  # a prime: ranks other than 0 reseed their augmentation by the step resumed at
VAL_LOSS_SEED_OFFSET = 12345  # the validation loss's own random stream (masks of self-supervised losses)


def train(config: TrainConfig) -> Iterator[dict[str, Any]]:
    """Run ``config`` and yield its events (see the module docstring)."""
    return Trainer(config).run()


def pretrain(config: TrainConfig) -> Iterator[dict[str, Any]]:
    """:func:`train` with ``task="pretrain"``."""
    config.task = "pretrain"
    return train(config)


def finetune(config: TrainConfig) -> Iterator[dict[str, Any]]:
    """:func:`train` for ``"classify"`` or ``"segment"``."""
    if config.task == "pretrain":
        raise ValueError("finetune needs task 'classify' or 'segment'")
    return train(config)


class SkipSampler(DistributedSampler):
    """A DistributedSampler that can start part-way into an epoch (for exact resumes)."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return super().__len__() - self.start


class LossModule(nn.Module):
    """``forward(x, y) -> loss``: the objective of a task, so DDP sees one forward per step.

    Segmentation: cross-entropy + soft Dice over foreground classes (ignored voxels left out).
    Classification: (class-weighted) cross-entropy. Pretraining: ``model.pretrain_loss(x, y)``.
    With a ``teacher`` (classify/segment): plus ``distill_weight`` × :func:`distill_loss` towards its logits.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        class_weights: torch.Tensor | None = None,
        teacher: nn.Module | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.model, self.task = model, task
        self.register_buffer("class_weights", class_weights, persistent=False)
        # a tuple, not a submodule: the teacher is not trained, not saved and not synchronised by DDP
        self._teacher = () if teacher is None else (teacher,)
        self.distill_weight, self.distill_temperature = float(distill_weight), float(distill_temperature)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "pretrain":
            labelled = y.ndim == 1 and bool((y >= 0).any())
            return self.model.pretrain_loss(x, y if labelled else None)["loss"]
        logits = self.model(x).float()
        if self.task == "classify":
            loss = F.cross_entropy(logits, y, weight=self.class_weights, ignore_index=IGNORE)
        else:
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE) + soft_dice_loss(logits, y)
        if self._teacher and self.distill_weight > 0:
            teacher = self._teacher[0]
            with torch.no_grad():
                target = teacher(x).float()
            if target.shape != logits.shape:
                raise ValueError(
                    f"the teacher's output {tuple(target.shape)} does not match the student's "
                    f"{tuple(logits.shape)}; it needs the same classes and output size"
                )
            loss = loss + self.distill_weight * distill_loss(logits, target, y, self.distill_temperature)
        return loss


def distill_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per voxel (image), averaged over those ``y`` does not ignore.

    ``logits``/``teacher_logits`` are ``(B, K, *S)`` (or ``(B, K)``), ``y`` is ``(B, *S)`` (``(B,)``) with -100
    ignored; the ``T²`` keeps the gradient's size independent of ``T`` (Hinton et al. 2015).
    """
    log_s = F.log_softmax(logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(1)  # (B, *S)
    valid = (y != IGNORE).to(kl.dtype)
    return (kl * valid).sum() / valid.sum().clamp(min=1) * temperature**2


def soft_dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − mean soft Dice over foreground classes; ``logits (B, K, *S)``, ``y (B, *S)`` with -100 ignored."""
    k = logits.shape[1]
    valid = (y != IGNORE).unsqueeze(1)
    probs = torch.softmax(logits, 1) * valid
    # float one-hot built in place (F.one_hot would make an int64 (B, *S, K) tensor: twice the bytes, plus a copy)
    onehot = torch.zeros_like(probs).scatter_(1, y.clamp(min=0).unsqueeze(1), 1.0) * valid
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dims)[1:]
    denom = (probs + onehot).sum(dims)[1:]
    if k < 2:
        return logits.sum() * 0
    return 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()


def lr_at(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr · min_lr_ratio``.

    The cosine runs over the steps after the warm-up, or, when ``progress`` (the run's fraction done, 0–1, see
    :func:`run_progress`) is given, over that fraction: a time-bound run decays on time.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if progress is None:
        span = max(1, config.max_steps - config.warmup_steps)
        t = min(1.0, (step - config.warmup_steps) / span)
    else:
        t = min(1.0, max(0.0, progress))
    low = config.lr * config.min_lr_ratio
    return low + (config.lr - low) * 0.5 * (1 + math.cos(math.pi * t))


def run_progress(step: int, elapsed_s: float, config: TrainConfig) -> float:
    """The run's fraction done: steps / ``max_steps``, or minutes spent / ``max_minutes`` if that is larger."""
    done = step / config.max_steps
    if config.max_minutes is not None:
        done = max(done, elapsed_s / (60.0 * config.max_minutes))
    return min(1.0, done)


def _is_better(value: float, best: float | None, metric: str) -> bool:
    if not np.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


@dataclass
class _RunState:
    """Where a run is: its step, progress (fraction done), best-so-far record, last metrics and checkpoint."""

    step: int = 0
    progress: float = 0.0
    clock0: float = 0.0  # time.monotonic() at the run's start, sessions before a resume included
    record: dict[str, Any] = field(
        default_factory=lambda: {
            "best_value": None,
            "best_step": None,
            "best_metrics": None,
            "elapsed_s": 0.0,
        }
    )
    metrics: dict[str, float] = field(default_factory=dict)
    last_path: Path | None = None

    def start_clock(self, config: TrainConfig) -> None:
        """Start the wall-clock: sessions before a resume count (all ranks follow rank 0's clock)."""
        self.clock0 = time.monotonic() - float(self.record.get("elapsed_s") or 0.0)
        self.progress = run_progress(self.step, time.monotonic() - self.clock0, config)


class Trainer:
    """One training run; :meth:`run` is the generator. Attributes are there for tests and the viewer.

    Attributes (set by :meth:`run`): ``model`` (unwrapped), ``source``, ``split``, ``train_set``, ``val_cases``,
    ``size``, ``device``, ``rank``, ``world_size``.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.folder = RunFolder(config.out_dir)
        self.model: nn.Module | None = None
        self.ema: nn.Module | None = None  # timm's ModelEmaV3 when ``config.ema_decay`` is set

    def _setup_data(self) -> None:
        cfg = self.config
        self.source: DataSource = open_data(cfg.data)
        if cfg.task != "pretrain" and self.source.task not in (cfg.task, None):
            raise ValueError(
                f"the data are labelled for {self.source.task!r}, not {cfg.task!r}: {self.source.description}"
            )
        if cfg.task != "pretrain" and self.source.task is None:
            raise ValueError(f"{cfg.task} needs labelled data; {self.source.description} has no labels")
        cases = self.source.cases()
        saved = self.folder.dir / "split.json"
        if cfg.resume and saved.is_file():
            self.split = load_split(saved)
        elif cfg.split_file:
            self.split = load_split(cfg.split_file)
        else:
            self.split = split_for(self.source, cases, cfg.val_fraction, cfg.seed)
        self.train_cases = select(cases, self.split["train"], "train split")
        self.val_cases = select(cases, self.split["val"], "val split")
        if not self.train_cases:
            raise ValueError("the training split is empty; lower val_fraction or add data")

    def _num_classes(self) -> int:
        cfg = self.config
        if cfg.num_classes:
            return cfg.num_classes
        if cfg.task == "pretrain":
            return 0
        if cfg.label_map:
            return max(cfg.label_map.values()) + 1
        return self.source.num_classes()

    def _class_names(self, num_classes: int) -> list[str] | None:
        names = self.source.class_names
        if names and len(names) == num_classes and not self.config.label_map:
            return list(names)
        return [str(i) for i in range(num_classes)] if num_classes else None

    def _label_values(self) -> list[int] | None:
        """The data's label value of each class (inverse of ``label_map``), to write predictions back."""
        if not self.config.label_map or self.config.task != "segment":
            return None
        inverse = {v: k for k, v in self.config.label_map.items()}
        return [inverse.get(c, c) for c in range(self.num_classes)]

    def _extra(self, metrics: dict[str, float] | None) -> dict[str, Any]:
        cfg = self.config
        return {
            "task": cfg.task,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "label_values": self._label_values(),
            "sample_size": list(self.size),
            "slice_axis": cfg.slice_axis,
            "data": self.source.description,
            "split_file": "split.json",
            "split_val": self.split["val"],
            "seed": cfg.seed,
            "metrics": metrics or {},
            "train_config": cfg.to_json(),
        }

    def run(self) -> Iterator[dict[str, Any]]:
        """The training generator (see the module docstring)."""
        cfg = self.config
        owns_pg = dist_utils.init_from_env(cfg.device)
        try:
            yield from self._run()
        finally:
            if owns_pg:
                dist_utils.cleanup()

    def _build_teacher(self, student: nn.Module, dims: int, chans: int) -> nn.Module:
        """The frozen, eval-mode teacher of ``config.teacher`` on the training device, checked against the student.

        Raises:
            ValueError: not a trained checkpoint, or another task, class count, channel count or dimensionality.
        """
        from napari_medssl.models.registry import load_model

        source = str(self.config.teacher)
        path = resolve(source).path  # trained weights only: an architecture name is refused
        teacher = load_model(path, map_location=self.device).eval().requires_grad_(False)
        name = f"teacher {source}"
        check_task(teacher, self.config.task, name)
        facts = teacher.spec
        checks = [  # (what, the teacher's, the student's)
            ("classes", facts.num_classes, self.num_classes),
            ("input channels", facts.in_chans, chans),
        ]
        if self.config.task == "segment":
            checks.append(("spatial dims", facts.spatial_dims, dims))
        for what, theirs, mine in checks:
            if int(theirs) != int(mine):
                raise ValueError(f"{name} has {theirs} {what}, the student {mine}; they must match")
        sizes = [m.spec.input_size for m in (teacher, student)]
        if any(sizes) and sizes[0] != sizes[1]:  # fixed-size models (ViTs) see the student's inputs
            raise ValueError(
                f"{name} takes inputs of size {sizes[0]}, the student {sizes[1]}; they must match"
            )
        return teacher

    def _run(self) -> Iterator[dict[str, Any]]:
        """Set up, resume or start, then the step loop: train, and every ``val_every`` steps validate and save."""
        cfg = self.config
        model = self._prepare_model()
        loss_module, wrapped, optimizer, aug_gen = self._training_parts(model)
        run, last = self._resume_or_start(model, optimizer, aug_gen)
        dist_utils.barrier()
        sampler, loader = self._loader()
        per_epoch = max(1, len(loader))
        run.start_clock(cfg)
        while run.step < cfg.max_steps and run.progress < 1.0:
            epoch = run.step // per_epoch
            sampler.set_epoch(epoch)
            sampler.start = (run.step % per_epoch) * cfg.batch_size
            self.train_set.set_epoch(epoch)
            for batch in loader:
                loss, lr = self._train_step(model, wrapped, optimizer, batch, aug_gen, run)
                yield {
                    "event": "step",
                    "step": run.step,
                    "total_steps": cfg.max_steps,
                    "loss": loss,
                    "lr": lr,
                }
                finished = run.step >= cfg.max_steps or run.progress >= 1.0
                if run.step % cfg.val_every == 0 or finished:
                    if self.rank == 0:
                        yield from self._validate_and_save(model, loss_module, optimizer, aug_gen, run)
                    dist_utils.barrier()
                if finished:
                    break
        if run.last_path is None and last is not None:
            run.last_path = self.folder.dir / last["weights"]
        best_path = self.folder.best_path
        yield {
            "event": "done",
            "step": run.step,
            "best_path": str(best_path) if best_path.is_file() else None,
            "last_path": None if run.last_path is None else str(run.last_path),
            "metrics": run.record.get("best_metrics") or run.metrics,
        }

    def _prepare_model(self) -> nn.Module:
        """Check the model names, read the data and split, build the model and the sample sets."""
        cfg = self.config
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.device = dist_utils.local_device(pick_device(cfg.device))
        resolve_checkpoint(cfg.model)  # a bad model name fails before any data are read
        if cfg.teacher:
            resolve(cfg.teacher)  # trained weights only
        torch.manual_seed(cfg.seed)
        self._setup_data()
        in_chans = int(self.train_cases[0].load()[0].shape[0])
        self.num_classes = self._num_classes()
        self.class_names = self._class_names(self.num_classes)
        model, self.build_info = build_model(
            cfg.model, cfg.task, self.num_classes, in_chans, cfg.model_overrides
        )
        self.model = model
        dims, chans = model.spec.spatial_dims, model.spec.in_chans
        common = dict(task=cfg.task, model_dims=dims, in_chans=chans, slice_axis=cfg.slice_axis)
        common.update(ignore_index=cfg.ignore_index, label_map=cfg.label_map, seed=cfg.seed)
        self.train_set = SampleSet(self.train_cases, train=True, **common)
        self.val_set = SampleSet(self.val_cases, train=False, **common) if self.val_cases else None
        model_size = model.spec.input_size
        shapes = [] if model_size or cfg.patch_size else self.train_set.spatial_shapes()
        self.size = choose_size(model_size, cfg.patch_size, shapes, dims)
        self.train_set.set_size(self.size)
        if self.val_set is not None:
            self.val_set.set_size(self.size)
        # validation during training runs the model as inference will: on samples of this size
        attach_spec(model, {"sample_size": list(self.size), "class_names": self.class_names})
        return model.to(self.device)

    def _training_parts(
        self, model: nn.Module
    ) -> tuple[LossModule, nn.Module, torch.optim.Optimizer, torch.Generator]:
        """The loss (class weights, distillation teacher), its DDP wrapper, the weights' average, the optimiser
        and this rank's augmentation generator."""
        cfg = self.config
        class_weights = None
        if cfg.task == "classify" and cfg.balance_classes:
            counts = self.train_set.class_counts(self.num_classes)
            w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(1, (counts > 0).sum()), 0.0)
            class_weights = torch.tensor(w, dtype=torch.float32, device=self.device)
        dims, chans = model.spec.spatial_dims, model.spec.in_chans
        teacher = self._build_teacher(model, dims, chans) if cfg.teacher else None
        loss_module = LossModule(
            model, cfg.task, class_weights, teacher, cfg.distill_weight, cfg.distill_temperature
        ).to(self.device)
        wrapped = dist_utils.wrap(loss_module, self.device)
        # the weights' moving average (timm): validated, saved as best, checkpointed beside the raw weights
        self.ema = None
        if cfg.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        aug_gen = torch.Generator().manual_seed(self._augment_seed())
        return loss_module, wrapped, optimizer, aug_gen

    def _augment_seed(self, resumed_at: int = 0) -> int:
        """This rank's augmentation seed; ranks other than 0 resumed at step ``resumed_at`` (their streams are
        not saved) are reseeded by that step."""
        return self.config.seed * AUGMENT_SEED_STRIDE + self.rank + RESUME_RESEED_STRIDE * resumed_at

    def _resume_or_start(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, aug_gen: torch.Generator
    ) -> tuple[_RunState, dict[str, Any] | None]:
        """Restore weights, average, optimiser and random streams from ``last.json`` (``config.resume``), or
        start a fresh run folder (config, split, a start event); return the run's state and the last record."""
        cfg = self.config
        run = _RunState()
        last = self.folder.read_last() if cfg.resume else None
        if last is not None:
            from napari_medssl.models.registry import read_checkpoint

            state, _, _ = read_checkpoint(self.folder.dir / last["weights"])
            model.load_state_dict(state)
            if self.ema is not None:  # a run that had no average yet starts it from the weights it has
                ema_file = last.get("ema")
                ema_state = read_checkpoint(self.folder.dir / ema_file)[0] if ema_file else state
                self.ema.module.load_state_dict(ema_state)
            rng = self.folder.load_optim(last, optimizer)
            torch.set_rng_state(rng["torch"])
            if self.rank == 0:
                aug_gen.set_state(rng["augment0"])
            else:  # other ranks' augmentation streams are not saved: reseed them by step
                aug_gen.manual_seed(self._augment_seed(resumed_at=int(last["step"])))
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            run.step = int(last["step"])
            run.record = {k: last.get(k, run.record[k]) for k in run.record}
        elif self.rank == 0:
            self._start_fresh(model)
        run.metrics = dict(run.record.get("best_metrics") or {})
        return run, last

    def _start_fresh(self, model: nn.Module) -> None:
        """A fresh run folder: the config, the split and a start event."""
        cfg = self.config
        self.folder.start_fresh()
        cfg.save(self.folder.dir / "config.json")
        save_split(
            self.split,
            self.folder.dir / "split.json",
            seed=cfg.seed,
            data=self.source.description,
            val_fraction=cfg.val_fraction,
        )
        info = {k: v for k, v in self.build_info.items() if k != "extra"}
        self.folder.log(
            {
                "event": "start",
                "params": count_params(model),
                "size": list(self.size),
                "n_train": len(self.train_set),
                "n_val": len(self.val_cases),
                **info,
            }
        )

    def _loader(self) -> tuple[SkipSampler, DataLoader]:
        """The training sampler (resumable mid-epoch, shared out over ranks) and its loader."""
        cfg = self.config
        sampler = SkipSampler(
            self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=cfg.seed
        )
        loader = DataLoader(
            self.train_set,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=len(sampler) >= cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        return sampler, loader

    def _train_step(
        self,
        model: nn.Module,
        wrapped: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch: dict[str, torch.Tensor],
        aug_gen: torch.Generator,
        run: _RunState,
    ) -> tuple[float, float]:
        """One optimiser step on ``batch`` (augmented); advances ``run``; returns ``(loss, lr)``.

        Raises:
            FloatingPointError: a non-finite loss.
            MemoryError: out of memory on the device.
        """
        cfg = self.config
        timed = cfg.max_minutes is not None
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        if cfg.augment:
            x, y = augment_batch(x, y, aug_gen, cfg.flip_axes)
        lr = lr_at(run.step, cfg, run.progress if timed else None)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if cfg.amp and self.device.type == "cuda"
            else nullcontext()
        )
        try:
            with amp:
                loss = wrapped(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {run.step + 1}; lower the learning rate (--lr)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        except torch.OutOfMemoryError:
            raise MemoryError(
                f"out of memory on {self.device} at step {run.step + 1} with batch size {cfg.batch_size}; "
                "lower the batch size (--batch-size) or train on the CPU (--device cpu)"
            ) from None
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        run.step += 1
        if self.ema is not None:
            self.ema.update(model, step=run.step)
        run.progress = run_progress(run.step, time.monotonic() - run.clock0, cfg)
        if timed and self.world_size > 1:  # every rank stops at the same step
            run.progress = dist_utils.broadcast_float(run.progress, self.device)
        hook = getattr(model, "on_train_step", None)  # an optional model hook (not a model fact)
        if callable(hook):  # models' schedules: a step count on the run's progress
            hook(round(run.progress * cfg.max_steps) if timed else run.step, cfg.max_steps)
        return loss.item(), lr

    def _validate_and_save(
        self,
        model: nn.Module,
        loss_module: LossModule,
        optimizer: torch.optim.Optimizer,
        aug_gen: torch.Generator,
        run: _RunState,
    ) -> Iterator[dict[str, Any]]:
        """Validate (rank 0), keep the best, write ``last`` and, when it is the best, ``best.safetensors``."""
        cfg = self.config
        best_metric = cfg.best_metric or DEFAULT_BEST[cfg.task]
        metrics = run.metrics = self.validate(loss_module)
        yield {"event": "val", "step": run.step, "metrics": metrics}
        self.folder.log({"event": "val", "step": run.step, "metrics": metrics})
        value = metrics.get(best_metric, float("nan")) if best_metric != "last" else 0.0
        no_val = self.val_set is None  # nothing to compare on: the latest is the best
        is_best = no_val or best_metric == "last" or _is_better(value, run.record["best_value"], best_metric)
        if is_best:
            run.record.update(best_value=value, best_step=run.step, best_metrics=metrics)
        rng = {"torch": torch.get_rng_state(), "augment0": aug_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        extra = self._extra(metrics)
        run.record["elapsed_s"] = round(time.monotonic() - run.clock0, 3)
        ema = None if self.ema is None else self.ema.module
        run.last_path = self.folder.save_last(model, optimizer, run.step, extra, run.record, rng, ema)
        yield {"event": "checkpoint", "step": run.step, "path": str(run.last_path), "best": False}
        if is_best:
            best = self.folder.save_best(self.eval_model, extra)
            yield {"event": "checkpoint", "step": run.step, "path": str(best), "best": True}

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation scores and ``best.safetensors`` keeps (the moving average, if any)."""
        assert self.model is not None
        return self.model if self.ema is None else self.ema.module

    @torch.no_grad()
    def validate(self, loss_module: LossModule) -> dict[str, float]:
        """Metrics on the validation cases (training loss on the train sample when there is no val split)."""
        model = self.eval_model
        if self.val_set is None:
            return {}
        if self.config.task == "pretrain":
            return {"val_loss": self._val_loss(loss_module)}
        return evaluate_cases(model, self.val_set, device=self.device, batch_size=self.config.batch_size)

    def _val_loss(self, loss_module: LossModule) -> float:
        assert self.val_set is not None
        loader = DataLoader(self.val_set, batch_size=self.config.batch_size, shuffle=False)
        was_training = loss_module.training
        loss_module.eval()
        total, n = 0.0, 0
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed + VAL_LOSS_SEED_OFFSET)
            for batch in loader:
                x, y = batch["image"].to(self.device), batch["label"].to(self.device)
                total += float(loss_module(x, y)) * len(x)
                n += len(x)
        loss_module.train(was_training)
        return total / max(n, 1)


def read_events(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The events logged in a run folder's ``events.jsonl``."""
    path = Path(out_dir) / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
