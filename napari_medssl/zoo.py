"""The model zoo: trained models described by cards, weights checked by sha256.

A zoo folder holds one folder per model, named by family first (``unet_tiny_hippocampus``)::

    models/<name>/card.yaml          what it is, how it was trained and measured (see CARD_FIELDS)
    models/<name>/model.safetensors  the weights (safetensors; config in its metadata)

Folders searched, first match wins: each folder in ``$MEDSSL_MODELS_DIR`` (``os.pathsep``-separated), then
the checkout's top-level ``models/``. A card may give ``weights.url``: missing weights are then fetched with
pooch into ``$MEDSSL_CACHE_DIR`` (default pooch's cache) and checked against ``weights.sha256``. Every load
checks the sha256; a mismatch is an error, never a silent load.

A card's ``domain:`` block says which images the model is meant for (schema: ``domain.DOMAIN_FIELDS``):
``summary``, ``modality`` (DICOM Modality codes), ``body_part`` (BodyPartExamined values), ``structure``,
``image_dims``, ``spacing_mm`` / ``fov_mm`` / ``size_voxels`` ranges per axis in napari order, ``intensity``
and ``notes``. :mod:`napari_medssl.domain` compares an opened image with it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from napari_medssl._atomic import atomic_write, sha256_file

CARD = "card.yaml"
WEIGHTS = "model.safetensors"
REPO_MODELS = Path(__file__).resolve().parents[1] / "models"
CARD_FIELDS = (
    "name",  # folder name
    "description",  # one line
    "architecture",  # {"name": registered name, "config": create_model overrides}
    "task",  # classify | segment | pretrain
    "classes",  # class names (index = class value)
    "data",  # {"name", "path", "licence", "citation"}
    "domain",  # optional: the images it was trained for (modality, spacing, field of view ...): domain.py
    "split",  # {"seed", "val_fraction", "n_train", "n_val", "val_ids"}
    "command",  # the exact command that trained it
    "metrics",  # validation metrics
    "metrics_command",  # the exact command that measured them
    "licence",  # of the weights (and the data terms they inherit)
    "weights",  # {"file", "sha256", "size_bytes", "url" (optional)}
)

__all__ = ["card", "list_zoo", "load", "publish", "sha256_file", "weights_path", "zoo_dirs"]


def zoo_dirs() -> list[Path]:
    """Folders searched for models, in order: ``$MEDSSL_MODELS_DIR`` entries, then the checkout's ``models/``."""
    env = os.environ.get("MEDSSL_MODELS_DIR", "")
    dirs = [Path(p) for p in env.split(os.pathsep) if p]
    return [*dirs, REPO_MODELS]


def _folders() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in zoo_dirs():
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if (d / CARD).is_file() and d.name not in found:
                found[d.name] = d
    return found


def list_zoo() -> list[str]:
    """Names of the models in the zoo folders, sorted."""
    return sorted(_folders())


def card(name: str) -> dict[str, Any]:
    """The card of zoo model ``name`` as a dict (plus ``"folder"``: where it lives).

    Raises:
        ValueError: no such model, a card without ``weights.sha256`` or with a malformed ``domain`` block.
    """
    import yaml

    folders = _folders()
    if name not in folders:
        raise ValueError(f"no zoo model {name!r}; available: {', '.join(sorted(folders)) or 'none'}")
    path = folders[name] / CARD
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err})") from None
    weights = data.get("weights") or {}
    if not isinstance(weights, dict) or not weights.get("sha256"):
        raise ValueError(f"{path}: the card must give weights.sha256")
    if data.get("domain") is not None:
        from napari_medssl.domain import validate_domain

        validate_domain(data["domain"], f"{path}: domain")
    data["folder"] = str(folders[name])
    return data


