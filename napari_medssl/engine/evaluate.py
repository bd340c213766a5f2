"""Evaluation: a model on a data set (all of it, or the validation split saved with its training run).

Segmentation: each case is segmented whole through :mod:`napari_medssl.inference` (2D models slice by slice,
3D models by sliding window), and Dice/IoU are computed per case on the full image or volume, then averaged
(see :mod:`napari_medssl.engine.metrics`). Classification: each image (resized as in training) is classified
and ``accuracy``, ``balanced_accuracy`` and ``auc`` are computed over all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from napari_medssl import mammo
from napari_medssl.engine.augment import IGNORE
from napari_medssl.engine.metrics import classification_metrics, dice_iou_case, segmentation_metrics
from napari_medssl.engine.samples import SampleSet
from napari_medssl.inference import (
    classify_batch,
    model_window,
    pick_device,
    segment_prepared,
    training_flip_axes,
)

Progress = Callable[[int, int], Any] | None


def evaluate_cases(
    model: nn.Module,
    samples: SampleSet,
    device: torch.device | None = None,
    batch_size: int = 8,
    progress: Progress = None,
    mirror: tuple[int, ...] = (),
) -> dict[str, float]:
    """Metrics of ``model`` on the cases of a :class:`SampleSet` (its size is used for classification);
    ``mirror``: axes for mirroring test-time augmentation of segmenters (see :mod:`napari_medssl.inference`)."""
    device = device or next(model.parameters()).device
    task = model.spec.task
    if task == "segment":
        k = int(model.num_classes)
        per_case = []
        for ci, case in enumerate(samples.cases):
            img, lab = samples._get(ci)
            if lab is None or np.ndim(lab) == 0:
                raise ValueError(f"case {case.id} has no label mask to score a segmentation against")
            probs = segment_prepared(
                model, torch.from_numpy(img), device, samples.slice_axis, batch_size, mirror=mirror
            )
            pred = probs.argmax(0).numpy()
            per_case.append(dice_iou_case(pred, lab, k, ignore=lab == IGNORE))
            if progress is not None:
                progress(ci + 1, len(samples.cases))
        return segmentation_metrics(per_case)
    if task == "classify":
        probs, targets = [], []
        n = len(samples)
        for i in range(0, n, batch_size):
            items = [samples[j] for j in range(i, min(n, i + batch_size))]
            x = torch.stack([it["image"] for it in items])
            probs.append(classify_batch(model, x, device, batch_size))
            targets += [int(it["label"]) for it in items]
            if progress is not None:
                progress(min(n, i + batch_size), n)
        return classification_metrics(np.concatenate(probs), np.array(targets))
    raise ValueError(f"cannot evaluate a {task!r} model; evaluate fine-tuned classify or segment models")


def split_ids(model: nn.Module, checkpoint: str | os.PathLike | None) -> list[str]:
    """The validation ids saved with a checkpoint (its metadata, else the run folder's ``split.json``).

    Raises:
        ValueError: the checkpoint records no split.
    """
    if model.spec.split_val:
        return list(model.spec.split_val)
    if checkpoint is not None:
        run_split = Path(checkpoint).parent / "split.json"
        if run_split.is_file():
            return [str(i) for i in json.loads(run_split.read_text())["val"]]
    raise ValueError("the checkpoint records no validation split; use --split all")


def evaluate(
    model_spec: str | nn.Module,
    data: Any,
    split: str = "all",
    device: str = "auto",
    batch_size: int = 8,
    progress: Progress = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Evaluate a model (checkpoint path, zoo name or loaded model) on a data folder.

    Args:
        model_spec: ``.safetensors`` path, zoo name or a model (from :func:`napari_medssl.zoo.load`).
        data: a data folder/file or source (see :func:`napari_medssl.engine.data.open_data`).
        split: ``"all"`` cases, or ``"val"``: the validation split saved with the model's training run.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``.
        batch_size: slices/windows/images per forward pass.
        progress: ``progress(done, total)`` per case (segmentation) or batch (classification).
        tta: segmenters only: mirroring test-time augmentation along the axes the model's training run flipped
            (:func:`~napari_medssl.inference.training_flip_axes`).

    Returns:
        ``{"metrics": {...}, "task", "split", "n_cases", "label_names", "model", "data", "mirror"}``.
    """
    from napari_medssl import zoo
    from napari_medssl.engine.data import open_data
    from napari_medssl.engine.split import select

    if split not in ("all", "val"):
        raise ValueError(f"split must be 'all' or 'val', got {split!r}")
    dev = pick_device(device)
    checkpoint = None
    if isinstance(model_spec, nn.Module):
        model = model_spec.to(dev)
    else:
        model = zoo.load(model_spec, device=str(dev))
        checkpoint = model.spec.weights_path
    if mammo.pipeline_of(model) is not None:  # a full-resolution mammography patch classifier
        return _evaluate_mammo(model, data, split, checkpoint, batch_size, progress)
    source = open_data(data)
    cases = source.cases()
    if split == "val":
        cases = select(cases, split_ids(model, checkpoint), "the checkpoint's validation split")
    spec = model.spec
    # the training run's label conventions (ignore_index, label_map) describe its own data only
    same_data = spec.data == source.description
    train_cfg = spec.train_config if same_data else {}
    samples = SampleSet(
        cases,
        task=spec.task,
        model_dims=spec.spatial_dims,
        in_chans=spec.in_chans,
        slice_axis=spec.slice_axis,
        ignore_index=train_cfg.get("ignore_index"),
        label_map=train_cfg.get("label_map"),
        train=False,
    )
    size = model_window(model)
    if size is None:
        size = tuple(max(s) for s in zip(*samples.spatial_shapes()))
    samples.set_size(size)
    mirror = training_flip_axes(model) if tta and spec.task == "segment" else ()
    metrics = evaluate_cases(model, samples, dev, batch_size, progress, mirror)
    names = list(spec.class_names) or source.class_names
    return {
        "metrics": metrics,
        "task": spec.task,
        "split": split,
        "n_cases": len(cases),
        "label_names": {str(i): n for i, n in enumerate(names)} if names else None,
        "model": str(checkpoint) if checkpoint else type(model).__name__,
        "data": source.description,
        "mirror": list(mirror),
    }


def _evaluate_mammo(
    model: nn.Module, data: Any, split: str, checkpoint: Any, batch_size: int, progress: Progress
) -> dict[str, Any]:
    """Sliding-window image-level evaluation of a mammography patch classifier (see :mod:`napari_medssl.mammo`)."""
    if not (Path(data) / "labels.csv").is_file():
        raise ValueError(f"{data}: a mammography model needs a mini-MIAS-format folder (images + labels.csv)")
    ids = None
    if split == "val":  # the folder's images the model was not trained on (its checkpoint lists those)
        seen = set(model.spec.extra.get("trained_on") or [])
        if not seen:
            raise ValueError("the checkpoint does not list the images it was trained on; use --split all")
        ids = [i for i in sorted(mammo.read_findings(Path(data) / "labels.csv")) if i not in seen]
        if not ids:
            raise ValueError(f"every image in {data} was used to train this model: nothing held out")
    res = mammo.evaluate_folder(model, data, batch_size, next(model.parameters()).device, progress, ids)
    names = list(model.spec.class_names) or ["normal", "abnormal"]
    return {
        "metrics": res["metrics"],
        "task": model.spec.task,
        "split": split,
        "n_cases": len(res["per_image"]),
        "label_names": {str(i): n for i, n in enumerate(names)},
        "model": str(checkpoint) if checkpoint else type(model).__name__,
        "data": str(Path(data).absolute()),
        "pipeline": res["pipeline"],
        "per_image": res["per_image"],
    }
