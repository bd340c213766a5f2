"""Segmentation ensembles: the mean of several trained segmenters' class probabilities, 2D and 3D mixed.

nnU-Net's habit: average the softmax outputs of differently built or differently trained models (its 2D and
3D U-Nets, its five folds). Members here are any trained ``segment`` models with the same classes and input
channels; each keeps what it was trained with (its ``spec``: sample size, slice axis, flipped axes), so :mod:`napari_medssl.inference` runs each the way it runs that model alone (2D members slice by slice,
3D members by sliding windows of their own size) and averages the probabilities
(:func:`napari_medssl.inference.segment_prepared`). :meth:`SegmentationEnsemble.forward` is the same average
for a batch of volumes (or images, with 2D members only) run whole.

An ensemble is built from checkpoints (:func:`from_checkpoints`, ``medssl ensemble``), saved and loaded like
any model (its config lists the members' configs and records); it is not trained or fine-tuned itself.

Axis legend: N batch, C channels, K classes, Z Y X space.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from napari_medssl.models.registry import create_model, register_model
from napari_medssl.models.spec import attach_spec

NAME = "ensemble_mean"  # the registered builder: checkpoints and cards name an ensemble by it
NOT_TRAINED = (
    "an ensemble segments but is not trained or fine-tuned itself: fine-tune one of its members (its card "
    "lists them), then rebuild the ensemble (medssl ensemble)"
)

# what each member keeps of its checkpoint's extra metadata: what inference needs to run it as trained
MEMBER_KEYS = ("sample_size", "slice_axis", "train_config", "class_names", "split_val", "data", "metrics")


class SegmentationEnsemble(nn.Module):
    """Average of member segmenters' softmax probabilities.

    Args:
        members: each member's model config (``{"name": ..., **overrides}``, as in a checkpoint).
        member_extra: each member's checkpoint metadata (:data:`MEMBER_KEYS`), in the same order.
        weights: relative weight of each member (default equal).

    Raises:
        ValueError: fewer than two members, a member that is not a segmenter, or members that disagree on
            classes or input channels.
    """

    task = "segment"
    input_size = None
    is_ensemble = True  # napari_medssl.inference runs each member as it runs that model alone

    def __init__(
        self,
        members: Sequence[dict[str, Any]],
        member_extra: Sequence[dict[str, Any]] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        extra = list(member_extra or [{} for _ in members])
        if len(extra) != len(members):
            raise ValueError(f"{len(members)} members but {len(extra)} member_extra records")
        w = [1.0] * len(members) if weights is None else [float(v) for v in weights]
        if len(w) != len(members) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"weights must be {len(members)} non-negative numbers, not all zero; got {w}")
        self.weights = [v / sum(w) for v in w]
        built = []
        for i, (cfg, ex) in enumerate(zip(members, extra)):
            cfg = dict(cfg)
            if "name" not in cfg:
                raise ValueError(f"member {i}: its config has no model name")
            name = cfg.pop("name")
            model = create_model(name, **cfg)
            if model.spec.task != "segment":
                raise ValueError(f"member {i} ({name}) is not a segmentation model")
            built.append(attach_spec(model, ex))  # each member runs with its own training facts
        self.members = nn.ModuleList(built)
        classes = {m.spec.num_classes for m in built}
        chans = {m.spec.in_chans for m in built}
        if len(classes) != 1 or len(chans) != 1:
            raise ValueError(
                f"members disagree: classes {sorted(classes)}, input channels {sorted(chans)}; "
                "an ensemble averages models of the same classes and inputs"
            )
        self.num_classes, self.in_chans = classes.pop(), chans.pop()
        # an ensemble with a 3D member needs volumes; its 2D members then run slice by slice
        self.spatial_dims = max(m.spec.spatial_dims for m in built)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted mean of the members' softmax ``(N, K, *S)`` for ``x (N, C, *S)``, each run whole."""
        out = None
        for weight, member in zip(self.weights, self.members):
            dims = member.spec.spatial_dims
            if dims == 2 and x.ndim == 5:  # a 2D member on volumes: slices along Z
                n, c, z = x.shape[:3]
                flat = x.movedim(2, 1).reshape(n * z, c, *x.shape[3:])
                p = member(flat).float().softmax(1)
                p = p.reshape(n, z, p.shape[1], *x.shape[3:]).movedim(1, 2)
            elif dims == 3 and x.ndim == 4:
                raise ValueError("this ensemble has a 3D member: give it (N, C, Z, Y, X) volumes")
            else:
                p = member(x).float().softmax(1)
            out = weight * p if out is None else out + weight * p
        assert out is not None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the mean probabilities ``(N, K, *S)``: logits whose softmax is the ensemble's average."""
        return self.probabilities(x).clamp_min(1e-12).log()


@register_model
def ensemble_mean(**overrides: Any) -> SegmentationEnsemble:
    """Mean of several trained segmenters' probabilities (build with :func:`from_checkpoints`)."""
    return SegmentationEnsemble(**overrides)


def from_checkpoints(
    paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None
) -> SegmentationEnsemble:
    """An ensemble of trained segmenters from their checkpoint files (weights copied in).

    The ensemble's own ``spec`` (and ``checkpoint_extra``) takes the members' shared facts: class names, and the validation
    split when every member recorded the same one (so ``medssl evaluate --split val`` scores it there).

    Raises:
        ValueError: see :class:`SegmentationEnsemble`.
    """
    from napari_medssl.models.registry import read_checkpoint

    configs, extras, states = [], [], []
    for path in paths:
        state, config, extra = read_checkpoint(path)
        if "name" not in config:
            raise ValueError(f"{path}: no model config in the checkpoint metadata")
        if config["name"] == NAME:
            raise ValueError(f"{path} is an ensemble itself; list its members instead")
        configs.append(config)
        extras.append({k: extra[k] for k in MEMBER_KEYS if k in extra})
        states.append(state)
    model = create_model(
        NAME,
        members=configs,
        member_extra=extras,
        **({"weights": list(weights)} if weights else {}),
    )
    for i, (member, state) in enumerate(zip(model.members, states)):
        missing, unexpected = member.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{paths[i]}: weights do not fit its own config: missing {list(missing)[:3]}")
    splits = {tuple(e.get("split_val") or ()) for e in extras}
    names = [e.get("class_names") for e in extras if e.get("class_names")]
    extra = {
        "task": "segment",
        "num_classes": model.num_classes,
        "class_names": names[0] if names else None,
        "members": [str(p) for p in paths],
    }
    if len(splits) == 1 and next(iter(splits)):
        extra["split_val"] = list(next(iter(splits)))
        data = {e.get("data") for e in extras}
        if len(data) == 1:
            extra["data"] = data.pop()
    return attach_spec(model, extra)
