"""The separate training process: events relayed, Stop within 2 s (whole tree), no orphans, errors reported;
training cases from painted labels and named boxes; atomic autosave and crash detection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medssl import autosave
from napari_medssl.annotation_samples import UNLABELLED, classification_samples, segmentation_samples
from napari_medssl.finetune_process import TrainingProcess
from napari_medssl.io import read

HERE = Path(__file__).resolve().parent


def _alive(pid: int) -> bool:
    """Running (zombies count as gone: PID 1 in a container may never reap them)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def sleeper_with_grandchild(seconds: float = 60.0):
    """A training target that starts a grandchild process, reports its pid, then keeps 'training'."""
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    yield {"event": "step", "step": 1, "total_steps": 2, "loss": 1.0, "lr": 0.1, "grandchild": child.pid}
    while True:
        time.sleep(0.05)


@pytest.fixture(scope="module")
def hippo(data_dir):
    img = read(data_dir / "hippocampus" / "imagesTr" / "hippocampus_003.nii.gz")[0]
    lab = read(data_dir / "hippocampus" / "labelsTr" / "hippocampus_003.nii.gz")[0]
    return np.asarray(img.data), np.asarray(lab.data)


def painted_from(labels: np.ndarray, every: int = 4) -> np.ndarray:
    painted = np.zeros(labels.shape, np.uint8)
    zs = [z for z in range(labels.shape[0]) if labels[z].any()][::every]
    painted[zs] = labels[zs] + 1
    return painted


def test_segmentation_samples_from_painted_slices(hippo):
    img, lab = hippo
    painted = painted_from(lab)
    s = segmentation_samples(img, painted, model_dims=2)
    zs = [z for z in range(painted.shape[0]) if painted[z].any()]
    assert s["ids"] == [f"slice{z}" for z in zs]
    assert s["classes"] == [0, 1, 2] and s["ignore_index"] == UNLABELLED
    for z, im, y in zip(zs, s["images"], s["labels"]):
        assert np.array_equal(im, img[z])
        assert np.array_equal(y, lab[z].astype(np.int64))  # painted k + 1 -> class k
    whole = segmentation_samples(img, painted, model_dims=3)
    assert len(whole["images"]) == 1 and (whole["labels"][0] == UNLABELLED).sum() == (painted == 0).sum()
    with pytest.raises(ValueError, match="nothing is painted"):
        segmentation_samples(img, np.zeros_like(painted), 2)
    with pytest.raises(ValueError, match="differs"):
        segmentation_samples(img, painted[:-1], 2)


def test_classification_samples_from_named_boxes(data_dir):
    mammo = np.asarray(read(data_dir / "mammography_mias" / "mdb005.png")[0].data)
    items = [
        ("abnormal", (100, 200), (228, 328)),
        ("normal", (500, 500), (564, 600)),
        ("normal", (-10, 0), (20, 20)),
    ]
    s = classification_samples(mammo, items)
    assert s["class_names"] == ["abnormal", "normal"] and s["labels"] == [0, 1, 1]
    assert np.array_equal(s["images"][0], mammo[100:228, 200:328])
    assert s["images"][2].shape == (20, 20)
    with pytest.raises(ValueError, match="not one of"):
        classification_samples(mammo, items, class_names=["NORM", "CALC"])
    with pytest.raises(ValueError, match="at least two"):
        classification_samples(mammo, items[1:])


def test_real_finetune_relays_events_and_stops_within_2s(hippo, tmp_path):
    img, lab = hippo
    s = segmentation_samples(img, painted_from(lab), 2)
    config = dict(
        model="unet_tiny",
        task="segment",
        out_dir=str(tmp_path / "run"),
        max_steps=100_000,
        batch_size=2,
        val_every=100_000,
        num_classes=3,
        ignore_index=UNLABELLED,
        resume=False,
        device="cpu",
        model_overrides={"levels": 2},
    )
    proc = TrainingProcess(
        "napari_medssl.annotation_samples:finetune_events",
        dict(images=s["images"], labels=s["labels"], config=config, ids=s["ids"], validate_on_train=True),
    ).start()
    steps = []
    deadline = time.monotonic() + 90
    while len(steps) < 3 and time.monotonic() < deadline:
        batch = proc.poll()
        assert not [e for e in batch if e["event"] == "error"], batch
        steps += [e for e in batch if e["event"] == "step"]
        time.sleep(0.05)
    assert [e["step"] for e in steps[:3]] == [1, 2, 3]
    assert all(np.isfinite(e["loss"]) and e["total_steps"] == 100_000 for e in steps)
    took = proc.stop()
    assert took < 2.0
    assert not proc.is_alive() and not _alive(proc.pid)
    assert proc.poll() == [{"event": "stopped", "exitcode": proc.exitcode}]
    assert proc.finished and proc.poll() == []


