"""Training runs on real data: events, checkpoints, exact resume, crash safety, best kept, all tasks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from napari_medssl.engine import ArrayData, MSDFolder, TrainConfig, Trainer, read_events, train
from napari_medssl.engine.checkpoint import RunFolder
from napari_medssl.engine.evaluate import evaluate_cases
from napari_medssl.models import load_model, read_checkpoint
from napari_medssl.testing import training as helpers_engine
from napari_medssl.testing.training import TINY_MAE, TINY_UNET, TINY_VIT, one_thread, small_mias, small_msd  # noqa: F401


@pytest.fixture(scope="module")
def msd(data_dir, tmp_path_factory):
    return small_msd(data_dir, tmp_path_factory.mktemp("msd"), n=5)


def seg_config(data, out, **kw) -> TrainConfig:
    """The shared tiny U-Net run, a little longer here (4 steps of 4 slices) on the default device."""
    return helpers_engine.seg_config(
        data, out, **{"max_steps": 4, "batch_size": 4, "lr": 3e-3, "device": "auto", **kw}
    )


def test_segmentation_run_events_files_and_checkpoint(msd, tmp_path):
    events = list(train(seg_config(msd, tmp_path / "run")))
    kinds = [e["event"] for e in events]
    assert kinds.count("step") == 4 and kinds.count("val") == 2 and kinds[-1] == "done"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) and e["total_steps"] == 4 for e in steps)
    val = [e for e in events if e["event"] == "val"][-1]["metrics"]
    assert {"dice_1", "dice_2", "iou_1", "iou_2", "mean_dice", "mean_iou"} <= set(val)
    json.dumps(events)  # plain values only: they cross process boundaries
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 4
    best = events[-1]["best_path"]
    _, config, extra = read_checkpoint(best)
    assert config["name"] == "unet_tiny" and extra["task"] == "segment"
    assert extra["split_val"] == split["val"] and extra["sample_size"] == [64, 48]
    model = load_model(best)
    assert model.num_classes == 3
    assert [e["event"] for e in read_events(run)] == ["start", "val", "val"]


def _weights(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def test_resume_continues_exactly(msd, tmp_path):
    straight = list(train(seg_config(msd, tmp_path / "a")))
    gen = train(seg_config(msd, tmp_path / "b"))
    for event in gen:  # stop after the step-2 checkpoint, as if the process were killed
        if event["event"] == "checkpoint" and event["step"] == 2 and not event["best"]:
            break
    gen.close()
    assert json.loads((tmp_path / "b/last.json").read_text())["step"] == 2
    resumed = list(train(seg_config(msd, tmp_path / "b")))
    assert [e["step"] for e in resumed if e["event"] == "step"] == [3, 4]
    a, b = _weights(straight[-1]["last_path"]), _weights(resumed[-1]["last_path"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    loss_a = [e["loss"] for e in straight if e["event"] == "step"][2:]
    loss_b = [e["loss"] for e in resumed if e["event"] == "step"]
    assert loss_a == pytest.approx(loss_b, abs=1e-6)


def test_crash_mid_write_keeps_last_good_checkpoint(msd, tmp_path, monkeypatch):
    run = tmp_path / "run"
    list(train(seg_config(msd, run, max_steps=2)))
    good = json.loads((run / "last.json").read_text())
    # a crash while writing step 4: a half-written temp file and a truncated weights file nobody points to
    (run / ".step_0000004.safetensors.tmp999").write_bytes(b"\x00" * 100)
    (run / "step_0000004.safetensors").write_bytes(b"trunc")
    folder = RunFolder(run)
    assert folder.read_last()["weights"] == good["weights"]
    load_model(run / good["weights"])  # the last good checkpoint still loads

    # a crash inside the commit itself: the rename of last.json fails
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("last.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        list(train(seg_config(msd, run, max_steps=4)))
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((run / "last.json").read_text()) == good
    assert not list(run.glob(".last.json.tmp*"))  # the failed commit left no temp file behind
    resumed = list(train(seg_config(msd, run, max_steps=4)))  # resumes from step 2 and cleans up
    assert [e["step"] for e in resumed if e["event"] == "step"] == [3, 4]
    assert not (run / "step_0000002.safetensors").exists() and (run / "step_0000004.safetensors").exists()
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    load_model(run / "step_0000004.safetensors")


def test_best_checkpoint_follows_the_validation_metric(msd, tmp_path):
    events = list(train(seg_config(msd, tmp_path / "run", max_steps=6, val_every=2, lr=1e-2)))
    vals = [e for e in events if e["event"] == "val"]
    bests = [e["step"] for e in events if e["event"] == "checkpoint" and e["best"]]
    running, expected = -1.0, []
    for v in vals:
        if v["metrics"]["mean_dice"] > running:
            running = v["metrics"]["mean_dice"]
            expected.append(v["step"])
    assert bests == expected
    _, _, extra = read_checkpoint(tmp_path / "run/best.safetensors")
    assert extra["metrics"]["mean_dice"] == pytest.approx(running)
    assert events[-1]["metrics"]["mean_dice"] == pytest.approx(running)


def test_painted_labels_train_with_ignore_index(data_dir, tmp_path):
    img, lab = MSDFolder(small_msd(data_dir, tmp_path / "msd", n=2)).cases()[0].load()
    painted = np.zeros_like(lab)
    for z in (8, 12, 16):  # a clinician painted three slices: 1 background, 2 and 3 hippocampus
        painted[z] = lab[z] + 1
    data = ArrayData([img[0], img[0]], [painted, painted], ids=["a", "b"])
    cfg = TrainConfig(
        model="unet_tiny",
        task="segment",
        data=data,
        out_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        val_every=2,
        ignore_index=0,
        label_map={1: 0, 2: 1, 3: 2},
        model_overrides=dict(TINY_UNET),
        val_fraction=0.5,
    )
    trainer = Trainer(cfg)
    events = list(trainer.run())
    assert len(trainer.train_set) == 3 and trainer.num_classes == 3
    assert events[-1]["metrics"]["n_cases"] == 1.0
    # one painted image (the viewer's usual case): no validation split, the latest checkpoint is the best
    single = ArrayData([img[0]], [painted])
    cfg.data, cfg.out_dir, cfg.max_steps, cfg.val_every = single, str(tmp_path / "one"), 1, 1
    done = list(train(cfg))[-1]
    assert done["best_path"] and load_model(done["best_path"]).num_classes == 3
    assert read_checkpoint(done["best_path"])[2]["label_values"] == [1, 2, 3]  # classes → painted values


def test_classification_and_pretraining_on_mias(data_dir, tmp_path):
    mias = small_mias(data_dir, tmp_path / "mias", n_women=5)
    cls = TrainConfig(
        model="vit_tiny",
        task="classify",
        data=str(mias),
        out_dir=str(tmp_path / "cls"),
        max_steps=2,
        batch_size=4,
        val_every=2,
        model_overrides=dict(TINY_VIT),
    )
    events = list(train(cls))
    metrics = events[-1]["metrics"]
    assert {"accuracy", "balanced_accuracy", "auc"} <= set(metrics)
    split = json.loads((tmp_path / "cls/split.json").read_text())
    women = {int(i[3:6]) + 1 >> 1 for i in split["val"]}
    assert all(f"mdb{2 * w - 1:03d}" in split["val"] and f"mdb{2 * w:03d}" in split["val"] for w in women)
    pre = TrainConfig(
        model="mae_tiny",
        task="pretrain",
        data=str(mias),
        out_dir=str(tmp_path / "pre"),
        max_steps=2,
        batch_size=4,
        val_every=2,
        model_overrides=dict(TINY_MAE),
    )
    events = list(train(pre))
    assert "val_loss" in events[-1]["metrics"] and events[-1]["best_path"]
    fine = TrainConfig(
        model=events[-1]["best_path"],
        task="classify",
        data=str(mias),
        out_dir=str(tmp_path / "fine"),
        max_steps=1,
        batch_size=4,
        val_every=1,
    )
    trainer = Trainer(fine)
    list(trainer.run())
    assert trainer.build_info["loaded"] > 0 and any("head" in k for k in trainer.build_info["skipped"])


def test_3d_model_trains_on_volumes(msd, tmp_path):
    cfg = seg_config(
        msd,
        tmp_path / "run",
        max_steps=2,
        val_every=2,
        patch_size=(32, 32, 32),
        model_overrides={**TINY_UNET, "spatial_dims": 3},
    )
    trainer = Trainer(cfg)
    events = list(trainer.run())
    assert trainer.size == (32, 32, 32) and trainer.train_set[0]["image"].shape == (1, 32, 32, 32)
    assert "mean_dice" in events[-1]["metrics"]


def test_wrong_task_and_bad_model_fail_before_training(msd, tmp_path, data_dir):
    with pytest.raises(ValueError, match="labelled for 'segment'"):
        next(train(seg_config(msd, tmp_path / "a", task="classify")))
    with pytest.raises(ValueError, match="unknown model"):
        next(train(seg_config(msd, tmp_path / "b", model="no_such_model")))
    with pytest.raises(ValueError, match="no pretrain_loss"):
        next(train(seg_config(msd, tmp_path / "c", task="pretrain")))


def test_medmnist_rgb_classifier_and_mixed_source_pretraining(data_dir, tmp_path):
    rgb = TrainConfig(
        model="vit_tiny",
        task="classify",
        data=str(data_dir / "medmnist/retinamnist.npz"),
        out_dir=str(tmp_path / "retina"),
        max_steps=1,
        batch_size=8,
        val_every=1,
        model_overrides={**TINY_VIT, "img_size": 28, "patch_size": 7},
    )
    trainer = Trainer(rgb)
    done = list(trainer.run())[-1]
    assert trainer.model.in_chans == 3 and trainer.num_classes == 5
    assert done["metrics"]["n_samples"] == 120.0  # the official validation split
    mixed = TrainConfig(
        model="mae_tiny",
        task="pretrain",
        out_dir=str(tmp_path / "mixed"),
        max_steps=1,
        batch_size=4,
        val_every=1,
        model_overrides=dict(TINY_MAE),
        val_fraction=0.3,
        data=[
            str(small_msd(data_dir, tmp_path / "msd", n=2)),
            str(small_mias(data_dir, tmp_path / "mias", n_women=2)),
            str(data_dir / "dicom/tcia_btp_PGBM-005_T1post"),
        ],
    )
    trainer = Trainer(mixed)
    done = list(trainer.run())[-1]
    sources = {c.id.split(":")[0] for c in trainer.train_cases + trainer.val_cases}
    assert sources == {"0", "1", "2"} and np.isfinite(done["metrics"]["val_loss"])


class _FakeClock:
    """``time.monotonic`` stand-in that advances ``tick`` seconds per reading."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_ends_the_run_and_decays_the_learning_rate(msd, tmp_path, monkeypatch):
    import napari_medssl.engine.loop as loop

    monkeypatch.setattr(loop.time, "monotonic", _FakeClock(5.0))
    run = tmp_path / "timed"
    cfg = seg_config(msd, run, max_steps=10_000, val_every=1000, max_minutes=1.0, warmup_steps=1)
    events = list(train(cfg))
    steps = [e for e in events if e["event"] == "step"]
    assert 3 <= len(steps) < 20  # the minute ran out long before 10 000 steps
    lrs = [e["lr"] for e in steps]
    assert lrs[1:] == sorted(lrs[1:], reverse=True)  # cosine on time after the warm-up
    assert lrs[-1] < 0.2 * cfg.lr
    vals = [e for e in events if e["event"] == "val"]
    assert len(vals) == 1 and vals[0]["step"] == steps[-1]["step"]  # validated + saved at the end
    last = json.loads((run / "last.json").read_text())
    assert last["step"] == steps[-1]["step"] and last["elapsed_s"] >= 60.0
    assert events[-1]["event"] == "done" and events[-1]["best_path"]

    # a resumed run counts the minutes already spent: with 2 minutes in all, about as many steps again
    more = list(
        train(seg_config(msd, run, max_steps=10_000, val_every=1000, max_minutes=2.0, warmup_steps=1))
    )
    resumed = [e["step"] for e in more if e["event"] == "step"]
    assert resumed and resumed[0] == steps[-1]["step"] + 1 and len(resumed) <= len(steps) + 2
    assert json.loads((run / "last.json").read_text())["elapsed_s"] >= 120.0


