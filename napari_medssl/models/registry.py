"""Model registry: ``create_model("family_size", **overrides)`` and safetensors weights.

Every builder is registered under ``<family>_<size>`` (``mae_tiny``, ``unet_base`` ...). Builders take keyword
overrides (``num_classes``, ``in_chans``, ``img_size`` ...) and return an ``nn.Module`` that carries
``model.config``: the registered name plus the overrides, enough to rebuild it from a checkpoint, and
``model.spec`` (:class:`~napari_medssl.models.spec.ModelSpec`, the facts callers read).

Checkpoints are safetensors files whose metadata holds that config as JSON; nothing here unpickles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_medssl.models.spec import attach_spec

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_FAMILY_MODULES = (
    "vit",
    "mae",
    "dino",
    "msmae",
    "miram",
    "mim",
    "dino_cnn",
    "emf_former",
    "unet",
    "cnn",
    "ensemble",
)
_loaded = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name (``<family>_<size>``)."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    import importlib

    for mod in _FAMILY_MODULES:
        try:
            importlib.import_module(f"napari_medssl.models.{mod}")
        except ModuleNotFoundError as err:  # a family not written yet
            if err.name != f"napari_medssl.models.{mod}":
                raise
    _loaded = True


def list_models(family: str | None = None) -> list[str]:
    """Names of registered models, optionally only one family (``"mae"``, ``"unet"`` ...)."""
    _load_families()
    names = sorted(_REGISTRY)
    if family is not None:
        names = [n for n in names if n.rsplit("_", 1)[0] == family]
    return names


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: ``<family>_<size>``, e.g. ``"mae_tiny"``; see :func:`list_models`.
        **overrides: keyword arguments passed to the builder (``num_classes``, ``in_chans`` ...).

    Raises:
        ValueError: the name is not registered.
    """
    _load_families()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**overrides)
    model.config = {"name": name, **_jsonable(overrides)}
    return attach_spec(model)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, tuple):
            v = list(v)
        json.dumps(v)  # raises TypeError for values a checkpoint could not record
        out[k] = v
    return out


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and config to a safetensors file, atomically.

    Args:
        model: a model built by :func:`create_model` (it has ``model.config``).
        path: destination ``.safetensors`` file.
        extra: more JSON-serialisable facts to keep in the metadata (metrics, class names ...).
    """
    from napari_medssl._atomic import atomic_write

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = _untie(state)
    meta = {"config": json.dumps(getattr(model, "config", {})), "extra": json.dumps(extra or {})}
    return atomic_write(path, lambda tmp: write_safetensors(state, tmp, meta))


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (a full disk) raised as ``OSError``.

    safetensors reports a failed write as ``SafetensorError("... No space left on device (os error 28)")``.
    """
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        raise OSError(int(code.group(1)) if code else errno.EIO, f"cannot write {path}: {err}") from None


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; clone the later ones."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    return out


def read_checkpoint(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a safetensors checkpoint: ``(state_dict, config, extra)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a safetensors file (pickles are refused, never unpickled).
    """
    return _read(path, tensors=True)


def read_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, extra)`` of a safetensors checkpoint, without reading its tensors.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_checkpoint`.
    """
    _, config, extra = _read(path, tensors=False)
    return config, extra


def _read(
    path: str | os.PathLike, tensors: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a safetensors checkpoint ({err}); only safetensors weights are accepted "
            "(pickled .pt/.pth files are refused because unpickling can run code)"
        ) from None
    try:
        config = json.loads(meta.get("config", "{}"))
        extra = json.loads(meta.get("extra", "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: checkpoint metadata is not valid JSON ({err})") from None
    return state, config, extra


def load_model(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    weights_sha256: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """Rebuild a model from a checkpoint written by :func:`save_model`; ``model.spec`` holds the checkpoint's
    facts (its ``extra`` metadata, path and sha256).

    Raises:
        ValueError: not a safetensors file, no model config in it, or weights that do not fit the model.
    """
    state, config, extra = read_checkpoint(path)
    if "name" not in config:
        raise ValueError(f"{path}: no model config in the checkpoint metadata; cannot tell which model it is")
    name = config.pop("name")
    config.update(overrides)
    try:
        model = create_model(name, **config)
    except TypeError as err:  # a config key the builder does not take (a damaged or foreign checkpoint)
        raise ValueError(
            f"{path}: cannot build {name} from the checkpoint's config {config}: {err}"
        ) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit {name}: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    from napari_medssl._atomic import sha256_file

    sha = weights_sha256 or sha256_file(path)  # a caller that has just verified the file passes its sha256
    attach_spec(model, extra, source=str(path), weights_path=str(path), weights_sha256=sha)
    return model.to(map_location)
