"""Shared fixtures. Real-data tests read ``$MEDSSL_DATA_DIR`` (default ``../shared/data``) and fail loudly
when it is missing: they are never skipped silently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("MEDSSL_DATA_DIR")
    # absolute: tests symlink into it from temporary folders
    return (Path(env) if env else REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real medical images (../shared/data). Fails, not skips, when absent."""
    d = _data_dir()
    if not (d / "README.md").is_file():
        pytest.fail(
            f"real test data not found at {d}; set MEDSSL_DATA_DIR or put ../shared/data beside the checkout"
        )
    return d


@pytest.fixture(scope="session")
def test_output() -> Path:
    """Folder for screenshots and other artefacts a person should look at."""
    d = Path(os.environ.get("MEDSSL_TEST_OUTPUT", REPO / "test-output"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def orthanc_url(tmp_path_factory: pytest.TempPathFactory):
    """A real Orthanc PACS (DICOMweb root URL) for the session; fails, not skips, when Orthanc is missing."""
    from helpers_orthanc import orthanc

    with orthanc(tmp_path_factory.mktemp("orthanc")) as url:
        yield url
