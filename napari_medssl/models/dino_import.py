"""Official DINO checkpoints into this package's ViTs: :func:`load_dino_checkpoint`.

Reads the layouts DINO publishes (bare backbones, full training checkpoints with teacher and student,
``module.``/``backbone.`` prefixes, flat safetensors files), resizes position tables to our patch grid and
adapts RGB patch embeddings to our channel count. Torch files are read with ``weights_only=True``: a pickle
holding code is refused.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from napari_medssl.models.dino import DINO
from napari_medssl.models.layers.pos_embed import resize_pos_embed
from napari_medssl.models.vit import VisionTransformer

__all__ = ["load_dino_checkpoint"]

_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_NESTED = ("teacher", "student", "state_dict", "model")


def _read_state_file(path: Path) -> dict[str, Any]:
    """Tensors from a safetensors file, or a torch file read with ``weights_only=True`` (no code runs)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - any failure means the file is not usable safetensors
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused: the file holds pickled objects other than tensors and plain containers, and "
            f"unpickling them could run code ({str(err).splitlines()[-1] if str(err) else err}). "
            "Accepted: .safetensors files, or torch files of tensors/dicts that load with weights_only=True."
        ) from None
    except Exception as err:  # noqa: BLE001 - RuntimeError, EOFError, OSError; SafetensorError for *.safetensors
        raise ValueError(f"{path}: not a safetensors or torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    return obj


def _select_state(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the teacher's weights (else the student's, ``state_dict``, ``model``) and flatten them."""
    for key in _NESTED:
        if isinstance(obj.get(key), dict):
            return {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}, key
    for key in _NESTED:  # flat files (safetensors) with "teacher.…" keys
        sub = {k[len(key) + 1 :]: v for k, v in obj.items() if k.startswith(key + ".")}
        if sub:
            return sub, key
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, "root"


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _adapt_input_channels(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """timm's ``adapt_input_conv`` for a patch-embedding weight of any input channel count (RGB checkpoints
    work with every timm 1.x; other counts need the ``base_chans`` argument of newer timm)."""
    if weight.shape[1] == 3:
        return adapt_input_conv(in_chans, weight)
    try:
        return adapt_input_conv(in_chans, weight, base_chans=weight.shape[1])
    except TypeError:
        raise ValueError(
            f"adapting a {weight.shape[1]}-channel checkpoint to {in_chans} channels needs a newer timm "
            "(adapt_input_conv with base_chans): pip install -U timm"
        ) from None


def _adapt_pos_embed(pos: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """Checkpoint position table ``(1, [1 +] n², E)`` -> ours ``(1, 1 + gh·gw, E)``."""
    n = pos.shape[1]
    side = math.isqrt(n - 1)
    if side * side == n - 1:
        cls, patches = pos[:, :1], pos[:, 1:]
    elif math.isqrt(n) ** 2 == n:
        side, cls, patches = math.isqrt(n), pos.new_zeros(1, 1, pos.shape[-1]), pos
    else:
        raise ValueError(f"pos_embed of shape {tuple(pos.shape)} is not a square patch grid (+ [CLS])")
    patches = resize_pos_embed(patches, (side, side), vit.base_grid)
    return torch.cat([cls, patches], dim=1)


def load_dino_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict[str, list[str]]:
    """Load official DINO ViT weights from a file into our ViT (or into both ViTs of a :class:`DINO`).

    Handles the layouts DINO publishes and produces: a bare backbone state dict
    (``dino_deitsmall16_pretrain.pth``), full training checkpoints ``{"teacher": …, "student": …, "args": …}``
    (teacher preferred), ``module.`` / ``backbone.`` prefixes, and flat safetensors files. Projection/classifier
    ``head.*`` keys are dropped; ``pos_embed`` is resized to our patch grid; a 3-channel ``patch_embed`` is
    adapted to our ``in_chans`` (summed over RGB for 1 channel).

    Args:
        path: ``.safetensors`` or torch file. Torch files are read with ``weights_only=True``: a pickle holding
            anything but tensors and plain containers is refused (``argparse.Namespace`` args are allowed).
        model: a :class:`~napari_medssl.models.vit.VisionTransformer` or a :class:`DINO`.

    Returns:
        ``{"loaded": [...], "dropped": [...], "adapted": [...]}`` key names, for the caller to report.

    Raises:
        FileNotFoundError: no such file.
        ValueError: refused pickle, unreadable file, or weights that do not fit (names the mismatch).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINO checkpoint not found: {path}")
    if isinstance(model, DINO):
        targets = [model.teacher] + ([model.student] if model.task == "pretrain" else [])
    elif isinstance(model, VisionTransformer):
        targets = [model]
    else:
        raise ValueError(
            f"load_dino_checkpoint loads into a VisionTransformer or DINO, got {type(model).__name__}"
        )
    state, _ = _select_state(_read_state_file(path))
    state = {_strip(k): v for k, v in state.items()}
    vit = targets[0]
    ours = vit.state_dict()
    kept: dict[str, torch.Tensor] = {}
    dropped, adapted = [], []
    for key, value in state.items():
        if key not in ours or key.startswith("head."):
            dropped.append(key)
            continue
        if key == "pos_embed" and value.shape != ours[key].shape:
            value = _adapt_pos_embed(value, vit)
            adapted.append(key)
        elif key == "patch_embed.proj.weight" and value.shape != ours[key].shape:
            if value.shape[-2:] != ours[key].shape[-2:]:
                raise ValueError(
                    f"{path}: checkpoint patch size {tuple(value.shape[-2:])} differs from the model's "
                    f"{tuple(ours[key].shape[-2:])}; build the model with patch_size={value.shape[-1]}"
                )
            value = _adapt_input_channels(vit.in_chans, value.float())
            adapted.append(key)
        if value.shape != ours[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(ours[key].shape)} in "
                f"the model (embed_dim={vit.embed_dim}, depth={vit.depth}); build a matching size, e.g. dino_small"
            )
        kept[key] = value.to(ours[key].dtype)
    missing = sorted(k for k in ours if k not in kept and not k.startswith("head."))
    if missing:
        raise ValueError(
            f"{path}: the checkpoint lacks {len(missing)} backbone weights, e.g. {missing[:4]}; is it a ViT of "
            f"depth {vit.depth}? (found {len(state)} keys, e.g. {sorted(state)[:4]})"
        )
    for target in targets:
        target.load_state_dict(kept, strict=False)
    return {"loaded": sorted(kept), "dropped": sorted(dropped), "adapted": adapted}
