"""Deterministic train/validation splits by group, saved as ``split.json`` in the run folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from napari_medssl.engine.data import Case, DataSource


def make_split(
    cases: list[Case], val_fraction: float, seed: int, stratify: bool = True
) -> dict[str, list[str]]:
    """Split case ids into ``train`` and ``val`` so that no group is divided.

    Groups are shuffled with ``numpy.random.default_rng(seed)``; with ``stratify`` and class labels, each class
    of groups (a group's class is the largest class among its cases: a woman with one abnormal mammogram is
    abnormal) gives ``ceil(val_fraction · n)`` groups to validation, so both splits see every class.

    Returns:
        ``{"train": [ids], "val": [ids]}`` in the cases' order.
    """
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    if val_fraction <= 0 or len(names) < 2:
        val_groups: set[str] = set()
    else:
        strata: dict[int, list[str]] = {}
        for g in names:
            labels = [c.class_label for c in groups[g] if c.class_label is not None]
            strata.setdefault(max(labels) if (stratify and labels) else -1, []).append(g)
        val_groups = set()
        for key in sorted(strata):
            members = [strata[key][i] for i in rng.permutation(len(strata[key]))]
            n_val = min(len(members) - 1, math.ceil(val_fraction * len(members)))
            val_groups.update(members[:n_val])
    return {
        "train": [c.id for c in cases if c.group not in val_groups],
        "val": [c.id for c in cases if c.group in val_groups],
    }


def split_for(source: DataSource, cases: list[Case], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """The official split when the source has one (MedMNIST: ``train``/``val``), else :func:`make_split`."""
    if source.official_split and "train" in source.official_split:
        known = {c.id for c in cases}
        return {k: [i for i in source.official_split.get(k, []) if i in known] for k in ("train", "val")}
    return make_split(cases, val_fraction, seed)


def save_split(split: dict[str, list[str]], path: str | os.PathLike, **facts: object) -> Path:
    """Write ``split.json`` (the ids plus facts such as seed, fraction and data) atomically."""
    from napari_medssl._atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps({**facts, "train": split["train"], "val": split["val"]}, indent=1))
    return path


def load_split(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a ``split.json``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a split file (needs ``train`` and ``val`` lists).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    d = json.loads(path.read_text())
    if not isinstance(d, dict) or not isinstance(d.get("train"), list) or not isinstance(d.get("val"), list):
        raise ValueError(f"{path} is not a split file (needs 'train' and 'val' lists of case ids)")
    return {"train": [str(i) for i in d["train"]], "val": [str(i) for i in d["val"]]}


def select(cases: list[Case], ids: list[str], what: str = "split") -> list[Case]:
    """The cases whose ids are in ``ids`` (in the cases' order).

    Raises:
        ValueError: an id names no case (a split from other data).
    """
    by_id = {c.id: c for c in cases}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(
            f"{what} names {len(missing)} case(s) not in the data, e.g. {missing[:3]}; wrong data folder?"
        )
    wanted = set(ids)
    return [c for c in cases if c.id in wanted]
