"""The model contract: one frozen :class:`ModelSpec` per model, at ``model.spec``.

Everything a caller needs to know about a model to run, evaluate, fine-tune or describe it (the idea of timm's
``pretrained_cfg``): its task, dimensionality, channels, classes, the input size it wants, the axes its training
flipped, the checkpoint's recorded facts and the zoo card. :func:`build_spec` is the one place that derives
these facts, from three sources, later ones adding to earlier ones:

1. the model's own attributes, set by its builder (``task``, ``spatial_dims``, ``in_chans``, ``num_classes``,
   ``input_size``, ``is_ensemble``, ``config``);
2. the checkpoint's ``extra`` metadata (``class_names``, ``sample_size``, ``slice_axis``, ``train_config`` ...,
   written by the training run);
3. the zoo card (``classes``, ``domain``).

:func:`attach_spec` sets ``model.spec`` (and, for old callers and saved-checkpoint round trips,
``model.checkpoint_extra`` and ``model.card``). ``create_model``, ``load_model`` and ``zoo.load`` call it, so
every model carries a spec; callers read ``model.spec.<field>``, never ``getattr(model, ..., default)``.

This module imports neither torch nor Qt.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

__all__ = ["ModelSpec", "attach_spec", "build_spec", "TASKS"]

TASKS = ("classify", "segment", "pretrain")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy (the caller's dict may change later; the spec must not)."""
    return MappingProxyType(copy.deepcopy(dict(mapping))) if mapping else _EMPTY


def _ints(values: Any) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """What a model is and how it was trained (read-only).

    Attributes:
        name: the registered architecture (``"unet_tiny"``), ``""`` when unknown.
        task: ``"classify"``, ``"segment"`` or ``"pretrain"`` (``None``: a bare backbone).
        spatial_dims: 2 or 3.
        in_chans: input channels.
        num_classes: head size (0 without a head).
        class_names: recorded class names (checkpoint, else card); ``()`` when none were recorded.
        input_size: the fixed spatial size the model needs (ViTs), ``None`` for any size.
        sample_size: the spatial size its training run sampled, ``None`` when not trained here.
        flip_axes: the spatial axes (negative, from the end) its training run flipped at random: the axes
            mirroring test-time augmentation may use; ``()`` when none (an ensemble: its members' union).
        slice_axis: the volume axis a 2D model was trained slice by slice along.
        label_values: the data's label value of each class (a run trained on remapped labels), or ``None``.
        is_ensemble: an ensemble of trained members (each run as it runs alone; not fine-tuned itself).
        domain: the card's ``domain:`` entry (what data the model fits), or ``None``.
        card: the zoo card, or ``None`` for a plain checkpoint or a fresh model.
        source: the zoo name or checkpoint path it was loaded from, ``None`` for a fresh model.
        weights_path: the weights file it was loaded from, ``None`` for a fresh model.
        weights_sha256: hex sha256 of that file, ``None`` for a fresh model.
        extra: the checkpoint's ``extra`` metadata as saved (read-only).
        train_config: the training run's config (read-only, empty when not recorded).
        split_val: the validation case ids of its training run, ``None`` when not recorded.
        data: the description of the data it was trained on, ``None`` when not recorded.
        teacher: the distillation teacher its training run used, ``None`` when none.
    """

    name: str = ""
    task: str | None = None
    spatial_dims: int = 2
    in_chans: int = 1
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    input_size: tuple[int, ...] | None = None
    sample_size: tuple[int, ...] | None = None
    flip_axes: tuple[int, ...] = ()
    slice_axis: int = 0
    label_values: tuple[int, ...] | None = None
    is_ensemble: bool = False
    domain: Mapping[str, Any] | None = None
    card: Mapping[str, Any] | None = None
    source: str | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    train_config: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    split_val: tuple[str, ...] | None = None
    data: str | None = None
    teacher: str | None = None

    @property
    def window(self) -> tuple[int, ...] | None:
        """The spatial size inference feeds the model: ``input_size``, else its training ``sample_size``."""
        return self.input_size if self.input_size is not None else self.sample_size

    @property
    def predicts(self) -> bool:
        """Whether the model has a supervised head (``classify`` or ``segment``)."""
        return self.task in ("classify", "segment")

    def names(self) -> list[str]:
        """The class names, or ``class 0 … K-1`` when none were recorded."""
        return list(self.class_names) or [f"class {i}" for i in range(self.num_classes)]

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)

    def __deepcopy__(self, memo: dict) -> ModelSpec:  # immutable: a model's deep copy (EMA) shares it
        return self

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:  # pickle the read-only mappings as dicts
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        return (
            _unpickle,
            ({k: dict(v) if k in _MAPPINGS and v is not None else v for k, v in state.items()},),
        )


