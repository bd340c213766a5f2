"""The sample-data catalogue (``sample_data/catalogue.yaml``): local copy, pooch cache, or a real fallback.

Where a sample's files come from, in order:

1. ``$MEDSSL_DATA_DIR/<dataset folder>`` when that folder exists (offline; tests and CI point it at the
   local data folder). Local files listed with a hash in the catalogue are checked; a mismatch warns.
2. The pooch cache (``$MEDSSL_CACHE_DIR``, default ``pooch.os_cache("napari-medssl")``): files already
   downloaded and hash-checked are used without the network.
3. A download with pooch (30 s timeout, hash-checked), unless ``$MEDSSL_OFFLINE`` is set or the
   dataset has no hash-checkable download.
4. The sample's fallback: a real image shipped inside a dependency (pydicom's ``CT_small.dcm`` /
   ``MR_small.dcm``, nibabel's ``anatomical.nii``), named as such in the layer and in
   ``metadata["sample"]``. A sample without a fallback raises :class:`SampleDataUnavailable`.
"""

from __future__ import annotations

import os
import sysconfig
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from napari_medssl._atomic import sha256_file
from napari_medssl.cache import cache_dir

from .volume import MedicalImageReadWarning, Volume

CATALOGUE_NAME = "catalogue.yaml"
DOWNLOAD_TIMEOUT_S = 30


class SampleDataUnavailable(FileNotFoundError):
    """A sample that is neither local, cached, downloadable, nor has a fallback."""


@dataclass(frozen=True)
class SampleSource:
    """Where a sample's files were found.

    Attributes:
        paths: The files/folders to read, in the order the sample lists them.
        origin: ``"local"``, ``"cache"``, ``"download"`` or ``"fallback"``.
        detail: The folder, URL or dependency file they came from.
    """

    paths: tuple[Path, ...]
    origin: str
    detail: str


def catalogue_path() -> Path:
    """The catalogue file: ``$MEDSSL_CATALOGUE``, the repository's ``sample_data/``, or the installed copy."""
    env = os.environ.get("MEDSSL_CATALOGUE")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "sample_data" / CATALOGUE_NAME)
    candidates.append(
        Path(sysconfig.get_path("data")) / "share" / "napari-medssl" / "sample_data" / CATALOGUE_NAME
    )
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        "the sample-data catalogue was not found; looked in: " + ", ".join(str(c) for c in candidates)
    )


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def load_catalogue() -> dict[str, Any]:
    """The parsed catalogue: ``{"version", "datasets": {...}, "samples": {...}}``."""
    path = catalogue_path()
    return _load(str(path), path.stat().st_mtime)


def list_samples() -> dict[str, str]:
    """Sample key → display name."""
    return {k: v["display_name"] for k, v in load_catalogue()["samples"].items()}


def sha256_of(path: Path) -> str:
    """``"sha256:<hex>"`` of a file (pooch's ``known_hash`` form)."""
    return f"sha256:{sha256_file(path)}"


def _check_hashes(dataset: dict[str, Any], root: Path, paths: list[Path]) -> None:
    files = dataset.get("files") or {}
    for p in paths:
        targets = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in targets:
            rel = q.relative_to(root).as_posix()
            known = files.get(rel)
            if known and sha256_of(q) != known:
                warnings.warn(
                    MedicalImageReadWarning(
                        f"{q} differs from the catalogue ({known}); it may not be the published file"
                    ),
                    stacklevel=3,
                )


def _local(dataset: dict[str, Any], rels: list[str]) -> SampleSource | None:
    env = os.environ.get("MEDSSL_DATA_DIR")
    if not env:
        return None
    root = Path(env) / dataset["folder"]
    paths = [root / r for r in rels]
    if not all(p.exists() for p in paths):
        return None
    _check_hashes(dataset, root, paths)
    return SampleSource(tuple(paths), "local", str(root))


def _relative_files(dataset: dict[str, Any], rel: str) -> list[str]:
    files = list((dataset.get("files") or {}).keys())
    if rel in ("", "."):
        return files
    return [f for f in files if f == rel or f.startswith(rel.rstrip("/") + "/")]


def _hash_ok(path: Path, known: str) -> bool:
    """Whether a file matches a pooch-style hash string (``"sha256:..."`` or ``"md5:..."``)."""
    import pooch

    alg, _, digest = known.partition(":")
    return path.is_file() and pooch.file_hash(str(path), alg=alg) == digest


