"""The model zoo: trained models described by cards, weights checked by sha256.

The cards ship inside the package, one file per model, named by family first (their only copy)::

    napari_medssl/zoo_cards/<name>.yaml   what it is, how it was trained and measured (see CARD_FIELDS)

The weights (safetensors; config in its metadata) are found, first match wins:

1. a local folder: ``<dir>/<name>/model.safetensors`` for each ``<dir>`` of :func:`zoo_dirs` (the entries of
   ``$MEDSSL_MODELS_DIR``, ``os.pathsep``-separated, then the checkout's top-level ``models/`` when running
   from a checkout), so a checkout needs no network;
2. the cache: fetched once with pooch from ``$MEDSSL_ZOO_URL/<name>/model.safetensors`` (a mirror, an
   air-gapped site's server) or else the project's release assets (:data:`ZOO_URL`, same layout), into
   ``$MEDSSL_CACHE_DIR`` (default pooch's user cache), and used from there offline afterwards.

A local folder may also hold models of its own (``<dir>/<name>/card.yaml`` beside the weights; a card there
takes precedence over a shipped one of the same name). Every load checks the sha256 against the card: a
mismatch is an error, never a silent load, and a download that fails the check is not kept in the cache.

A card's ``domain:`` block says which images the model is meant for (schema: ``domain.DOMAIN_FIELDS``):
``summary``, ``modality`` (DICOM Modality codes), ``body_part`` (BodyPartExamined values), ``structure``,
``image_dims``, ``spacing_mm`` / ``fov_mm`` / ``size_voxels`` ranges per axis in napari order, ``intensity``
and ``notes``. :mod:`napari_medssl.domain` compares an opened image with it.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path
from typing import Any

from napari_medssl._atomic import atomic_write, sha256_file

CARD = "card.yaml"
WEIGHTS = "model.safetensors"
PACKAGE_CARDS = Path(__file__).resolve().parent / "zoo_cards"
"""The shipped cards: ``<name>.yaml`` (package data, so a wheel install lists the zoo)."""
CHECKOUT = Path(__file__).resolve().parents[1]
REPO_MODELS = CHECKOUT / "models"
"""The checkout's local weights (``models/<name>/model.safetensors``); searched only in a checkout."""
ZOO_URL = "https://github.com/napari-medssl/napari-medssl/releases/download"
"""The project's release assets: model ``<name>`` is asset ``model.safetensors`` of the release tagged
``<name>``, i.e. ``{ZOO_URL}/<name>/model.safetensors``, the layout ``$MEDSSL_ZOO_URL`` replaces it with."""
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

__all__ = [
    "cache_dir",
    "card",
    "list_zoo",
    "load",
    "publish",
    "sha256_file",
    "weights_path",
    "weights_url",
    "zoo_dirs",
]


def zoo_dirs() -> list[Path]:
    """Local folders searched for ``<name>/model.safetensors`` (and local cards), in order:
    ``$MEDSSL_MODELS_DIR`` entries, then the checkout's ``models/`` (absent in an installed package)."""
    env = os.environ.get("MEDSSL_MODELS_DIR", "")
    dirs = [Path(p) for p in env.split(os.pathsep) if p]
    if (CHECKOUT / "setup.cfg").is_file() and REPO_MODELS.is_dir():
        dirs.append(REPO_MODELS)
    return dirs


def _cards() -> dict[str, Path]:
    """Model name → its card file: local folders' ``<name>/card.yaml`` first, then the shipped cards."""
    found: dict[str, Path] = {}
    for root in zoo_dirs():
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if (d / CARD).is_file() and d.name not in found:
                found[d.name] = d / CARD
    for path in sorted(PACKAGE_CARDS.glob("*.yaml")):
        found.setdefault(path.stem, path)
    return found


def list_zoo() -> list[str]:
    """Names of the zoo's models (shipped cards and local folders' cards), sorted."""
    return sorted(_cards())


def card(name: str) -> dict[str, Any]:
    """The card of zoo model ``name`` as a dict, plus ``"card_path"`` (its file) and ``"folder"`` (the local
    folder holding it, for a card that is not shipped, else ``None``). ``weights.url`` is where the weights
    are fetched from when no local folder has them (:func:`weights_url`).

    Raises:
        ValueError: no such model, a card without ``weights.sha256`` or with a malformed ``domain`` block.
    """
    import yaml

    cards = _cards()
    if name not in cards:
        raise ValueError(f"no zoo model {name!r}; available: {', '.join(sorted(cards)) or 'none'}")
    path = cards[name]
    try:
        stat = path.stat()
        data = copy.deepcopy(_parsed_card(str(path), stat.st_mtime_ns, stat.st_size))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML ({err})") from None
    weights = data.get("weights") or {}
    if not isinstance(weights, dict) or not weights.get("sha256"):
        raise ValueError(f"{path}: the card must give weights.sha256")
    if data.get("domain") is not None:
        from napari_medssl.domain import validate_domain

        validate_domain(data["domain"], f"{path}: domain")
    data["card_path"] = str(path)
    data["folder"] = str(path.parent) if path.name == CARD else None
    weights["url"] = weights_url(name, weights.get("url"))
    data["weights"] = weights
    return data


