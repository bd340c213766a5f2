"""Kill -9 during training and during autosave: the last good checkpoint loads, the run resumes where the
checkpoint says, and autosaved annotations survive the killed process.

Each kill is a real SIGKILL of a separate process (``napari_medssl.testing.crash``): from outside after a delay, or from
inside at an injected moment of a checkpoint or autosave write (temporary file complete but not renamed,
renamed but not committed, half written). ``benchmarks/crash_kill.py`` does the same dozens of times.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from napari_medssl.io import read_nifti
from napari_medssl.testing.crash import (
    Child,
    check_run_folder,
    committed_step,
    crashed_autosaves,
    first_step,
    painted,
)
from napari_medssl.testing.training import small_msd

pytestmark = pytest.mark.timeout(300)

TRAIN_KILLS = [
    {"delay": 1.0},  # from outside, a second into training
    {"kill": {"point": "torn_tensors", "n": 4}},  # half of a safetensors file written
    {"kill": {"point": "torn_json", "n": 2}},  # half of the last.json commit record written
]


def test_killed_training_always_leaves_a_loadable_checkpoint_and_resumes(
    data_dir: Path, tmp_path: Path
) -> None:
    msd = small_msd(data_dir, tmp_path / "msd", n=3)
    run = tmp_path / "run"
    args = {"data": str(msd), "out": str(run), "max_steps": 200}
    step = 0
    for spec in TRAIN_KILLS:
        child = Child("train_driver", {**args, "kill": spec.get("kill")})
        if "kill" in spec:
            child.wait()
        else:
            child.kill_after_first_line(spec["delay"])
        assert child.proc.returncode == -signal.SIGKILL, child.stderr[-2000:]
        started = first_step(child.lines)
        assert started is None or started == step + 1, f"resumed at {started}, the checkpoint said {step}"
        reported = committed_step(child.lines)
        step = check_run_folder(run)
        assert step >= reported > 0 or reported == 0, (spec, step, reported)
        assert not [p for p in run.iterdir() if p.name.startswith("step_") and p.stat().st_size == 0]
    assert step > 0
    final = Child("train_driver", {**args, "max_steps": step + 1})
    assert final.wait() == 0, final.stderr[-2000:]
    events = [json.loads(line) for line in final.lines]
    assert first_step(final.lines) == step + 1 and events[-1]["event"] == "done"
    assert check_run_folder(run) == step + 1
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # the finished run cleaned up


AUTOSAVE_KILLS = [
    {"delay": 0.05},
    {"delay": 0.3},
    {"kill": {"point": "fsync", "n": 3}},
    {"kill": {"point": "after_replace", "n": 2}},
    {"kill": {"point": "torn_npz", "n": 4}},
]


def test_autosaved_labels_survive_a_killed_viewer(data_dir: Path, tmp_path: Path) -> None:
    base = read_nifti(data_dir / "hippocampus/labelsTr/hippocampus_001.nii.gz").data
    np.save(tmp_path / "base.npy", base)
    folder = tmp_path / "autosave"
    for spec in AUTOSAVE_KILLS:
        child = Child(
            "autosave_driver",
            {"folder": str(folder), "labels": str(tmp_path / "base.npy"), "kill": spec.get("kill")},
        )
        if "kill" in spec:
            child.wait(60)
        else:
            child.kill_after_first_line(spec["delay"], timeout=60)
        assert child.proc.returncode == -signal.SIGKILL, child.stderr[-2000:]
        saved = int(child.lines[-1]) if child.lines else 0
        mine = [a for a in crashed_autosaves(folder) if a.header["pid"] == child.proc.pid]
        assert len(mine) == 1, (spec, saved, mine)
        entry = mine[0]
        assert entry.crashed and "hippocampus_001" in entry.describe()
        from napari_medssl.autosave import load_autosave

        labels, header = load_autosave(entry.path)
        # the last save that returned, or the one the kill interrupted after its rename: never older, never torn
        candidates = [saved, saved + 1] if saved else [1]
        assert any(np.array_equal(labels, painted(base, v)) for v in candidates), (spec, saved)
        assert header["shape"] == list(base.shape) and header["scale"] == [1.0, 1.0, 1.0]
    assert len(crashed_autosaves(folder)) == len(AUTOSAVE_KILLS)