def weights_path(name: str) -> Path:
    """The verified weights file of zoo model ``name`` (fetched by URL when the card has one).

    Raises:
        FileNotFoundError: no local weights and no URL.
        ValueError: the file's sha256 differs from the card's.
    """
    c = card(name)
    weights = c["weights"]
    path = Path(c["folder"]) / weights.get("file", WEIGHTS)
    if not path.is_file():
        url = weights.get("url")
        if not url:
            raise FileNotFoundError(f"zoo model {name}: weights {path} missing and the card gives no url")
        import pooch

        cache = os.environ.get("MEDSSL_CACHE_DIR") or pooch.os_cache("napari-medssl")
        fetched = pooch.retrieve(
            url, known_hash=f"sha256:{weights['sha256']}", path=cache, fname=f"{name}.safetensors"
        )
        return Path(fetched)
    digest = sha256_file(path)
    if digest != weights["sha256"]:
        raise ValueError(f"zoo model {name}: {path} has sha256 {digest}, the card says {weights['sha256']}")
    return path


def load(name_or_path: str | os.PathLike, device: str = "cpu") -> Any:
    """Load a model from the zoo (by name, sha256-checked), a ``.safetensors`` checkpoint or a training run
    folder (its ``best.safetensors``); see :func:`napari_medssl.resolve.resolve`.

    ``model.spec`` holds its facts, with the card (``None`` for a plain file) and where it came from.

    Raises:
        ValueError: unknown name, an untrained architecture, sha256 mismatch, a pickle or a file that is not
            a checkpoint.
        FileNotFoundError: a path that does not exist.
    """
    from napari_medssl.inference import pick_device
    from napari_medssl.models.registry import load_model
    from napari_medssl.models.spec import attach_spec
    from napari_medssl.resolve import resolve

    found = resolve(name_or_path)
    assert found.path is not None
    model = load_model(found.path, map_location=pick_device(device))
    # the zoo's card and the name asked for add facts to the checkpoint's own
    attach_spec(
        model,
        model.checkpoint_extra,
        card=found.card,
        source=found.source,
        weights_path=str(found.path),
        weights_sha256=model.spec.weights_sha256,
    )
    model.eval()
    return model


def publish(
    checkpoint: str | os.PathLike,
    name: str,
    *,
    description: str,
    command: str,
    metrics: dict[str, Any],
    metrics_command: str,
    data: dict[str, Any],
    licence: str,
    dest: str | os.PathLike | None = None,
    max_mb: float = 10.0,
    **more: Any,
) -> Path:
    """Copy a checkpoint into a zoo folder and write its card (sha256 computed here).

    Args:
        checkpoint: the ``.safetensors`` weights (``best.safetensors`` of a run).
        name: folder name, family first (``unet_tiny_hippocampus``).
        description, command, metrics, metrics_command, data, licence: card fields (see CARD_FIELDS).
        dest: the zoo root (default the checkout's ``models/``).
        max_mb: refuse weights larger than this.
        **more: extra card fields (``split``, ``notes`` ...).

    Returns:
        The model's folder.
    """
    import yaml

    from napari_medssl.models.registry import read_checkpoint

    checkpoint = Path(checkpoint)
    size = checkpoint.stat().st_size
    if size > max_mb * 1e6:
        raise ValueError(f"{checkpoint} is {size / 1e6:.1f} MB; zoo weights must be at most {max_mb} MB")
    _, config, extra = read_checkpoint(checkpoint)
    folder = Path(dest or REPO_MODELS) / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / WEIGHTS
    atomic_write(target, lambda tmp: shutil.copyfile(checkpoint, tmp))
    arch = dict(config)
    entry = {
        "name": name,
        "description": description,
        "architecture": {"name": arch.pop("name", None), "config": arch},
        "task": extra.get("task"),
        "classes": extra.get("class_names"),
        "data": data,
        "command": command,
        "metrics": metrics,
        "metrics_command": metrics_command,
        "licence": licence,
        **more,
        "weights": {"file": WEIGHTS, "sha256": sha256_file(target), "size_bytes": size},
    }
    from napari_medssl._atomic import atomic_write_text

    atomic_write_text(folder / CARD, yaml.safe_dump(entry, sort_keys=False, allow_unicode=True))
    return folder