def test_stop_ends_the_whole_process_tree():
    proc = TrainingProcess("test_finetune_process:sleeper_with_grandchild", num_threads=0).start()
    first = next(proc.events())
    grandchild = first["grandchild"]
    assert _alive(grandchild)
    assert proc.stop() < 2.0
    deadline = time.monotonic() + 1.0
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild) and not _alive(proc.pid)


def test_errors_in_the_child_arrive_as_events(tmp_path):
    config = dict(model="no_such_model_xyz", task="segment", out_dir=str(tmp_path / "bad"), max_steps=2)
    img = np.zeros((16, 16), np.float32)
    lab = np.zeros((16, 16), np.int64)
    proc = TrainingProcess(
        "napari_medssl.annotation_samples:finetune_events", dict(images=[img], labels=[lab], config=config)
    ).start()
    events = list(proc.events())
    assert events[-1]["event"] == "error"
    assert "no_such_model_xyz" in events[-1]["message"] and "Traceback" in events[-1]["traceback"]
    with pytest.raises(ValueError, match="module:function"):
        TrainingProcess("not a target")


def test_training_tree_ends_when_the_viewer_process_dies(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(HERE)!r})
        from napari_medssl.finetune_process import TrainingProcess
        if __name__ == "__main__":
            proc = TrainingProcess("test_finetune_process:sleeper_with_grandchild", num_threads=0).start()
            ev = next(proc.events())
            print(proc.pid, ev["grandchild"], flush=True)
            os._exit(1)  # a crash: no stop(), no atexit handlers
        """
    )
    path = tmp_path / "crashing_viewer.py"
    path.write_text(script)
    with open(tmp_path / "pids.txt", "w") as out:
        subprocess.run([sys.executable, str(path)], stdout=out, timeout=60)
    pids = [int(p) for p in (tmp_path / "pids.txt").read_text().split()]
    deadline = time.monotonic() + 3.0
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_autosave_is_atomic_listed_and_clean_marked(tmp_path, monkeypatch, hippo):
    monkeypatch.setenv("MEDSSL_AUTOSAVE_DIR", str(tmp_path))
    painted = painted_from(hippo[1])
    path = autosave.save_labels(painted, "hippocampus_003", "annotations", (1.0, 1.0, 1.0), (0.0, 1.0, 2.0))
    assert path.parent == tmp_path and not list(tmp_path.glob(".*tmp*"))
    data, header = autosave.load_autosave(path)
    assert np.array_equal(data, painted) and header["translate"] == [0.0, 1.0, 2.0]
    (entry,) = autosave.list_autosaves()
    assert not entry.crashed and "annotations on hippocampus_003" in entry.describe()
    assert autosave.mark_clean() == 1 and autosave.list_autosaves()[0].header["clean"]


def test_autosave_from_a_crashed_session_is_offered(tmp_path):
    script = textwrap.dedent(
        """
        import os
        import numpy as np
        from napari_medssl import autosave
        autosave.save_labels(np.arange(12, dtype=np.uint8).reshape(3, 4), "img", "painted")
        os._exit(1)
        """
    )
    env = {**os.environ, "MEDSSL_AUTOSAVE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script], env=env, timeout=60)
    (entry,) = autosave.list_autosaves(tmp_path, crashed_only=True)
    data, _ = autosave.load_autosave(entry.path)
    assert np.array_equal(data, np.arange(12).reshape(3, 4))
