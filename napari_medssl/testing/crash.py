"""Kill -9 a training run or an autosaving viewer at chosen or random moments, then check what survived.

Shared by ``tests/test_crash_safety.py`` (a few kills) and ``benchmarks/crash_kill.py`` (dozens).

Two child programs run as separate processes (``python -c "from napari_medssl.testing import crash; ..."``):

- :func:`train_driver`: ``engine.train`` on a small real MSD folder with a checkpoint after every step, printing
  each event as a JSON line;
- :func:`autosave_driver`: ``autosave.save_labels`` of a real hippocampus label map painted a little more at
  every version, printing each version number once its save returned.

Either is killed with SIGKILL from outside after a random delay, or kills *itself* with SIGKILL at an injected
point of a write (:data:`KILL_POINTS`): after a temporary file is complete but before its rename (``fsync``),
right after a rename but before the commit record (``after_replace``), in the middle of a safetensors or
``last.json`` or ``.npz`` write (``torn_*``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]

KILL_POINTS = ("fsync", "after_replace", "torn_tensors", "torn_json")
"""Injected SIGKILL points for training (the n-th such moment of the run)."""
AUTOSAVE_KILL_POINTS = ("fsync", "after_replace", "torn_npz")
"""Injected SIGKILL points for the autosave writer."""


def _install_kill(spec: dict[str, Any] | None) -> None:
    """Patch the write path so the process SIGKILLs itself at the ``spec["n"]``-th ``spec["point"]``."""
    if not spec:
        return
    point, n = spec["point"], int(spec["n"])
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    def die() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "fsync":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if hit():
                die()
            real_fsync(fd)

        os.fsync = fsync
    elif point == "after_replace":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            real_replace(src, dst)
            if hit():
                die()

        os.replace = replace
    elif point == "torn_tensors":
        import safetensors.torch as st

        real_save = st.save_file

        def save_file(tensors: Any, filename: Any, metadata: Any = None) -> None:
            real_save(tensors, filename, metadata=metadata)
            if hit():
                with open(filename, "r+b") as fh:
                    fh.truncate(os.path.getsize(filename) // 2)
                die()

        st.save_file = save_file
    elif point == "torn_json":
        real_write = Path.write_text

        def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            if self.name.startswith(".last.json") and hit():
                real_write(self, data[: len(data) // 2])
                die()
            return real_write(self, data, *args, **kwargs)

        Path.write_text = write_text  # type: ignore[method-assign]
    elif point == "torn_npz":
        real_savez = np.savez_compressed

        def savez_compressed(fh: Any, *args: Any, **kwargs: Any) -> None:
            real_savez(fh, *args, **kwargs)
            if hit():
                fh.flush()
                fh.truncate(fh.tell() // 2)
                fh.flush()
                die()

        np.savez_compressed = savez_compressed
    else:
        raise ValueError(f"unknown kill point {point!r}")


def train_config(data: str, out: str, max_steps: int) -> Any:
    """A tiny U-Net segmentation run with a validation and a checkpoint after every step."""
    from napari_medssl.engine import TrainConfig

    return TrainConfig(
        model="unet_tiny",
        task="segment",
        data=data,
        out_dir=out,
        max_steps=max_steps,
        batch_size=2,
        val_every=1,
        warmup_steps=1,
        lr=3e-3,
        model_overrides={"levels": 2},
        device="cpu",
        num_workers=0,
    )


def train_driver() -> None:
    """Child program: train and print events (argv[1]: JSON with data, out, max_steps, kill)."""
    args = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    _install_kill(args.get("kill"))
    from napari_medssl.engine import train

    for event in train(train_config(args["data"], args["out"], int(args["max_steps"]))):
        keep = {k: event[k] for k in ("event", "step", "path", "best") if k in event}
        print(json.dumps(keep), flush=True)


def painted(base: np.ndarray, version: int) -> np.ndarray:
    """Version ``version`` of a clinician's painting: the real label map plus ``version`` painted slabs."""
    out = base.copy()
    flat = out.reshape(-1)
    flat[: 53 * version] = 3  # each version paints 53 more voxels with label 3
    return out


def autosave_driver() -> None:
    """Child program: autosave ever newer labels, print each saved version (argv[1]: JSON with folder, labels)."""
    args = json.loads(sys.argv[1])
    os.environ["MEDSSL_AUTOSAVE_DIR"] = args["folder"]
    _install_kill(args.get("kill"))
    from napari_medssl import autosave

    base = np.load(args["labels"])
    version = 0
    while True:
        version += 1
        autosave.save_labels(
            painted(base, version),
            "hippocampus_001",
            "Labels",
            scale=(1.0, 1.0, 1.0),
            translate=(0.0, 0.0, 0.0),
        )
        print(version, flush=True)
        time.sleep(0.002)


