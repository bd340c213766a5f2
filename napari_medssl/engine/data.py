"""Data sources: folders and arrays → a list of :class:`Case` (one image, its label, its group).

A source only lists cases and loads them on demand; :mod:`napari_medssl.engine.samples` turns cases into
training samples (slices, crops, resized images). Supported:

- :class:`MSDFolder` — Medical Segmentation Decathlon layout (``imagesTr/``, ``labelsTr/`` NIfTI).
- :class:`MiasFolder` — the mini-MIAS layout (PNG + ``labels.csv``): normal (NORM) vs abnormal; a woman's two
  images (``mdb(2k-1)``, ``mdb(2k)``) share a group, so a split never separates them.
- :class:`ImageFolder` — PNG/TIFF files with a ``labels.csv`` (``image,label``) or a ``masks/`` folder.
- :class:`DicomFolder` — every DICOM series under a folder (for pretraining, or with mask series).
- :class:`MedMNIST` — a MedMNIST ``.npz`` with its official train/val/test split.
- :class:`ArrayData` — in-memory arrays (the viewer's layers): images with label masks or class ints.

:func:`open_data` picks the source for a path. Images load as ``(C, *spatial)`` (C = 1 for gray, 3 for RGB);
segmentation labels as ``(*spatial)`` integers, class labels as ints.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_medssl.engine import readers

Label = np.ndarray | int | None


@dataclass
class Case:
    """One image of a data set.

    Attributes:
        id: unique within its source (file stem, ``"train/17"`` ...).
        group: cases of one group (patient, woman) always land in the same split.
        loader: returns ``(image (C, *spatial), label)`` with label a mask, a class int or ``None``.
        spatial_dims: 2 (``Y X``) or 3 (``Z Y X``) of the image.
        class_label: the class when known without loading (classification; used to stratify splits).
        path: the file or folder it comes from, when there is one.
    """

    id: str
    group: str
    loader: Callable[[], tuple[np.ndarray, Label]]
    spatial_dims: int
    class_label: int | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[np.ndarray, Label]:
        """Read the image ``(C, *spatial)`` and its label."""
        return self.loader()


class DataSource:
    """Base class: a named list of cases and what their labels mean.

    Attributes:
        task: ``"segment"``, ``"classify"`` or ``None`` (images only).
        class_names: names of the classes (index = class value) when known.
        official_split: ``{"train": [ids], "val": [ids]}`` when the data set defines one.
        description: a short human-readable name, recorded in run configs.
    """

    task: str | None = None
    class_names: list[str] | None = None
    official_split: dict[str, list[str]] | None = None
    description: str = "data"

    def cases(self) -> list[Case]:
        """All cases, in a fixed order."""
        raise NotImplementedError

    def num_classes(self) -> int:
        """Number of classes including background (segmentation) or all classes (classification)."""
        if self.class_names:
            return len(self.class_names)
        if self.task == "classify":
            labels = [c.class_label if c.class_label is not None else c.load()[1] for c in self.cases()]
            return int(max(int(v) for v in labels)) + 1
        if self.task == "segment":
            return int(max(int(np.max(c.load()[1])) for c in self.cases())) + 1
        return 0


def _channels_first(img: np.ndarray, spatial_dims: int) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == spatial_dims:
        return img[None]
    if img.ndim == spatial_dims + 1 and img.shape[-1] in (3, 4):
        return np.moveaxis(img[..., :3], -1, 0)
    raise ValueError(f"expected a {spatial_dims}D image (optionally RGB), got shape {img.shape}")


def _image_dims(arr: np.ndarray) -> int:
    """2 for ``(Y, X)`` / ``(Y, X, 3)``, 3 for ``(Z, Y, X)``."""
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] > 4):
        return 2
    if arr.ndim == 3:
        return 3
    raise ValueError(f"expected a 2D image or 3D volume, got shape {arr.shape}")


class MSDFolder(DataSource):
    """Medical Segmentation Decathlon layout: ``imagesTr/*.nii.gz`` with same-named ``labelsTr/*.nii.gz``.

    Args:
        root: the task folder (holding ``imagesTr``; ``dataset.json`` is read for label names when present).
        images: the image subfolder (``"imagesTr"``; ``"imagesTs"`` for unlabelled test images).
        labels: the label subfolder, or ``None`` to ignore labels.
    """

    task = "segment"

    def __init__(
        self, root: str | os.PathLike, images: str = "imagesTr", labels: str | None = "labelsTr"
    ) -> None:
        self.root = Path(root)
        self.image_dir = self.root / images
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.root} is not an MSD-layout folder: no {images}/ subfolder")
        self.label_dir = self.root / labels if labels else None
        if self.label_dir is not None and not self.label_dir.is_dir():
            self.label_dir = None
        if self.label_dir is None:
            self.task = None
        self.description = f"msd:{self.root.absolute()}"
        self.class_names = self._label_names()
        self._cases: list[Case] | None = None

    def _label_names(self) -> list[str] | None:
        meta = self.root / "dataset.json"
        if not meta.is_file():
            return None
        labels = json.loads(meta.read_text()).get("labels")
        if not isinstance(labels, dict):
            return None
        try:
            by_value = {int(k): str(v) for k, v in labels.items()}
        except ValueError:  # newer MSD style: {"name": value}
            by_value = {int(v): str(k) for k, v in labels.items()}
        return [by_value.get(i, str(i)) for i in range(max(by_value) + 1)]

    def cases(self) -> list[Case]:
        if self._cases is None:
            files = sorted(
                p
                for p in self.image_dir.iterdir()
                if readers.is_nifti(p) and not p.name.startswith((".", "_"))
            )
            if not files:
                raise ValueError(f"no NIfTI images in {self.image_dir}")
            self._cases = [self._case(p) for p in files]
        return self._cases

    def _case(self, image_path: Path) -> Case:
        stem = image_path.name.split(".nii")[0]
        label_path = None
        if self.label_dir is not None:
            label_path = self.label_dir / image_path.name
            if not label_path.is_file():
                raise FileNotFoundError(f"{image_path.name} has no label file {label_path}")

        def load() -> tuple[np.ndarray, Label]:
            img = readers.read_nifti(image_path).data
            dims = _image_dims(img)
            lab = None if label_path is None else readers.read_nifti(label_path).data.astype(np.int64)
            return _channels_first(img, dims), lab

        return Case(stem, stem, load, 3, path=str(image_path))


def mias_woman(image_id: str) -> str:
    """The woman a mini-MIAS image belongs to: ``mdb001``/``mdb002`` → ``"woman001"`` (pairs 2k-1, 2k)."""
    m = re.search(r"(\d+)", image_id)
    if not m:
        raise ValueError(f"cannot read an image number from mini-MIAS id {image_id!r} (expected mdbNNN)")
    return f"woman{(int(m.group(1)) + 1) // 2:03d}"


class MiasFolder(DataSource):
    """The mini-MIAS folder: ``mdbNNN.png`` + ``labels.csv`` (``image,tissue,abnormality,severity,...``).

    An image is abnormal (class 1) when any of its rows has an abnormality other than ``NORM``.
    """

    task = "classify"
    class_names = ["normal", "abnormal"]

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        csv_path = self.root / "labels.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a mini-MIAS folder: no labels.csv")
        self.description = f"mias:{self.root.absolute()}"
        abnormal: dict[str, bool] = {}
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"image", "abnormality"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{csv_path}: missing columns {sorted(missing)} (mini-MIAS labels.csv)")
            for row in reader:
                name = row["image"].strip()
                abnormal[name] = abnormal.get(name, False) or row["abnormality"].strip().upper() != "NORM"
        self.labels = abnormal

    def cases(self) -> list[Case]:
        out = []
        for name in sorted(self.labels):
            path = self.root / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in labels.csv but missing")
            label = int(self.labels[name])
            out.append(
                Case(Path(name).stem, mias_woman(name), _image_loader(path, label), 2, label, str(path))
            )
        return out


def _image_loader(path: Path, label: Label) -> Callable[[], tuple[np.ndarray, Label]]:
    def load() -> tuple[np.ndarray, Label]:
        return _channels_first(readers.read_image(path).data, 2), label

    return load


class ImageFolder(DataSource):
    """PNG/TIFF images with labels: a CSV (``image,label[,group]``) for classes, or ``masks/`` for masks.

    Args:
        root: folder with the images.
        labels_csv: CSV file name inside ``root`` (columns ``image`` and ``label``; ``group`` optional).
        masks: subfolder holding same-named label images (segmentation).
    """

    def __init__(self, root: str | os.PathLike, labels_csv: str = "labels.csv", masks: str = "masks") -> None:
        self.root = Path(root)
        self.description = f"images:{self.root.absolute()}"
        self.files = sorted(p for p in self.root.iterdir() if p.is_file() and readers.is_image(p))
        if not self.files:
            raise ValueError(f"no PNG/TIFF images in {self.root}")
        self.mask_dir = self.root / masks if (self.root / masks).is_dir() else None
        self.table: dict[str, tuple[str, str]] = {}
        csv_path = self.root / labels_csv
        if self.mask_dir is not None:
            self.task = "segment"
        elif csv_path.is_file():
            self.task = "classify"
            self._read_csv(csv_path)

    def _read_csv(self, csv_path: Path) -> None:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"image", "label"} <= cols:
                raise ValueError(f"{csv_path}: needs columns 'image' and 'label', found {sorted(cols)}")
            for row in reader:
                self.table[row["image"].strip()] = (row["label"].strip(), (row.get("group") or "").strip())
        values = sorted({v for v, _ in self.table.values()})
        if all(v.lstrip("-").isdigit() for v in values):
            n = max(int(v) for v in values) + 1
            self.class_names = [str(i) for i in range(n)]
            self._class_of = {v: int(v) for v in values}
        else:
            self.class_names = values
            self._class_of = {v: i for i, v in enumerate(values)}

    def cases(self) -> list[Case]:
        out = []
        for p in self.files:
            if self.task == "classify":
                if p.name not in self.table:
                    continue
                value, group = self.table[p.name]
                label = self._class_of[value]
                out.append(Case(p.stem, group or p.stem, _image_loader(p, label), 2, label, str(p)))
            elif self.task == "segment":
                mask = self.mask_dir / p.name
                if not mask.is_file():
                    raise FileNotFoundError(f"{p.name} has no mask {mask}")
                out.append(Case(p.stem, p.stem, _mask_loader(p, mask), 2, path=str(p)))
            else:
                out.append(Case(p.stem, p.stem, _image_loader(p, None), 2, path=str(p)))
        if not out:
            raise ValueError(f"{self.root}: none of the images is listed in the labels CSV")
        return out


def _mask_loader(image: Path, mask: Path) -> Callable[[], tuple[np.ndarray, Label]]:
    def load() -> tuple[np.ndarray, Label]:
        m = readers.read_image(mask).data
        return _channels_first(readers.read_image(image).data, 2), np.asarray(m).astype(np.int64)

    return load


class DicomFolder(DataSource):
    """Every DICOM series under ``root`` (one case per series folder; images only, for pretraining)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.description = f"dicom:{self.root.absolute()}"
        self.folders = readers.dicom_leaf_folders(self.root)

    def cases(self) -> list[Case]:
        out = []
        for folder in self.folders:
            if "mask" in folder.name.lower():
                continue

            def load(folder: Path = folder) -> tuple[np.ndarray, Label]:
                vols = readers.read_dicom_images(folder)
                if not vols:
                    raise ValueError(f"{folder}: no DICOM image series (only segmentation-like series)")
                vol = vols[0].data
                return _channels_first(vol, _image_dims(vol)), None

            rel = folder.relative_to(self.root).as_posix()
            out.append(Case(rel, folder.parent.as_posix(), load, 3, path=str(folder)))
        return out


class MedMNIST(DataSource):
    """A MedMNIST ``.npz`` (``train_images``, ``train_labels``, ``val_*``, ``test_*``) with its official split.

    Args:
        path: the ``.npz`` file.
        splits: which of its splits to list (the training run uses ``train`` for training and ``val`` for
            validation; ``test`` stays untouched unless asked for).
    """

    task = "classify"

    def __init__(self, path: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"MedMNIST file not found: {self.path}")
        self.description = f"medmnist:{self.path.absolute()}"
        with np.load(self.path) as npz:
            self.arrays = {k: npz[k] for k in npz.files}
        for s in splits:
            if f"{s}_images" not in self.arrays:
                raise ValueError(f"{self.path}: no {s}_images array; has {sorted(self.arrays)}")
        labels = self.arrays[f"{splits[0]}_labels"]
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise ValueError(f"{self.path}: multi-label MedMNIST ({labels.shape[1]} labels) is not supported")
        self.splits = tuple(splits)
        n = int(max(self.arrays[f"{s}_labels"].max() for s in self.splits)) + 1
        self.class_names = [str(i) for i in range(n)]
        self.official_split = {
            s: [f"{s}/{i}" for i in range(len(self.arrays[f"{s}_images"]))] for s in splits
        }

    def cases(self) -> list[Case]:
        out = []
        for s in self.splits:
            images, labels = self.arrays[f"{s}_images"], self.arrays[f"{s}_labels"].reshape(-1)
            for i in range(len(images)):

                def load(img: np.ndarray = images[i], lab: int = int(labels[i])) -> tuple[np.ndarray, Label]:
                    return _channels_first(img, 2), lab

                out.append(Case(f"{s}/{i}", f"{s}/{i}", load, 2, int(labels[i])))
        return out


class ArrayData(DataSource):
    """In-memory images (the viewer's layers) with masks, class ints or nothing.

    Args:
        images: ``(Y, X)``, ``(Y, X, 3)`` or ``(Z, Y, X)`` arrays.
        labels: one mask per image (same spatial shape), one class int per image, or ``None``.
        class_names: names of the classes.
        ids: case ids (default ``"0"``, ``"1"`` ...).
        groups: split groups (default: one per image).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        labels: Sequence[np.ndarray | int] | None = None,
        class_names: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> None:
        if len(images) == 0:
            raise ValueError("ArrayData needs at least one image")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = [np.asarray(im) for im in images]
        self.labels = None if labels is None else list(labels)
        self.ids = [str(i) for i in (ids or range(len(images)))]
        self.groups = [str(g) for g in (groups or self.ids)]
        self.class_names = list(class_names) if class_names else None
        self.description = f"arrays:{len(images)}"
        if self.labels is not None:
            is_mask = [np.ndim(lab) > 0 for lab in self.labels]
            if all(is_mask):
                self.task = "segment"
                for im, lab in zip(self.images, self.labels):
                    dims = _image_dims(im)
                    if tuple(np.shape(lab)) != tuple(im.shape[:dims] if dims == 2 else im.shape):
                        raise ValueError(f"label shape {np.shape(lab)} does not match image shape {im.shape}")
            elif not any(is_mask):
                self.task = "classify"
            else:
                raise ValueError("labels must be all masks or all class ints, not a mix")

    def cases(self) -> list[Case]:
        out = []
        for i, im in enumerate(self.images):
            dims = _image_dims(im)
            lab = None if self.labels is None else self.labels[i]
            cls = int(lab) if self.task == "classify" else None

            def load(im: np.ndarray = im, lab: Any = lab, dims: int = dims) -> tuple[np.ndarray, Label]:
                if lab is not None and np.ndim(lab) > 0:
                    lab = np.asarray(lab).astype(np.int64)
                elif lab is not None:
                    lab = int(lab)
                return _channels_first(im, dims), lab

            out.append(Case(self.ids[i], self.groups[i], load, dims, cls))
        return out


class ConcatData(DataSource):
    """Several sources as one (ids prefixed by the source's position); for pretraining on mixed data."""

    def __init__(self, sources: Sequence[DataSource]) -> None:
        self.sources = list(sources)
        tasks = {s.task for s in self.sources}
        self.task = tasks.pop() if len(tasks) == 1 else None
        names = {tuple(s.class_names) if s.class_names else None for s in self.sources}
        self.class_names = list(names.pop() or []) or None if len(names) == 1 else None
        self.description = "+".join(s.description for s in self.sources)

    def cases(self) -> list[Case]:
        out = []
        for k, src in enumerate(self.sources):
            for c in src.cases():
                out.append(
                    Case(
                        f"{k}:{c.id}",
                        f"{k}:{c.group}",
                        c.loader,
                        c.spatial_dims,
                        c.class_label,
                        c.path,
                        c.meta,
                    )
                )
        return out


def open_data(spec: Any) -> DataSource:
    """The data source for a path, a list of paths, or a source object.

    Folders: ``imagesTr/`` → :class:`MSDFolder`; ``labels.csv`` with an ``abnormality`` column →
    :class:`MiasFolder`; PNG/TIFF files → :class:`ImageFolder`; ``.dcm`` files → :class:`DicomFolder`.
    Files: ``.npz`` → :class:`MedMNIST`.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a folder or file in none of these layouts.
    """
    if isinstance(spec, DataSource):
        return spec
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError("no data given")
        sources = [open_data(s) for s in spec]
        return sources[0] if len(sources) == 1 else ConcatData(sources)
    if spec is None:
        raise ValueError("no data given: pass a folder (MSD, mini-MIAS, PNG/TIFF, DICOM) or a MedMNIST .npz")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return MedMNIST(path)
        raise ValueError(f"{path}: a data file must be a MedMNIST .npz; pass folders for other layouts")
    if (path / "imagesTr").is_dir():
        return MSDFolder(path)
    csv_path = path / "labels.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if "abnormality" in header:
            return MiasFolder(path)
    if any(readers.is_image(p) for p in path.iterdir() if p.is_file()):
        return ImageFolder(path)
    if next(path.rglob("*.dcm"), None) is not None:
        return DicomFolder(path)
    raise ValueError(
        f"{path}: not a known data layout (MSD imagesTr/labelsTr, mini-MIAS labels.csv, PNG/TIFF images with "
        "labels.csv or masks/, a DICOM folder, or a MedMNIST .npz)"
    )