def _fetch(
    dataset_key: str, dataset: dict[str, Any], rels: list[str], allow_download: bool
) -> SampleSource | None:
    """Files from the pooch cache (hash-checked), downloading them when allowed; ``None`` when impossible.

    Offline (``allow_download=False``) nothing touches the network: a missing or corrupt cached file
    means ``None``.
    """
    if "archive" not in dataset and "base_url" not in dataset:
        return None
    import pooch

    target = cache_dir() / dataset_key
    downloader = pooch.HTTPDownloader(progressbar=False, timeout=DOWNLOAD_TIMEOUT_S)
    if "base_url" in dataset:
        wanted = [f for r in rels for f in _relative_files(dataset, r)]
        if not wanted:
            return None
        cached = all(_hash_ok(target / f, dataset["files"][f]) for f in wanted)
        if not cached:
            if not allow_download:
                return None
            for f in wanted:  # pooch downloads what is missing or corrupt, and checks the hash
                pooch.retrieve(
                    dataset["base_url"] + f, dataset["files"][f], fname=f, path=target, downloader=downloader
                )
        paths = tuple(target / r if r not in ("", ".") else target for r in rels)
        return SampleSource(paths, "cache" if cached else "download", dataset["base_url"])
    archive = dataset["archive"]
    name = archive["url"].rsplit("/", 1)[-1]
    unpacked = target / f"{name}.untar" / archive.get("root", "")
    cached = all((unpacked / r).exists() for r in rels)
    if not cached:
        if not allow_download and not _hash_ok(target / name, archive["hash"]):
            return None
        pooch.retrieve(
            archive["url"],
            archive["hash"],
            fname=name,
            path=target,
            processor=pooch.Untar(extract_dir=f"{name}.untar"),
            downloader=downloader,
        )
    paths = [unpacked / r for r in rels]
    _check_hashes(dataset, unpacked, paths)
    return SampleSource(tuple(paths), "cache" if cached else "download", archive["url"])


def _fallback(spec: str | None) -> SampleSource | None:
    if not spec:
        return None
    package, _, name = spec.partition(":")
    if package == "pydicom":
        from pydicom.data import get_testdata_file

        found = get_testdata_file(name, download=False)
        path = Path(found) if found else None
    elif package == "nibabel":
        import nibabel

        path = Path(nibabel.__file__).parent / "tests" / "data" / name  # nibabel.testing.data_path
    else:
        raise ValueError(f"unknown fallback {spec!r}; expected 'pydicom:<file>' or 'nibabel:<file>'")
    if path is None or not path.is_file():
        return None
    return SampleSource((path,), "fallback", spec)


def resolve_sample(key: str) -> SampleSource:
    """Find a sample's files (local → cache → download → fallback).

    Raises:
        KeyError: ``key`` is not in the catalogue (the message lists the keys).
        SampleDataUnavailable: Nothing local, cached or downloadable, and no fallback.
    """
    catalogue = load_catalogue()
    if key not in catalogue["samples"]:
        raise KeyError(f"unknown sample {key!r}; the catalogue offers {sorted(catalogue['samples'])}")
    sample = catalogue["samples"][key]
    dataset_key = sample["dataset"]
    dataset = catalogue["datasets"][dataset_key]
    rels = list(sample["open"])
    found = _local(dataset, rels)
    if found is None:
        allow = not os.environ.get("MEDSSL_OFFLINE")
        try:
            found = _fetch(dataset_key, dataset, rels, allow)
        except Exception as err:  # network down, HTTP error, hash mismatch
            warnings.warn(
                MedicalImageReadWarning(f"sample {key!r}: download failed ({type(err).__name__}: {err})"),
                stacklevel=2,
            )
    if found is None:
        found = _fallback(sample.get("fallback"))
    if found is None:
        raise SampleDataUnavailable(
            f"sample {key!r} ({dataset['title']}) is not available: set MEDSSL_DATA_DIR to a folder holding "
            f"{dataset['folder']}/ (see {dataset['homepage']}), or go online"
            + (" and unset MEDSSL_OFFLINE" if os.environ.get("MEDSSL_OFFLINE") else "")
        )
    return found


def load_sample(key: str) -> list[Volume]:
    """Read a catalogue sample into volumes; ``metadata["sample"]`` records its provenance and licence."""
    from .api import read

    source = resolve_sample(key)
    catalogue = load_catalogue()
    sample = catalogue["samples"][key]
    dataset = catalogue["datasets"][sample["dataset"]]
    kwargs: dict[str, Any] = {}
    if source.origin != "fallback":
        if sample.get("modality"):
            kwargs["modality"] = sample["modality"]
        if sample.get("spacing"):
            kwargs["spacing"] = tuple(sample["spacing"])
    volumes = read(list(source.paths), **kwargs) if kwargs else read(list(source.paths))
    info = {
        "key": key,
        "origin": source.origin,
        "from": source.detail,
        "dataset": dataset["title"]
        if source.origin != "fallback"
        else f"dependency test file {source.detail}",
        "licence": dataset["licence"] if source.origin != "fallback" else "see the dependency's licence",
        "citation": dataset.get("citation", "") if source.origin != "fallback" else "",
    }
    names = [v.name for v in volumes]
    for v in volumes:
        v.metadata["sample"] = info
        if v.is_label and names.count(v.name) > 1:
            v.name = f"{v.name} labels"
        if source.origin == "fallback":
            v.name = f"{v.name} ({source.detail}, fallback)"
    return volumes
