"""One resolver for "zoo name, checkpoint file or run folder", with one set of error messages.

:func:`resolve` turns what a user typed (CLI ``--model``, a dock's choice, ``zoo.load``'s argument) into the
weights file to read, in this order: an existing file; a training run folder (its ``best.safetensors``); a
model of the zoo (its sha256-checked weights and card); a registered architecture (``unet_tiny``, built
fresh), where the caller accepts one. :func:`describe` gives a model's :class:`ModelSpec` from the checkpoint's
metadata alone (no weights read, the model built on torch's ``meta`` device), for docks that only need its
facts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BEST", "Resolved", "describe", "resolve"]

BEST = "best.safetensors"  # a training run folder's best checkpoint
_PATH_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


@dataclass(frozen=True)
class Resolved:
    """Where a model comes from.

    Attributes:
        source: what was asked for (a zoo name, a file or a run folder).
        path: the weights file; ``None`` for a registered architecture built fresh.
        card: the zoo card, for a zoo model.
        architecture: the registered name, for an architecture built fresh.
    """

    source: str
    path: Path | None
    card: dict[str, Any] | None = None
    architecture: str | None = None


def resolve(source: str | os.PathLike, architectures: bool = False) -> Resolved:
    """Find the weights ``source`` names (see the module docstring).

    Args:
        source: a checkpoint file, a training run folder, a zoo name or (with ``architectures``) a registered
            architecture name.
        architectures: accept a registered architecture (``path`` is then ``None``).

    Raises:
        FileNotFoundError: ``source`` looks like a path but there is no such file, or a folder without
            ``best.safetensors``.
        ValueError: ``source`` is none of these (or an architecture where trained weights are needed); a zoo
            model whose weights fail their sha256 check.
    """
    from napari_medssl import zoo

    text = os.fspath(source)
    path = Path(text)
    if path.is_file():
        return Resolved(text, path)
    if path.is_dir():
        if (path / BEST).is_file():
            return Resolved(text, path / BEST)
        raise FileNotFoundError(
            f"checkpoint not found: {text} is a folder without {BEST} (not a training run)"
        )
    zoo_names = zoo.list_zoo()
    if text in zoo_names:
        return Resolved(text, zoo.weights_path(text), card=zoo.card(text))
    from napari_medssl.models.registry import list_models

    if text in list_models():
        if architectures:
            return Resolved(text, None, architecture=text)
        raise ValueError(
            f"{text!r} is an untrained architecture; give a checkpoint file, a training run folder or a zoo model"
        )
    if text.endswith(_PATH_SUFFIXES) or "/" in text or "\\" in text:
        raise FileNotFoundError(f"checkpoint not found: {text}")
    more = f"; registered architectures (built fresh): {', '.join(list_models())}" if architectures else ""
    raise ValueError(
        f"unknown model {text!r}: no zoo model, checkpoint file or training run folder of that name "
        f"(zoo: {', '.join(zoo_names) or 'empty'}){more}"
    )


_DESCRIBED: dict[tuple[str, str, float], Any] = {}


def describe(source: str | os.PathLike) -> Any:
    """The :class:`~napari_medssl.models.spec.ModelSpec` of a zoo model, checkpoint or run folder, read from
    the checkpoint's metadata and card without loading its weights (cached per file time).

    Raises:
        FileNotFoundError, ValueError: as :func:`resolve`; a file that is not a safetensors checkpoint.
    """
    import torch

    from napari_medssl._atomic import sha256_file
    from napari_medssl.models.registry import create_model, read_metadata
    from napari_medssl.models.spec import attach_spec

    found = resolve(source)
    assert found.path is not None
    key = (found.source, str(found.path), found.path.stat().st_mtime)
    if key not in _DESCRIBED:
        config, extra = read_metadata(found.path)
        if "name" not in config:
            raise ValueError(f"{found.path}: no model config in the checkpoint metadata")
        name = config.pop("name")
        try:
            with torch.device("meta"):  # the architecture's facts without allocating or reading weights
                skeleton = create_model(name, **config)
        except TypeError as err:  # a config key the builder does not take (a damaged or foreign checkpoint)
            raise ValueError(
                f"{found.path}: cannot build {name} from the checkpoint's config: {err}"
            ) from None
        sha = (found.card or {}).get("weights", {}).get("sha256") or sha256_file(found.path)
        attach_spec(
            skeleton,
            extra,
            card=found.card,
            source=found.source,
            weights_path=str(found.path),
            weights_sha256=sha,
        )
        _DESCRIBED[key] = skeleton.spec
    return _DESCRIBED[key]
