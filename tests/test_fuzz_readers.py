"""Fuzzing the readers with mutated REAL files: only documented errors, no crash, no hang, no runaway memory.

Seeds are real DICOM (uncompressed MR, a TCIA mask, the JPEG 2000 CT), NIfTI (.nii.gz and .nii) and PNG files
from ../shared/data; Hypothesis picks the seed, the mutation and its salt (derandomised: the same inputs on
every run). Every read happens in a watched worker process (``napari_medssl.testing.fuzz.ReaderWorker``): 5 s timeout,
4 GiB address-space cap, peak resident memory measured per read. The long run (thousands of inputs) is
``benchmarks/fuzz_readers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_medssl.testing.fuzz import (
    MUTATORS,
    SEED_FILES,
    SUFFIX,
    ReaderWorker,
    acceptable,
    huge_claims,
    keep_failure,
    make_input,
    seed_bytes,
)

pytestmark = pytest.mark.timeout(120)

MAX_PEAK_MB = 256
"""The largest seed decodes to 5 MB; no mutated file may make a read take more than this much memory."""
EXAMPLES = 400


@pytest.fixture(scope="module")
def worker():
    w = ReaderWorker(timeout=5.0)
    yield w
    w.close()


@pytest.fixture(scope="module")
def seeds(data_dir: Path) -> dict[str, bytes]:
    return seed_bytes(data_dir)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_every_unmutated_seed_reads(worker: ReaderWorker, seeds: dict[str, bytes], scratch: Path) -> None:
    """The seeds are valid: a failure on a mutant is the mutation's doing, not a bad seed."""
    for name, raw in seeds.items():
        path = scratch / f"seed-{name}{SUFFIX[name]}"
        path.write_bytes(raw)
        answer = worker.read(path)
        assert answer["outcome"] == "ok", (name, answer)
        assert answer["peak_mb"] < 64


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.sampled_from(sorted(SEED_FILES)),
    mutator=st.sampled_from(MUTATORS),
    salt=st.integers(0, 2**32 - 1),
)
def test_mutated_real_files_fail_only_with_documented_errors(
    worker: ReaderWorker,
    seeds: dict[str, bytes],
    scratch: Path,
    test_output: Path,
    seed: str,
    mutator: str,
    salt: int,
) -> None:
    path, note = make_input(seeds, seed, mutator, salt, scratch)
    answer = worker.read(path)
    if not acceptable(answer, MAX_PEAK_MB):
        kept = keep_failure(path, answer, note, test_output / "fuzz_failures")
        pytest.fail(f"{note}: {answer} (input kept at {kept})")
    path.unlink()


@pytest.mark.parametrize("fmt", ["dicom", "nifti", "nifti_gz", "png", "nifti_gz_under_limit"])
def test_a_tiny_file_claiming_1e12_voxels_is_refused_before_allocating(
    worker: ReaderWorker, data_dir: Path, scratch: Path, fmt: str
) -> None:
    path = huge_claims(data_dir, scratch / "huge")[fmt]
    assert path.stat().st_size < 1500
    answer = worker.read(path, trace=True)
    assert answer["outcome"] == "refused" and answer["exc"] == "MedicalImageReadError", answer
    assert str(path) in answer["message"]
    assert any(why in answer["message"] for why in ("refusing to allocate", "enormous", "at most 1032x"))
    assert answer["traced_peak_mb"] < 1.0, answer  # numpy and Python allocations while refusing
    assert answer["peak_mb"] < 8.0, answer  # resident memory, C allocations (Pillow, zlib) included
    assert answer["seconds"] < 1.0
