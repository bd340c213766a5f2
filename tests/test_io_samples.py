"""The sample-data catalogue: its entries, local copies, the pooch cache and the real fallbacks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_medssl import _sample_data
from napari_medssl.io import SampleDataUnavailable, list_samples, load_catalogue, load_sample, resolve_sample
from napari_medssl.io.samples import catalogue_path, sha256_of


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No local data folder, no network, an empty cache."""
    monkeypatch.delenv("MEDSSL_DATA_DIR", raising=False)
    monkeypatch.setenv("MEDSSL_OFFLINE", "1")
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch, data_dir: Path, tmp_path: Path) -> Path:
    monkeypatch.setenv("MEDSSL_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MEDSSL_OFFLINE", "1")
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache"))
    return data_dir


def test_catalogue_entries_are_complete() -> None:
    assert catalogue_path().parent.name == "sample_data"
    cat = load_catalogue()
    for key, ds in cat["datasets"].items():
        for field in ("title", "modality", "licence", "citation", "homepage", "folder"):
            assert ds.get(field), f"dataset {key} lacks {field}"
        if "base_url" in ds:
            assert ds["base_url"].startswith("https://") and ds["files"]
            assert all(h.startswith("sha256:") and len(h) == 7 + 64 for h in ds["files"].values())
        if "archive" in ds:
            assert ds["archive"]["url"].startswith("https://") and ds["archive"]["hash"].partition(":")[
                0
            ] in ("md5", "sha256")
    for key, sample in cat["samples"].items():
        assert sample["dataset"] in cat["datasets"] and sample["open"], key
        assert (sample.get("fallback") or "pydicom:").split(":")[0] in ("pydicom", "nibabel")
    assert list_samples()["hippocampus"].startswith("Hippocampus")


def test_catalogue_hashes_match_the_local_copies(data_dir: Path) -> None:
    checked = 0
    for ds in load_catalogue()["datasets"].values():
        for rel, known in (ds.get("files") or {}).items():
            assert sha256_of(data_dir / ds["folder"] / rel) == known, rel
            checked += 1
    assert checked >= 23


def test_samples_load_from_the_local_folder(local: Path) -> None:
    image, mask = load_sample("mr_glioblastoma")
    assert image.name == "T1post" and mask.is_label and mask.metadata["reference_series"] == "T1post"
    assert image.metadata["sample"]["origin"] == "local" and "CC" in image.metadata["sample"]["licence"]
    image, labels = load_sample("hippocampus")
    assert labels.is_label and labels.name == "hippocampus_001 labels" and image.name == "hippocampus_001"
    (mammo,) = load_sample("mammogram")
    assert mammo.modality == "MG" and mammo.spacing == (0.2, 0.2)
    layers = _sample_data.ct_dicom()
    assert [t for _, _, t in layers] == ["image"] and layers[0][0].shape == (20, 512, 512)


def test_pooch_cache_is_used_offline_and_checked(
    local: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MEDSSL_DATA_DIR")
    cache = tmp_path / "cache" / "totalsegmentator_ct_nifti"
    cache.mkdir(parents=True)
    shutil.copy(local / "nifti/example_ct.nii.gz", cache / "example_ct.nii.gz")
    source = resolve_sample("ct_nifti")
    assert source.origin == "cache" and source.paths == (cache / "example_ct.nii.gz",)
    (cache / "example_ct.nii.gz").write_bytes(b"corrupted")  # a bad cached file is not trusted
    assert resolve_sample("ct_nifti").origin == "fallback"


def test_fallbacks_are_real_images_from_dependencies(offline: Path) -> None:
    (ct,) = load_sample("ct_dicom")
    assert ct.name == "CT_small (pydicom:CT_small.dcm, fallback)"
    assert (
        ct.modality == "CT" and ct.data.shape == (128, 128) and ct.metadata["sample"]["origin"] == "fallback"
    )
    (mr,) = load_sample("mr_glioblastoma")
    assert mr.modality == "MR" and mr.data.shape == (64, 64)
    (anat,) = load_sample("hippocampus")
    assert anat.data.ndim == 3 and anat.name.startswith("anatomical") and np.ptp(anat.data) > 0
    with pytest.raises(SampleDataUnavailable, match="MEDSSL_DATA_DIR .* mammography_mias"):
        load_sample("mammogram")
    with pytest.raises(KeyError, match="unknown sample"):
        load_sample("nope")
