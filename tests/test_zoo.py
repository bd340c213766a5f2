"""The model zoo: publish a trained checkpoint, list, read cards, load with sha256 checks, fetch by URL."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch
import yaml
from helpers_engine import TINY_UNET, one_thread, small_msd  # noqa: F401

from napari_medssl import zoo
from napari_medssl.engine import TrainConfig, train
from napari_medssl.engine.build import resolve_checkpoint
from napari_medssl.models import read_checkpoint


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A real (two-step) hippocampus segmenter."""
    root = tmp_path_factory.mktemp("zoo_run")
    msd = small_msd(data_dir, root / "msd", n=3)
    cfg = TrainConfig(
        model="unet_tiny",
        task="segment",
        data=str(msd),
        out_dir=str(root / "run"),
        max_steps=2,
        batch_size=4,
        val_every=2,
        model_overrides=dict(TINY_UNET),
    )
    done = list(train(cfg))[-1]
    return done["best_path"], done["metrics"]


@pytest.fixture
def zoo_dir(tmp_path, monkeypatch):
    d = tmp_path / "zoo"
    d.mkdir()
    monkeypatch.setenv("MEDSSL_MODELS_DIR", str(d))
    return d


def _publish(ckpt, metrics, dest, name="unet_tiny_hippocampus"):
    return zoo.publish(
        ckpt,
        name,
        description="test U-Net",
        command="medssl finetune ...",
        metrics=metrics,
        metrics_command="medssl evaluate ...",
        data={"name": "MSD Hippocampus", "licence": "CC-BY-SA 4.0"},
        licence="CC-BY-SA 4.0",
        dest=dest,
        split={"seed": 0},
    )


def test_publish_list_card_load(trained, zoo_dir):
    ckpt, metrics = trained
    folder = _publish(ckpt, metrics, zoo_dir)
    assert "unet_tiny_hippocampus" in zoo.list_zoo() and zoo.zoo_dirs()[0] == zoo_dir
    card = zoo.card("unet_tiny_hippocampus")
    for field in zoo.CARD_FIELDS:
        if field not in ("classes", "domain"):  # domain: optional (the shipped cards all have one)
            assert card.get(field) is not None, field
    assert card["architecture"]["name"] == "unet_tiny" and card["task"] == "segment"
    assert card["weights"]["sha256"] == zoo.sha256_file(folder / "model.safetensors")
    model = zoo.load("unet_tiny_hippocampus")
    assert model.card["name"] == "unet_tiny_hippocampus" and not model.training
    saved = read_checkpoint(ckpt)[0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])
    assert resolve_checkpoint("unet_tiny_hippocampus") == folder / "model.safetensors"
    assert zoo.load(ckpt).card is None  # a plain checkpoint path loads too


def test_tampered_weights_and_bad_cards_are_refused(trained, zoo_dir):
    folder = _publish(*trained, zoo_dir)
    with open(folder / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="sha256"):
        zoo.load("unet_tiny_hippocampus")
    card = yaml.safe_load((folder / "card.yaml").read_text())
    del card["weights"]["sha256"]
    (folder / "card.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(ValueError, match="weights.sha256"):
        zoo.card("unet_tiny_hippocampus")
    with pytest.raises(ValueError, match="no zoo model"):
        zoo.load("nothing_here")
    with pytest.raises(FileNotFoundError):
        zoo.load(zoo_dir / "missing.safetensors")
    with pytest.raises(ValueError, match="at most"):
        zoo.publish(
            trained[0],
            "big",
            description="",
            command="",
            metrics={},
            metrics_command="",
            data={},
            licence="",
            dest=zoo_dir,
            max_mb=0.001,
        )


def test_weights_fetched_by_url_and_checked(trained, zoo_dir, tmp_path, monkeypatch):
    folder = _publish(*trained, zoo_dir)
    served = tmp_path / "served"
    served.mkdir()
    (folder / "model.safetensors").rename(served / "w.safetensors")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache"))
    try:
        card = yaml.safe_load((folder / "card.yaml").read_text())
        card["weights"]["url"] = f"http://127.0.0.1:{server.server_port}/w.safetensors"
        (folder / "card.yaml").write_text(yaml.safe_dump(card))
        path = zoo.weights_path("unet_tiny_hippocampus")
        assert path.parent == tmp_path / "cache" and zoo.sha256_file(path) == card["weights"]["sha256"]
        assert zoo.load("unet_tiny_hippocampus").num_classes == 3
        card["weights"]["sha256"] = "0" * 64
        (folder / "card.yaml").write_text(yaml.safe_dump(card))
        path.unlink()
        with pytest.raises(ValueError, match="(?i)hash"):
            zoo.weights_path("unet_tiny_hippocampus")
    finally:
        server.shutdown()
