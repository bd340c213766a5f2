"""Painted annotations as training samples, and the fine-tuning generator the viewer's training process runs.

:func:`segmentation_samples` turns a painted Labels array (0 = unlabelled, ``k + 1`` = class ``k``) into cases
(one per painted slice for a 2D model), :func:`classification_samples` turns boxes and points named by class
into crops; :func:`finetune_events` trains on such in-memory arrays with the engine and yields its events (the
target :class:`~napari_medssl.finetune_process.TrainingProcess` runs in a child process). No Qt, no napari.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["UNLABELLED", "classification_samples", "finetune_events", "segmentation_samples"]

UNLABELLED = -1  # class index of unpainted voxels in the arrays sent to the engine (its ignore_index)


def finetune_events(
    images: list[Any],
    labels: list[Any],
    config: dict[str, Any],
    class_names: list[str] | None = None,
    ids: list[str] | None = None,
    groups: list[str] | None = None,
    validate_on_train: bool = False,
) -> Iterator[dict]:
    """The fine-tuning generator the child process runs: in-memory arrays → ``engine.train`` events.

    Args:
        images: ``(Y, X)``/``(Z, Y, X)`` arrays (see :func:`segmentation_samples`, :func:`classification_samples`).
        labels: one mask or class int per image.
        config: :class:`~napari_medssl.engine.config.TrainConfig` fields except ``data``.
        class_names: names of the classes.
        ids: case ids.
        groups: split groups.
        validate_on_train: validate on the training cases themselves (too few annotations to hold any
            out); the curve then shows how well the model fits the annotations.
    """
    import json

    from napari_medssl.engine import ArrayData, TrainConfig, train

    data = ArrayData(images, labels, class_names=class_names, ids=ids, groups=groups)
    config = {**config, "data": data}
    if validate_on_train:
        every = [c.id for c in data.cases()]
        split = Path(config.get("out_dir", ".")) / "annotations_split.json"
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text(json.dumps({"train": every, "val": every}))
        config["split_file"] = str(split)
    yield from train(TrainConfig(**config))


def segmentation_samples(
    image: Any, painted: Any, model_dims: int, slice_axis: int = 0, rgb: bool = False
) -> dict[str, Any]:
    """Training cases from a painted Labels array (0 = unlabelled, value ``k + 1`` = class ``k``).

    Labels are shifted to class indices, unlabelled voxels becoming :data:`UNLABELLED` (pass it to the
    engine as ``ignore_index``), so the model's class names carry over to the fine-tuned checkpoint. A 2D model on a volume gets one case per slice that holds paint (each its own split group, so
    validation holds out whole slices); a 3D model gets the whole volume; a 2D image is one case.

    Args:
        image: ``(Y, X)``, ``(Y, X, 3)`` or ``(Z, Y, X)``.
        painted: the painted labels, the image's spatial shape.
        model_dims: the model's ``spatial_dims``.
        slice_axis: the axis a 2D model slices a volume along.
        rgb: the image has a trailing colour axis.

    Returns:
        ``images``, ``labels`` (class indices, :data:`UNLABELLED` where unpainted), ``ids`` (lists),
        ``ignore_index`` (:data:`UNLABELLED`) and ``classes`` (the class indices painted).

    Raises:
        ValueError: shapes differ or nothing is painted.
    """
    import numpy as np

    image = np.asarray(image)
    painted = np.asarray(painted)
    spatial = image.shape[:-1] if rgb else image.shape
    if tuple(painted.shape) != tuple(spatial):
        raise ValueError(
            f"the labels layer's shape {painted.shape} differs from the image's {tuple(spatial)}"
        )
    if painted.size and int(painted.min()) < 0:
        raise ValueError("painted labels must be non-negative (0 = unlabelled)")
    classes = sorted(int(v) - 1 for v in np.unique(painted) if v > 0)
    if not classes:
        raise ValueError("nothing is painted: paint some pixels (value 1 = first class) in the labels layer")
    out: dict[str, Any] = {"classes": classes, "ignore_index": UNLABELLED}
    if len(spatial) == 3 and model_dims == 2:
        moved_img = np.moveaxis(image, slice_axis, 0)
        moved_lab = np.moveaxis(painted, slice_axis, 0)
        keep = [z for z in range(moved_lab.shape[0]) if moved_lab[z].any()]
        out["images"] = [np.ascontiguousarray(moved_img[z]) for z in keep]
        out["labels"] = [moved_lab[z].astype(np.int64) - 1 for z in keep]
        out["ids"] = [f"slice{z}" for z in keep]
    else:
        if model_dims == 3 and len(spatial) != 3:
            raise ValueError("a 3D model needs a volume; this image is 2D")
        out["images"] = [image]
        out["labels"] = [painted.astype(np.int64) - 1]
        out["ids"] = ["image"]
    return out


def classification_samples(
    image: Any,
    items: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    class_names: list[str] | None = None,
    rgb: bool = False,
) -> dict[str, Any]:
    """Training cases from boxes or points named by class (Shapes/Points layers).

    Args:
        image: ``(Y, X)`` (optionally RGB) or ``(Z, Y, X)``.
        items: ``(class name, low corner, high corner)`` in the image's index space, one per box; a point
            is given as a box around it. The crop is ``image[low:high]`` (a 3D box one slice thick is a 2D crop).
        class_names: the model's class names; names not in it are refused. ``None``: the sorted names found.
        rgb: the image has a trailing colour axis.

    Returns:
        ``images`` (crops), ``labels`` (class ints), ``ids``, ``class_names``.

    Raises:
        ValueError: no items, an unknown class, an empty crop, or fewer than 2 classes without known names.
    """
    import numpy as np

    image = np.asarray(image)
    if not items:
        raise ValueError("no boxes or points: draw shapes or points and name them by class")
    names = list(class_names) if class_names else sorted({name for name, _, _ in items})
    if not class_names and len(names) < 2:
        raise ValueError(f"only one class ({names[0]!r}) is annotated; classification needs at least two")
    spatial = image.shape[:-1] if rgb else image.shape
    crops, labels, ids = [], [], []
    for i, (name, low, high) in enumerate(items):
        if name not in names:
            raise ValueError(f"class {name!r} is not one of the model's classes {names}")
        lo = [max(0, int(a)) for a in low]
        hi = [min(int(b), s) for b, s in zip(high, spatial)]
        if any(b <= a for a, b in zip(lo, hi)):
            raise ValueError(f"annotation {i} ({name}) lies outside the image")
        crop = image[tuple(slice(a, b) for a, b in zip(lo, hi))]
        crop = np.squeeze(crop, axis=tuple(ax for ax in range(len(spatial)) if crop.shape[ax] == 1))
        if crop.ndim - (1 if rgb else 0) != 2:
            raise ValueError(f"annotation {i} ({name}) is not a 2D box (shape {crop.shape})")
        crops.append(np.ascontiguousarray(crop))
        labels.append(names.index(name))
        ids.append(f"{name}{i}")
    return {"images": crops, "labels": labels, "ids": ids, "class_names": names}