_MAPPINGS = ("domain", "card", "extra", "train_config")


def _unpickle(state: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**{k: _frozen(v) if k in _MAPPINGS and v is not None else v for k, v in state.items()})


def _class_names(extra: Mapping[str, Any], card: Mapping[str, Any]) -> tuple[str, ...]:
    for names in (extra.get("class_names"), card.get("class_names"), card.get("classes")):
        if isinstance(names, list | tuple) and names:
            return tuple(str(n) for n in names)
        if isinstance(names, dict) and names:
            return tuple(str(names[k]) for k in sorted(names, key=lambda k: int(k)))
    return ()


def _flip_axes(model: Any, train_config: Mapping[str, Any], is_ensemble: bool) -> tuple[int, ...]:
    if is_ensemble:  # each member mirrors along its own axes (inference runs members one by one)
        return tuple(sorted({a for m in model.members for a in m.spec.flip_axes}))
    if not train_config or not train_config.get("augment", True):
        return ()
    return tuple(int(a) for a in train_config.get("flip_axes") or ())


def build_spec(
    model: Any,
    extra: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    source: str | None = None,
    weights_path: str | None = None,
    weights_sha256: str | None = None,
) -> ModelSpec:
    """The spec of ``model`` from its attributes, its checkpoint's ``extra`` metadata and its zoo ``card``.

    The only place that reads model attributes with defaults: every other module reads ``model.spec``.
    """
    extra = _frozen(extra)
    card_map = _frozen(card) if card is not None else None
    train_config = _frozen(extra.get("train_config") or {})
    is_ensemble = bool(getattr(model, "is_ensemble", False))
    config = getattr(model, "config", None) or {}
    domain = (card_map or {}).get("domain") or extra.get("domain")
    split_val = extra.get("split_val")
    sample_size = extra.get("sample_size")
    return ModelSpec(
        name=str(config.get("name", "")),
        task=getattr(model, "task", None),
        spatial_dims=int(getattr(model, "spatial_dims", 2)),
        in_chans=int(getattr(model, "in_chans", 1) or 1),
        num_classes=int(getattr(model, "num_classes", 0) or 0),
        class_names=_class_names(extra, card_map or {}),
        input_size=_ints(getattr(model, "input_size", None)),
        sample_size=_ints(sample_size),
        flip_axes=_flip_axes(model, train_config, is_ensemble),
        slice_axis=int(extra.get("slice_axis", 0) or 0),
        label_values=_ints(extra.get("label_values")),
        is_ensemble=is_ensemble,
        domain=_frozen(domain) if isinstance(domain, Mapping) else None,
        card=card_map,
        source=None if source is None else str(source),
        weights_path=None if weights_path is None else str(weights_path),
        weights_sha256=weights_sha256,
        extra=extra,
        train_config=train_config,
        split_val=None if not split_val else tuple(str(i) for i in split_val),
        data=extra.get("data"),
        teacher=train_config.get("teacher") or None,
    )


def attach_spec(model: Any, extra: Mapping[str, Any] | None = None, **facts: Any) -> Any:
    """Set ``model.spec`` (see :func:`build_spec` for ``facts``); return the model.

    Also sets ``model.checkpoint_extra`` (the metadata ``save_model`` writes back) and ``model.card``, which
    older code and saved-checkpoint round trips use.
    """
    model.checkpoint_extra = dict(extra or {})
    model.card = facts.get("card")
    model.spec = build_spec(model, model.checkpoint_extra, **facts)
    return model
