"""The model zoo: publish a trained checkpoint, list, read cards, load with sha256 checks, fetch by URL."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch
import yaml

from napari_medssl import zoo
from napari_medssl.engine import TrainConfig, train
from napari_medssl.engine.build import resolve_checkpoint
from napari_medssl.models import read_checkpoint
from napari_medssl.testing.training import TINY_UNET, one_thread, small_msd  # noqa: F401


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


SHIPPED = "unet_tiny_hippocampus"


def test_cards_ship_in_the_package_once_and_match_the_checkouts_weights():
    """One copy of each card (``napari_medssl/zoo_cards/<name>.yaml``), none left in the checkout's models/,
    and each card's sha256 is that of the checkout's weights."""
    shipped = sorted(p.stem for p in zoo.PACKAGE_CARDS.glob("*.yaml"))
    assert len(shipped) >= 11 and SHIPPED in shipped
    assert not list(zoo.REPO_MODELS.glob("*/card.yaml")), "cards belong in napari_medssl/zoo_cards/"
    for name in shipped:
        card = zoo.card(name)
        assert card["name"] == name and card["folder"] is None
        assert card["weights"]["url"] == f"{zoo.ZOO_URL}/{name}/model.safetensors"
        assert zoo.sha256_file(zoo.REPO_MODELS / name / "model.safetensors") == card["weights"]["sha256"]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The zoo as an installed package sees it: no checkout folder, an empty cache, no local folders."""
    monkeypatch.setattr(zoo, "CHECKOUT", tmp_path / "not_a_checkout")
    monkeypatch.delenv("MEDSSL_MODELS_DIR", raising=False)
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def test_mirror_then_offline_from_the_cache(installed, monkeypatch):
    from helpers_mirror import mirror_folder, serve

    src = zoo.REPO_MODELS / SHIPPED / "model.safetensors"
    assert zoo.zoo_dirs() == [] and SHIPPED in zoo.list_zoo()
    folder = mirror_folder(installed / "mirror", {SHIPPED: src})
    with serve(folder) as (url, hits):
        monkeypatch.setenv("MEDSSL_ZOO_URL", url + "/")
        assert zoo.card(SHIPPED)["weights"]["url"] == f"{url}/{SHIPPED}/model.safetensors"
        path = zoo.weights_path(SHIPPED)
        assert hits == [f"/{SHIPPED}/model.safetensors"]
    assert path.parent == installed / "cache" and zoo.sha256_file(path) == zoo.sha256_file(src)
    assert zoo.weights_path(SHIPPED) == path  # server stopped: from the cache, sha256-checked
    assert zoo.load(SHIPPED).num_classes == 3
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(installed / "empty_cache"))
    with pytest.raises(FileNotFoundError, match="set MEDSSL_ZOO_URL to a mirror or MEDSSL_MODELS_DIR"):
        zoo.weights_path(SHIPPED)  # nothing cached there and the mirror is gone


def test_a_mirror_serving_other_bytes_is_refused_and_nothing_is_cached(installed, monkeypatch):
    from helpers_mirror import mirror_folder, serve

    wrong = zoo.REPO_MODELS / "mim_tiny_hippocampus" / "model.safetensors"  # real weights, of another model
    with serve(mirror_folder(installed / "mirror", {SHIPPED: wrong})) as (url, hits):
        monkeypatch.setenv("MEDSSL_ZOO_URL", url)
        with pytest.raises(ValueError, match="fail their sha256 check .* nothing was cached"):
            zoo.weights_path(SHIPPED)
        assert len(hits) == 1
    cache = installed / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_local_weights_win_without_network(tmp_path, monkeypatch):
    """From a checkout, and from a MEDSSL_MODELS_DIR folder holding only weights: no request is made (the
    mirror named is a closed port)."""
    monkeypatch.setenv("MEDSSL_ZOO_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("MEDSSL_CACHE_DIR", str(tmp_path / "cache"))
    assert zoo.weights_path(SHIPPED) == zoo.REPO_MODELS / SHIPPED / "model.safetensors"
    local = tmp_path / "site_models"
    (local / SHIPPED).mkdir(parents=True)
    (local / SHIPPED / "model.safetensors").write_bytes(
        (zoo.REPO_MODELS / SHIPPED / "model.safetensors").read_bytes()
    )
    monkeypatch.setenv("MEDSSL_MODELS_DIR", str(local))
    monkeypatch.setattr(zoo, "CHECKOUT", tmp_path / "not_a_checkout")
    assert zoo.weights_path(SHIPPED) == local / SHIPPED / "model.safetensors"
    assert not (tmp_path / "cache").exists()


def test_publish_into_the_checkout_writes_the_card_into_the_package(trained, tmp_path, monkeypatch):
    """The default destination: weights to models/<name>/, the card to napari_medssl/zoo_cards/<name>.yaml."""
    monkeypatch.setattr(zoo, "REPO_MODELS", tmp_path / "models")
    monkeypatch.setattr(zoo, "PACKAGE_CARDS", tmp_path / "zoo_cards")
    (tmp_path / "zoo_cards").mkdir()
    folder = _publish(*trained, dest=None, name="unet_tiny_published")
    assert folder == tmp_path / "models" / "unet_tiny_published"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    card = yaml.safe_load((tmp_path / "zoo_cards" / "unet_tiny_published.yaml").read_text())
    assert card["weights"]["sha256"] == zoo.sha256_file(folder / "model.safetensors")
    assert "url" not in card["weights"]  # derived from ZOO_URL / $MEDSSL_ZOO_URL, not stored
