"""The npe2 manifest validates, every ``python_name`` in it imports, and the core imports stay light."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from npe2 import PluginManifest

import napari_medssl

MANIFEST = Path(napari_medssl.__file__).parent / "napari.yaml"
HEAVY = (
    "torch",
    "torchvision",
    "timm",
    "qtpy",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "napari",
    "magicgui",
    "vispy",
)


def test_npe2_validate_passes() -> None:
    """``npe2 validate napari-medssl`` on the installed distribution, python names imported too."""
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-medssl", "--imports"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_installed_manifest_is_the_package_one() -> None:
    installed = PluginManifest.from_distribution("napari-medssl")
    assert installed.name == "napari-medssl"
    assert installed == PluginManifest.from_file(MANIFEST)


@pytest.mark.parametrize(
    "command", PluginManifest.from_file(MANIFEST).contributions.commands, ids=lambda c: c.id
)
def test_every_python_name_imports(command) -> None:
    if command.python_name is None:
        pytest.fail(f"command {command.id} has no python_name")
    module_name, _, attr_path = command.python_name.partition(":")
    obj = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    assert callable(obj), f"{command.python_name} is not callable"


def test_manifest_offers_readers_writers_and_samples() -> None:
    contributions = PluginManifest.from_file(MANIFEST).contributions
    patterns = {p for r in contributions.readers for p in r.filename_patterns}
    assert {"*.dcm", "*.nii", "*.nii.gz", "*.png", "*.tif"} <= patterns
    assert any(r.accepts_directories for r in contributions.readers)
    assert {ext for w in contributions.writers for ext in w.filename_extensions} >= {
        ".nii.gz",
        ".png",
        ".tiff",
    }
    assert {s.key for s in contributions.sample_data} >= {
        "ct_dicom",
        "mr_glioblastoma",
        "hippocampus",
        "mammogram",
    }


@pytest.mark.parametrize("module", ["napari_medssl", "napari_medssl.io"])
def test_import_loads_neither_torch_nor_qt(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing {module} loaded {result.stdout.strip()}"


QT = ("qtpy", "napari", "magicgui", "PyQt5", "PyQt6", "PySide2", "PySide6", "vispy")
QT_MODULES = ("_widgets", "_reader", "_writer", "_sample_data", "_launch", "__main__")  # the only ones allowed Qt


def core_modules() -> list[str]:
    """Every module of the package outside the napari adapters (:data:`QT_MODULES`)."""
    root = Path(napari_medssl.__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in QT_MODULES:
            continue
        names.append(".".join(["napari_medssl", *(p for p in parts if p != "__init__")]))
    return names


def test_core_modules_import_without_qt() -> None:
    """Each core module, imported in turn in one fresh interpreter, brings in no Qt, napari or magicgui."""
    modules = core_modules()
    assert "napari_medssl.engine.loop" in modules and "napari_medssl.models.spec" in modules
    code = (
        "import importlib, json, sys\n"
        f"qt = {QT!r}\n"
        "bad = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    importlib.import_module(name)\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in qt)\n"
        "    if loaded:\n"
        "        bad[name] = loaded\n"
        "        break\n"
        "print(json.dumps(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(modules)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}, result.stdout
