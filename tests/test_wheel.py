"""A non-editable install works: the built wheel carries the manifest, the entry points, the catalogue and the
zoo's cards, and, installed in a fresh virtual environment outside the checkout, lists the zoo and predicts
with a zoo model fetched through a mirror, then offline from the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ZOO_MODEL = "unet_tiny_hippocampus"
HIPPO = "hippocampus/imagesTr/hippocampus_001.nii.gz"


def _build_wheel(wheel_dir: Path) -> Path:
    """Build from a clean copy of the sources the wheel is made of: a stale ``build/`` in the checkout (setuptools
    never prunes it) cannot leak deleted files into the wheel, and the checkout gets no build artefacts."""
    src = wheel_dir / "src"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, src / name)
    for name in ("napari_medssl", "sample_data"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(src),
        ],
        check=True,
        timeout=300,
        cwd=wheel_dir,
    )
    (wheel,) = wheel_dir.glob("napari_medssl-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_non_editable_install_has_manifest_entry_points_and_catalogue(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    assert (target / "napari_medssl" / "napari.yaml").is_file()
    assert (target / "napari_medssl" / "models" / "vit.py").is_file()
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "napari-medssl = napari_medssl:napari.yaml" in entry_points
    assert "medssl = napari_medssl.engine.cli:main" in entry_points
    assert any(n.endswith("sample_data/catalogue.yaml") for n in names)
    assert f"napari_medssl/zoo_cards/{ZOO_MODEL}.yaml" in names
    assert not any(n.endswith(".safetensors") for n in names)  # weights come from the release assets
    assert not any(n.startswith("tests/") for n in names)
    # the installed copy (not the checkout) imports and finds its manifest
    code = (
        "import napari_medssl, pathlib, sys; p = pathlib.Path(napari_medssl.__file__).parent; "
        "assert str(p).startswith(sys.argv[1]), p; print((p / 'napari.yaml').read_text().split()[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "napari-medssl"


def _fresh_venv(root: Path, wheel: Path) -> Path:
    """A virtual environment outside the checkout with the wheel installed; its dependencies (torch ...) come
    from this interpreter's site-packages through a path-only ``.pth`` line, so nothing is downloaded and the
    editable install there (a meta-path finder set up by its own ``.pth``) is not activated."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # the wheel first, into a clean environment (pip would otherwise see the editable install's metadata)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    Path(purelib, "shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def _medssl(venv: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "medssl"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_wheel_install_lists_the_zoo_and_predicts_through_a_mirror_then_offline(
    wheel: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from helpers_mirror import mirror_folder, serve

    from napari_medssl import io
    from napari_medssl.engine.cli import main

    venv = _fresh_venv(tmp_path / "venv", wheel)
    work = tmp_path / "elsewhere"  # outside the checkout, no PYTHONPATH, no MEDSSL_MODELS_DIR
    work.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "MEDSSL_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import napari_medssl; print(napari_medssl.__file__)"],
        capture_output=True, text=True, env=env, cwd=work,
    )  # fmt: skip
    assert where.stdout.startswith(str(venv)), where.stderr
    listed = _medssl(venv, "zoo", env=env, cwd=work)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) >= 11 and f"{ZOO_MODEL}\tsegment" in listed.stdout

    image = data_dir / HIPPO
    args = ("predict", "--model", ZOO_MODEL, "--input", str(image), "--device", "cpu", "--output")
    weights = REPO / "models" / ZOO_MODEL / "model.safetensors"
    mirror = mirror_folder(tmp_path / "mirror", {ZOO_MODEL: weights})
    with serve(mirror) as (url, hits):
        env["MEDSSL_ZOO_URL"] = url
        first = _medssl(venv, *args, str(work / "mirror.nii.gz"), env=env, cwd=work)
        assert first.returncode == 0, first.stderr
        assert hits == [f"/{ZOO_MODEL}/model.safetensors"]
    assert (tmp_path / "cache" / f"{ZOO_MODEL}.safetensors").read_bytes() == weights.read_bytes()
    offline = _medssl(venv, *args, str(work / "offline.nii.gz"), env=env, cwd=work)  # the mirror is gone
    assert offline.returncode == 0, offline.stderr

    assert main([*args, str(tmp_path / "checkout.nii.gz")]) == 0  # the checkout's own weights, in-process
    capsys.readouterr()
    expected = io.read_nifti(tmp_path / "checkout.nii.gz")
    for name in ("mirror.nii.gz", "offline.nii.gz"):
        got = io.read_nifti(work / name)
        np.testing.assert_array_equal(got.data, expected.data)
        np.testing.assert_allclose(got.affine, expected.affine)
    assert len(np.unique(expected.data)) == 3  # a real segmentation: background and both hippocampus labels

    # a mirror serving other bytes: one clear line, exit 1, nothing cached as valid
    env["MEDSSL_CACHE_DIR"] = str(tmp_path / "cache2")
    wrong = mirror_folder(
        tmp_path / "wrong", {ZOO_MODEL: REPO / "models" / "mim_tiny_hippocampus" / "model.safetensors"}
    )
    with serve(wrong) as (url, hits):
        env["MEDSSL_ZOO_URL"] = url
        bad = _medssl(venv, *args, str(work / "bad.nii.gz"), env=env, cwd=work)
    assert bad.returncode == 1 and "fail their sha256 check" in bad.stderr and "Traceback" not in bad.stderr
    assert not (work / "bad.nii.gz").exists() and len(hits) == 1
    cache2 = tmp_path / "cache2"
    assert not cache2.exists() or not [p for p in cache2.rglob("*") if p.is_file()]
    shutil.rmtree(venv)