class Child:
    """A driver process whose stdout lines are collected by a thread (with their arrival times)."""

    def __init__(self, program: str, args: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from napari_medssl.testing import crash; crash.{program}()", json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.first_line = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            self.first_line.set()

    def kill_after_first_line(self, delay: float, timeout: float = 120.0) -> None:
        """SIGKILL the child ``delay`` seconds after its first output line (or at once if it never prints)."""
        self.first_line.wait(timeout)
        time.sleep(delay)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # kill -9
        self.wait()

    def wait(self, timeout: float = 180.0) -> int:
        """Wait for the child to end (killing it after ``timeout``); return its exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        return self.proc.returncode


def committed_step(lines: list[str]) -> int:
    """The last step whose checkpoint the run reported as written (0 when none)."""
    steps = [0]
    for line in lines:
        event = json.loads(line)
        if event["event"] == "checkpoint" and not event["best"]:
            steps.append(int(event["step"]))
    return max(steps)


def first_step(lines: list[str]) -> int | None:
    """The step number of the first ``step`` event (``None`` when there was none)."""
    for line in lines:
        event = json.loads(line)
        if event["event"] == "step":
            return int(event["step"])
    return None


def check_run_folder(run: Path) -> int:
    """Everything a killed run left must load: the commit record, its weights and optimiser state, the best
    checkpoint, the event log. Returns the committed step (0 when there is no checkpoint yet).

    Raises:
        AssertionError / ValueError / OSError: something the next run or the viewer could not load.
    """
    from napari_medssl.engine.checkpoint import RunFolder, load_tensors
    from napari_medssl.engine.loop import read_events
    from napari_medssl.models.registry import load_model

    folder = RunFolder(run)
    record = folder.read_last()
    if (run / "best.safetensors").exists():
        load_model(run / "best.safetensors")
    read_events(run)
    if record is None:
        return 0
    model = load_model(run / record["weights"])
    assert model.checkpoint_extra["step"] == record["step"]
    tensors, meta = load_tensors(run / record["optim"])
    assert "rng/torch" in tensors and meta["param_groups"]
    return int(record["step"])


def crashed_autosaves(folder: Path) -> list[Any]:
    """The autosaves a killed writer left behind, as the viewer lists them."""
    from napari_medssl import autosave

    return autosave.list_autosaves(folder, crashed_only=True)


# -- start/stop fine-tuning in the viewer's training process -----------------------------------------------------
FINETUNE_TARGET = "napari_medssl.annotation_samples:finetune_events"


def finetune_kwargs(image: np.ndarray, labels: np.ndarray, out_dir: Path) -> dict[str, Any]:
    """What the Fine-tune dock sends its training process: painted slices of a real volume, a tiny U-Net."""
    from napari_medssl.annotation_samples import segmentation_samples

    painted_labels = np.zeros_like(labels)
    for z in range(8, 14):
        painted_labels[z] = labels[z] + 1  # a clinician painted six slices (1 = background)
    samples = segmentation_samples(image, painted_labels, model_dims=2)
    config = dict(
        model="unet_tiny",
        task="segment",
        out_dir=str(out_dir),
        max_steps=100_000,
        batch_size=2,
        val_every=100_000,
        warmup_steps=1,
        device="cpu",
        model_overrides={"levels": 2},
        resume=False,
        num_classes=3,
    )
    config.update({k: samples[k] for k in ("ignore_index", "label_map") if k in samples})
    return dict(
        images=samples["images"],
        labels=samples["labels"],
        config=config,
        ids=samples["ids"],
        validate_on_train=True,
    )


def _descendants() -> list[Any]:
    """This process's child processes except multiprocessing's one shared resource tracker."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass
        out.append(child)
    return out


def resources() -> dict[str, Any]:
    """RSS (MB), threads, open file descriptors and child processes of this process, after a collection."""
    import gc

    import psutil

    gc.collect()
    me = psutil.Process()
    return {
        "rss_mb": me.memory_info().rss / 2**20,
        "threads": threading.active_count(),
        "fds": me.num_fds(),
        "children": [c.pid for c in _descendants()],
    }


def group_members(pgid: int) -> list[int]:
    """Processes still in process group ``pgid`` (the training process leads its own group)."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return alive


def start_stop(
    kwargs: dict[str, Any], mode: str, delay: float = 0.0, timeout: float = 180.0
) -> dict[str, Any]:
    """Start a training process and stop it: at once (``"now"``), after ``delay`` s (``"delay"``), or after its
    first step event (``"step"``). Returns what happened: events seen, stop time, exit code, leftovers."""
    from napari_medssl.finetune_process import TrainingProcess

    proc = TrainingProcess(FINETUNE_TARGET, kwargs, num_threads=1)
    proc.start()
    pid = proc.pid
    seen: list[dict] = []
    if mode == "delay":
        time.sleep(delay)
    elif mode == "step":
        t0 = time.perf_counter()
        while not any(e.get("event") == "step" for e in seen) and time.perf_counter() - t0 < timeout:
            seen += proc.poll()
            if any(e.get("event") == "error" for e in seen):
                break
            time.sleep(0.05)
    stop_s = proc.stop()
    final = proc.poll()
    assert pid is not None
    return {
        "pid": pid,
        "events": [e.get("event") for e in seen + final],
        "stop_s": stop_s,
        "exitcode": proc.exitcode,
        "alive": proc.is_alive(),
        "group": group_members(pid),
        "errors": [e.get("message") for e in seen if e.get("event") == "error"],
    }
