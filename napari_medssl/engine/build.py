"""Models for training: built from a checkpoint, a run folder, a zoo name or a registered architecture.

``NAME|CKPT`` arguments resolve as :func:`napari_medssl.resolve.resolve` says: an existing ``.safetensors``
file, a run folder, a model of the zoo, a registered architecture (``unet_tiny``), built fresh. Fine-tuning from a
checkpoint keeps every weight whose name and shape fit the new model (a new classification or segmentation
head of another size starts fresh) and reports what it left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from napari_medssl.models.registry import create_model, read_checkpoint
from napari_medssl.resolve import resolve


def resolve_checkpoint(spec: str) -> Path | None:
    """The checkpoint file ``spec`` names (a path, a run folder or a zoo name), or ``None`` for a registered
    architecture (see :func:`napari_medssl.resolve.resolve`, whose errors it raises)."""
    return resolve(spec, architectures=True).path


def build_model(
    spec: str,
    task: str,
    num_classes: int = 0,
    in_chans: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model for ``task``, from a checkpoint, a zoo name or a registered name.

    Args:
        spec: checkpoint path, zoo name or registered architecture name.
        task: ``"pretrain"``, ``"classify"`` or ``"segment"``.
        num_classes: head size for classify/segment (0 keeps the checkpoint's or the builder's default).
        in_chans: input channels for a fresh model (checkpoints keep theirs; data are adapted instead).
        overrides: more ``create_model`` keyword arguments.

    Returns:
        ``(model, info)`` with ``info`` = ``{"source", "name", "loaded", "skipped", "extra"}``.

    Raises:
        ValueError: the model does not do ``task`` or no checkpoint weights fit it.
    """
    overrides = dict(overrides or {})
    ckpt = resolve_checkpoint(spec)
    info: dict[str, Any] = {"source": str(ckpt) if ckpt else "fresh", "loaded": 0, "skipped": [], "extra": {}}
    if ckpt is None:
        name, kwargs = str(spec), overrides
        if in_chans is not None:
            kwargs.setdefault("in_chans", in_chans)
        state = None
    else:
        state, config, info["extra"] = read_checkpoint(ckpt)
        if "name" not in config:
            raise ValueError(
                f"{ckpt}: no model config in the checkpoint metadata; cannot tell which model it is"
            )
        name = config.pop("name")
        kwargs = {**config, **overrides}
    from napari_medssl.models import ensemble

    if name == ensemble.NAME:
        raise ValueError(ensemble.NOT_TRAINED)
    if task != "pretrain" and num_classes:
        kwargs["num_classes"] = num_classes
    try:
        model = create_model(name, **kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {name} with {kwargs}: {err}") from None
    info["name"] = name
    if state is not None:
        own = model.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not fits:
            raise ValueError(
                f"none of the weights in {ckpt} fit {name} ({len(state)} tensors, none matching)"
            )
        model.load_state_dict(fits, strict=False)
        info["loaded"] = len(fits)
        info["skipped"] = sorted(k for k in own if k not in fits)
    check_task(model, task, name)
    return model, info


def check_task(model: nn.Module, task: str, name: str = "model") -> None:
    """Raise ``ValueError`` when ``model`` cannot be trained for ``task``."""
    if task == "pretrain":
        if not callable(getattr(model, "pretrain_loss", None)):
            raise ValueError(
                f"{name} has no pretrain_loss (self-supervised objective); it cannot be pretrained"
            )
        return
    actual = model.spec.task
    if actual != task:
        raise ValueError(
            f"{name} is a {actual!r} model, not {task!r}; pick a {task} model or give num_classes for a new head"
        )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels, none on biases, norms, tokens and position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(t in name for t in ("pos_embed", "cls_token", "mask_token", "token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
