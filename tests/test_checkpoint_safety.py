"""A pickle checkpoint that would run code when unpickled is refused everywhere a checkpoint can come in.

The payload is real: unpickling it calls ``pathlib.Path.touch`` on a marker file (a control test shows that
``torch.load(..., weights_only=False)`` does create it). Through the ``medssl`` CLI, the library loaders, the
DINO importer and the viewer's Model and Fine-tune docks, the file is refused with a one-line ``ValueError``
and the marker never appears.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from napari_medssl import zoo
from napari_medssl.engine.cli import main as medssl
from napari_medssl.models import create_model, load_model, read_checkpoint, save_model
from napari_medssl.testing.training import TINY_UNET

pytestmark = pytest.mark.timeout(180)

HIPPO = "hippocampus/imagesTr/hippocampus_001.nii.gz"


class TouchOnUnpickle:
    """Unpickling this object calls ``Path(target).touch()``: code execution from a 'checkpoint'."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A torch checkpoint with real U-Net weights and the payload next to them."""
    model = create_model("unet_tiny", **TINY_UNET)
    torch.save(
        {"state_dict": model.state_dict(), "config": dict(model.config), "hook": TouchOnUnpickle(marker)},
        path,
    )
    return path


@pytest.fixture
def evil(tmp_path: Path) -> dict[str, Path]:
    """The payload as .pt, .pth, .ckpt, a plain pickle and a pickle renamed .safetensors; plus its marker."""
    marker = tmp_path / "PWNED"
    files = {"marker": marker}
    for suffix in (".pt", ".pth", ".ckpt"):
        files[suffix] = evil_checkpoint(tmp_path / f"evil{suffix}", marker)
    files["pickle"] = tmp_path / "evil.pkl"
    files["pickle"].write_bytes(pickle.dumps({"weights": [1.0], "hook": TouchOnUnpickle(marker)}))
    files[".safetensors"] = tmp_path / "evil.safetensors"
    files[".safetensors"].write_bytes(files[".pt"].read_bytes())
    return files


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: a loader that unpickles (weights_only=False) does create the marker."""
    marker = tmp_path / "control"
    torch.load(evil_checkpoint(tmp_path / "control.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_library_loaders_refuse_pickles(evil: dict[str, Path]) -> None:
    from napari_medssl.engine.build import build_model
    from napari_medssl.models.dino_import import load_dino_checkpoint

    for key in (".pt", ".pth", ".ckpt", "pickle", ".safetensors"):
        for load in (read_checkpoint, load_model, lambda p: zoo.load(p, device="cpu")):
            with pytest.raises(ValueError, match="not a safetensors checkpoint"):
                load(evil[key])
        with pytest.raises(ValueError, match="not a safetensors checkpoint"):
            build_model(str(evil[key]), "segment", num_classes=3)
        with pytest.raises(ValueError, match="refused|not a"):
            load_dino_checkpoint(evil[key], create_model("vit_tiny", img_size=32, patch_size=8))
    assert not evil["marker"].exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("medssl")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "napari_medssl.engine.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=150)


def test_medssl_predict_refuses_a_pickle_in_one_line(
    evil: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "labels.nii.gz"
    proc = _cli(
        "predict", "--model", str(evil[".pt"]), "--input", str(data_dir / HIPPO), "--output", str(out)
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        lines[0].startswith("medssl predict: error:") and "safetensors" in lines[0] and "evil.pt" in lines[0]
    )
    assert not out.exists() and not evil["marker"].exists()


@pytest.mark.parametrize("command", ["predict", "finetune", "evaluate", "pretrain"])
def test_every_cli_command_refuses_a_renamed_pickle(
    evil: dict[str, Path], data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    model = str(evil[".safetensors"])
    args = {
        "predict": ["--input", str(data_dir / HIPPO), "--output", str(tmp_path / "l.nii.gz")],
        "finetune": [
            "--task",
            "segment",
            "--data",
            str(data_dir / "hippocampus"),
            "--out",
            str(tmp_path / "r"),
        ],
        "evaluate": ["--data", str(data_dir / "hippocampus"), "--out", str(tmp_path / "m.json")],
        "pretrain": ["--data", str(data_dir / "hippocampus"), "--out", str(tmp_path / "r")],
    }[command]
    assert medssl([command, "--model", model, *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medssl {command}: error:") and "safetensors" in err[0]
    assert not evil["marker"].exists()


def test_a_checkpoint_config_cannot_name_arbitrary_code(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The config JSON in a safetensors file only selects registered builders and their keyword arguments."""
    model = create_model("unet_tiny", **TINY_UNET)
    good = save_model(model, tmp_path / "good.safetensors")
    state, config, _ = read_checkpoint(good)
    from safetensors.torch import save_file

    for name, cfg in {
        "import": {"name": "__import__"},
        "kwargs": {**config, "no_such_option": 1},
        "nested": {**config, "levels": {"__class__": "os.system"}},
    }.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata={"config": json.dumps(cfg), "extra": "{}"})
        with pytest.raises(ValueError):
            load_model(path)
        assert (
            medssl(["predict", "--model", str(path), "--input", str(tmp_path), "--output", "x.nii.gz"]) == 1
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in "\n".join(err), err


@pytest.mark.gui
def test_viewer_model_picker_refuses_a_pickle(make_napari_viewer, evil: dict[str, Path], monkeypatch) -> None:
    from napari_medssl._widgets import model_widget
    from napari_medssl._widgets.model_widget import ModelWidget
    from napari_medssl.resolve import describe

    errors: list[str] = []
    monkeypatch.setattr("napari_medssl._widgets._common.show_error", errors.append)
    viewer = make_napari_viewer()
    dock = ModelWidget(viewer)
    for key in (".safetensors", ".pt"):
        with pytest.raises(ValueError, match="not a safetensors checkpoint"):
            model_widget.load_model(str(evil[key]), "cpu")  # the dock's pure loader
        with pytest.raises(ValueError, match="not a safetensors checkpoint"):
            describe(str(evil[key]))  # what the docks read to learn a model's facts
        dock.select(str(evil[key]))  # as if picked in the file dialog
        assert errors and "not a safetensors checkpoint" in errors[-1]
        assert "choose a model" not in dock.card_label.text() and "model</b>" not in dock.card_label.text()
        viewer.add_image(torch.rand(8, 8).numpy(), name="img")
        assert dock.run() is None  # Run refuses too: no worker starts
        assert "not a safetensors checkpoint" in errors[-1]
    assert not evil["marker"].exists()
