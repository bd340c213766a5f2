"""Resource faults: no GPU, GPU out of memory, disk full, and starting/stopping fine-tuning over and over.

- ``device="cuda"`` without a GPU is a one-line ``ValueError`` naming what to use instead (``auto`` falls back
  to the CPU; an explicit ``cuda`` is not silently replaced), before any file is written.
- CUDA out-of-memory (simulated: the model raises ``torch.OutOfMemoryError`` for batches larger than what
  "fits") makes inference split the batch and give the same result; training stops with a ``MemoryError``
  that says to lower the batch size, and the previous checkpoint stays loadable.
- A full disk (simulated: a write that stores part of the file, then fails as safetensors or numpy fail on a
  full disk) while a checkpoint or an autosave is written raises ``OSError(ENOSPC)`` and leaves the previous
  file intact, with no temporary files behind.
- Starting and stopping the viewer's training process 5 times leaves no process, thread or descriptor behind
  and grows memory by less than 50 MB (``benchmarks/crash_kill.py`` does it 50 times).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medssl import autosave, inference
from napari_medssl.engine import train
from napari_medssl.engine.checkpoint import RunFolder
from napari_medssl.engine.cli import main as medssl
from napari_medssl.io import read_nifti
from napari_medssl.models import create_model, load_model, save_model
from napari_medssl.testing.crash import finetune_kwargs, resources, start_stop
from napari_medssl.testing.training import TINY_UNET, one_thread, seg_config, small_msd  # noqa: F401

pytestmark = pytest.mark.timeout(240)

HIPPO = "hippocampus/imagesTr/hippocampus_001.nii.gz"
HIPPO_LABELS = "hippocampus/labelsTr/hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def msd(data_dir: Path, tmp_path_factory) -> Path:
    return small_msd(data_dir, tmp_path_factory.mktemp("msd"), n=3)


@pytest.fixture(scope="module")
def hippo(data_dir: Path) -> np.ndarray:
    return read_nifti(data_dir / HIPPO).data


# -- no GPU ------------------------------------------------------------------------------------------------------
def test_cuda_without_a_gpu_is_a_clear_error_and_auto_runs_on_the_cpu(
    msd: Path, hippo: np.ndarray, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine that has one
    with pytest.raises(ValueError, match="no CUDA GPU is available; use 'auto' or 'cpu'"):
        inference.pick_device("cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        next(train(seg_config(msd, tmp_path / "run", device="cuda")))
    assert not (tmp_path / "run").exists()  # refused before anything was written
    model = create_model("unet_tiny", **TINY_UNET, num_classes=3)
    ckpt = save_model(model, tmp_path / "unet.safetensors")
    out = tmp_path / "labels.nii.gz"
    args = ["predict", "--model", str(ckpt), "--input", str(msd / "imagesTr"), "--output", str(out)]
    assert medssl([*args, "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0] and "'cpu'" in err[0]
    assert not out.exists()
    auto = inference.pick_device("auto")
    assert auto.type in ("cpu", "mps")
    labels = inference.segment(load_model(ckpt), hippo, device="auto")
    assert labels.shape == hippo.shape


# -- GPU out of memory --------------------------------------------------------------------------------------------
def fits_only(model: torch.nn.Module, n: int, calls: list[int]) -> None:
    """Make ``model`` raise CUDA's out-of-memory error for batches of more than ``n`` samples."""
    forward = model.forward

    def limited(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if len(x) > n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(x)

    model.forward = limited


def test_out_of_memory_in_inference_splits_the_batch(hippo: np.ndarray) -> None:
    torch.manual_seed(0)
    model = create_model("unet_tiny", **TINY_UNET, num_classes=3).eval()
    expected = inference.segment_probabilities(model, hippo, batch_size=16)
    calls: list[int] = []
    fits_only(model, 3, calls)
    got = inference.segment_probabilities(model, hippo, batch_size=16)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    done = [c for c in calls if c <= 3]  # the batches that "fitted"
    assert calls[0] == 16 and len(done) > 3 and sum(done) == len(hippo)
    classifier = create_model(
        "vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2
    ).eval()
    before = inference.classify(classifier, hippo, batch_size=16)
    fits_only(classifier, 1, [])
    np.testing.assert_allclose(
        inference.classify(classifier, hippo, batch_size=16), before, rtol=1e-5, atol=1e-6
    )
    fits_only(model, 0, [])  # not even one slice fits
    with pytest.raises(MemoryError, match="out of memory on cpu for a single input of shape"):
        inference.segment(model, hippo)


def test_out_of_memory_in_training_says_what_to_do_and_keeps_the_checkpoint(
    msd: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = tmp_path / "run"
    list(train(seg_config(msd, run)))
    good = RunFolder(run).read_last()
    from napari_medssl.models.unet import UNet

    real = UNet.forward

    def oom(self, x):
        if len(x) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)

    monkeypatch.setattr(UNet, "forward", oom)
    with pytest.raises(MemoryError, match="batch size 2; lower the batch size"):
        list(train(seg_config(msd, run, max_steps=4)))
    assert RunFolder(run).read_last() == good
    load_model(run / good["weights"])
    args = [
        "finetune",
        "--model",
        "unet_tiny",
        "--task",
        "segment",
        "--data",
        str(msd),
        "--out",
        str(run),
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--val-every",
        "2",
        "--device",
        "cpu",
        "--set",
        "levels=2",
    ]
    assert medssl(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medssl finetune: error: out of memory") and "--batch-size" in err[-1]
    assert "Traceback" not in "\n".join(err)


# -- disk full ----------------------------------------------------------------------------------------------------
def disk_full_after(fraction: float, match: str = ""):
    """A ``safetensors.torch.save_file`` that writes ``fraction`` of the file, then fails as it does on a full
    disk (a ``SafetensorError`` naming the OS error; ``benchmarks/crash_kill.py`` fills a real tmpfs)."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    real = st.save_file

    def save_file(tensors, filename, metadata=None):
        if match not in str(filename):
            return real(tensors, filename, metadata=metadata)
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(int(Path(filename).stat().st_size * fraction))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


@pytest.mark.parametrize("target", ["step_", "optim", "best"])
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    msd: Path, tmp_path: Path, monkeypatch, target: str
) -> None:
    run = tmp_path / "run"
    list(train(seg_config(msd, run, best_metric="last")))  # every validation writes best.safetensors
    good = RunFolder(run).read_last()
    best_before = (run / "best.safetensors").read_bytes()
    monkeypatch.setattr("safetensors.torch.save_file", disk_full_after(0.5, target))
    with pytest.raises(OSError) as info:
        list(train(seg_config(msd, run, max_steps=4, best_metric="last")))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    record = RunFolder(run).read_last()
    if target == "best":  # the step-4 checkpoint was committed before best.safetensors failed
        assert record["step"] == 4
    else:
        assert record == good
    load_model(run / record["weights"])
    assert (run / "best.safetensors").read_bytes() == best_before  # never half-replaced
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_disk_full_in_the_cli_is_one_line(msd: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("safetensors.torch.save_file", disk_full_after(0.3))
    args = [
        "finetune",
        "--model",
        "unet_tiny",
        "--task",
        "segment",
        "--data",
        str(msd),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--val-every",
        "1",
        "--device",
        "cpu",
        "--set",
        "levels=2",
    ]
    assert medssl(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medssl finetune: error:") and "No space left on device" in err[-1]


def test_disk_full_while_autosaving_keeps_the_previous_autosave(
    data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    labels = read_nifti(data_dir / HIPPO_LABELS).data
    first = autosave.save_labels(labels, "hippocampus_001", "Labels", folder=tmp_path)
    real = np.savez_compressed

    def full(fh, **arrays):
        real(fh, **arrays)
        fh.truncate(fh.tell() // 3)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full)
    with pytest.raises(OSError, match="No space left"):
        autosave.save_labels(labels * 0 + 1, "hippocampus_001", "Labels", folder=tmp_path)
    monkeypatch.undo()
    saved, header = autosave.load_autosave(first)
    np.testing.assert_array_equal(saved, labels)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


# -- start / stop ---------------------------------------------------------------------------------------------------
def test_starting_and_stopping_finetuning_leaves_nothing_behind(
    data_dir: Path, hippo: np.ndarray, tmp_path: Path
) -> None:
    labels = read_nifti(data_dir / HIPPO_LABELS).data
    kwargs = finetune_kwargs(hippo, labels, tmp_path / "run")
    warm = start_stop(kwargs, "now")  # the first start creates multiprocessing's resource tracker
    before = resources()
    results = [warm]
    for mode, delay in (("delay", 0.3), ("now", 0.0), ("step", 0.0), ("delay", 1.0)):
        results.append(
            start_stop(
                {**kwargs, "config": {**kwargs["config"], "out_dir": str(tmp_path / mode)}}, mode, delay
            )
        )
    after = resources()
    for r in results:
        assert not r["alive"] and r["exitcode"] is not None and not r["group"], r
        assert r["events"][-1] == "stopped" and not r["errors"], r
        assert r["stop_s"] < 3.0, r
    assert "step" in results[3]["events"]  # one run really trained before it was stopped
    # processes that were already running (a session-scoped Orthanc from the PACS tests) are not ours
    assert set(after["children"]) <= set(before["children"]), (before, after)
    assert after["threads"] == before["threads"], (before, after)
    assert after["fds"] <= before["fds"] + 2, (before, after)
    assert after["rss_mb"] - before["rss_mb"] < 50, (before, after)
    json.dumps(results)
