"""A non-editable install works: the built wheel carries the manifest, the entry points and the catalogue."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_has_manifest_entry_points_and_catalogue(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
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
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheel_dir.glob("napari_medssl-*.whl")
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