@functools.lru_cache(maxsize=64)
def _parsed_card(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """A card file's YAML, parsed once per file version (callers get a copy)."""
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def weights_url(name: str, card_url: str | None = None) -> str:
    """Where zoo model ``name``'s weights are fetched from: ``$MEDSSL_ZOO_URL/<name>/model.safetensors`` when
    that is set (a mirror replaces every source), else the card's own ``weights.url``, else the release
    assets ``{ZOO_URL}/<name>/model.safetensors``."""
    mirror = os.environ.get("MEDSSL_ZOO_URL", "").strip()
    if mirror:
        return f"{mirror.rstrip('/')}/{name}/{WEIGHTS}"
    return card_url or f"{ZOO_URL}/{name}/{WEIGHTS}"


def cache_dir() -> Path:
    """Where fetched weights are kept: the package's one cache folder (:func:`napari_medssl.cache.cache_dir`)."""
    from napari_medssl import cache

    return cache.cache_dir()


def weights_path(name: str) -> Path:
    """The verified weights file of zoo model ``name``: a local folder's, else the cache's (fetched once).

    Raises:
        ValueError: no such model, or weights whose sha256 differs from the card's (local, cached or
            downloaded; a failed download is not kept).
        FileNotFoundError: no local weights, nothing cached, and the download failed (offline, no mirror).
    """
    c = card(name)
    weights = c["weights"]
    file = weights.get("file", WEIGHTS)
    # a local card's weights sit beside it; a shipped card's in any local folder
    local = [Path(c["folder"]) / file] if c["folder"] else [root / name / file for root in zoo_dirs()]
    path = next((p for p in local if p.is_file()), None)
    if path is not None:
        digest = sha256_file(path)
        if digest != weights["sha256"]:
            raise ValueError(
                f"zoo model {name}: {path} has sha256 {digest}, the card says {weights['sha256']}"
            )
        return path
    return _fetch(name, weights["url"], weights["sha256"], local)


def _fetch(name: str, url: str, sha256: str, searched: list[Path]) -> Path:
    """The cached weights of ``name`` (pooch: downloaded from ``url`` unless already cached with this sha256)."""
    import pooch

    cache = cache_dir()
    try:
        fetched = pooch.retrieve(
            url, known_hash=f"sha256:{sha256}", path=cache, fname=f"{name}.safetensors", progressbar=False
        )
    except ValueError as err:
        if "hash" not in str(err).lower():
            raise
        # pooch checks the download in a temporary file and deletes it when the hash differs
        raise ValueError(
            f"zoo model {name}: the weights from {url} fail their sha256 check (the card says {sha256}); "
            f"nothing was cached ({err})"
        ) from None
    except Exception as err:  # requests' connection, HTTP and timeout errors
        where = ", ".join(str(p.parent) for p in searched) or "no local zoo folder"
        raise FileNotFoundError(
            f"zoo model {name}: no local weights ({where}), none cached in {cache}, and fetching {url} failed "
            f"({type(err).__name__}: {err}); set MEDSSL_ZOO_URL to a mirror or MEDSSL_MODELS_DIR to a folder "
            f"holding {name}/{WEIGHTS}"
        ) from None
    return Path(fetched)


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
    verified = (found.card or {}).get("weights", {}).get("sha256")  # weights_path checked it
    model = load_model(found.path, map_location=pick_device(device), weights_sha256=verified)
    # the zoo's card and the name asked for add facts to the checkpoint's own
    attach_spec(
        model,
        model.spec.extra,
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
        dest: a local zoo folder: weights and card go to ``dest/<name>/``. Default: the checkout, weights to
            ``models/<name>/model.safetensors`` and the card into the package (``zoo_cards/<name>.yaml``),
            its one copy; upload the weights as the release asset ``{ZOO_URL}/<name>/model.safetensors``.
        max_mb: refuse weights larger than this.
        **more: extra card fields (``split``, ``notes`` ...).

    Returns:
        The folder holding the weights.
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

    card_file = folder / CARD if dest else PACKAGE_CARDS / f"{name}.yaml"
    atomic_write_text(card_file, yaml.safe_dump(entry, sort_keys=False, allow_unicode=True))
    return folder