def test_time_budget_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(model="unet_tiny", max_minutes=0)


def _expected_ema(snapshots: list[dict[str, torch.Tensor]], cap: float) -> dict[str, torch.Tensor]:
    """The moving average of the weights after each step, with timm's warm-up ``1 - (1 + s)^(-2/3)``."""
    ema = {k: v.clone() for k, v in snapshots[0].items()}  # step 1: a copy
    for step, weights in enumerate(snapshots[1:], start=2):
        decay = min(1 - (1 + step - 1) ** (-2 / 3), cap)
        for k, v in weights.items():
            ema[k] = ema[k] * decay + v * (1 - decay) if v.is_floating_point() else v.clone()
    return ema


def test_weight_average_is_validated_kept_as_best_and_resumes_exactly(msd, tmp_path):
    def run(out: str) -> tuple[list[dict], list[dict[str, torch.Tensor]], Trainer]:
        cfg = seg_config(msd, tmp_path / out, ema_decay=0.5, best_metric="last", device="cpu")
        trainer, events, snaps = Trainer(cfg), [], []
        for event in trainer.run():
            events.append(event)
            if event["event"] == "step":
                snaps.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return events, snaps, trainer

    events, snaps, trainer = run("a")
    want = _expected_ema(snaps, cap=0.5)
    last = json.loads((tmp_path / "a/last.json").read_text())
    saved_ema, raw = _weights(tmp_path / "a" / last["ema"]), _weights(tmp_path / "a" / last["weights"])
    best = _weights(events[-1]["best_path"])
    moved = 0
    for k, v in want.items():
        torch.testing.assert_close(saved_ema[k], v, rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(best[k], v, rtol=0, atol=1e-6, msg=k)  # best = the average
        torch.testing.assert_close(raw[k], snaps[-1][k], rtol=0, atol=1e-6, msg=k)  # training goes on raw
        moved += int(not torch.allclose(raw[k], v))
    assert moved > 0  # the average is not the last weights
    # validation scored the average: the last metrics are the averaged model's, not the raw weights'
    val = [e for e in events if e["event"] == "val"][-1]["metrics"]
    of_best = evaluate_cases(load_model(events[-1]["best_path"]), trainer.val_set, torch.device("cpu"), 4)
    assert of_best["mean_dice"] == pytest.approx(val["mean_dice"], abs=1e-6)

    # killed after the step-2 checkpoint and resumed: the same average as the straight run
    gen = Trainer(seg_config(msd, tmp_path / "b", ema_decay=0.5, best_metric="last", device="cpu")).run()
    for event in gen:
        if event["event"] == "checkpoint" and event["step"] == 2 and not event["best"]:
            break
    gen.close()
    resumed, _, _ = run("b")
    assert [e["step"] for e in resumed if e["event"] == "step"] == [3, 4]
    b = _weights(tmp_path / "b" / json.loads((tmp_path / "b/last.json").read_text())["ema"])
    for k, v in saved_ema.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-6, msg=k)
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == [
        "step_0000004.ema.safetensors",
        "step_0000004.optim.safetensors",
        "step_0000004.safetensors",
    ]

    # a run without an average, continued with one: the average starts from the weights it has
    list(train(seg_config(msd, tmp_path / "c", max_steps=2, device="cpu")))
    more, _, _ = run("c")
    assert [e["step"] for e in more if e["event"] == "step"] == [3, 4]
    assert "ema" in json.loads((tmp_path / "c/last.json").read_text())


def test_weight_average_options_are_checked():
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        TrainConfig(model="unet_tiny", ema_decay=1.0)
    with pytest.raises(ValueError, match="pretraining models keep their own"):
        TrainConfig(model="mae_tiny", task="pretrain", ema_decay=0.99)
