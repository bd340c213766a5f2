"""Distributed training: 2 CPU processes (gloo) end with identical weights; only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from napari_medssl.models import read_checkpoint
from napari_medssl.testing.training import TINY_UNET, small_msd

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from napari_medssl.engine import TrainConfig, Trainer

    cfg = TrainConfig(
        model="unet_tiny",
        task="segment",
        data=data,
        out_dir=out,
        max_steps=3,
        max_minutes=30.0,  # a time budget too: every rank takes rank 0's progress (broadcast each step)
        batch_size=2,
        val_every=3,
        warmup_steps=1,
        device="cpu",
        model_overrides=dict(TINY_UNET),
    )
    trainer = Trainer(cfg)
    events = list(trainer.run())
    state = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, str(Path(result_dir) / f"rank{rank}.safetensors"))
    summary = {
        "world": trainer.world_size,
        "kinds": [e["event"] for e in events],
        "n_samples": len(trainer.train_set),
    }
    (Path(result_dir) / f"rank{rank}.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_two_process_ddp_gives_identical_weights(data_dir, tmp_path):
    from safetensors.torch import load_file

    data = small_msd(data_dir, tmp_path / "msd", n=3)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(
        _worker, args=(2, _free_port(), str(data), str(tmp_path / "run"), str(results)), nprocs=2, join=True
    )
    a, b = load_file(str(results / "rank0.safetensors")), load_file(str(results / "rank1.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    r0, r1 = (json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["kinds"].count("step") == r1["kinds"].count("step") == 3
    assert "checkpoint" in r0["kinds"] and "checkpoint" not in r1["kinds"]  # only rank 0 writes
    saved = read_checkpoint(tmp_path / "run/best.safetensors")[0]
    for k in saved:
        assert torch.equal(saved[k], a[k]), k
    init = read_checkpoint(tmp_path / "run/best.safetensors")[2]
    assert init["train_config"]["max_steps"] == 3 and init["train_config"]["max_minutes"] == 30.0


@pytest.mark.slow
def test_torchrun_cli_finetune(data_dir, tmp_path):
    """``medssl finetune`` under torchrun, distilling from a teacher (each rank holds its own frozen copy)."""
    from napari_medssl.models import create_model, save_model

    data = small_msd(data_dir, tmp_path / "msd", n=3)
    teacher = save_model(create_model("unet_tiny", **TINY_UNET), tmp_path / "teacher.safetensors")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "napari_medssl.engine.cli",
        "finetune",
        "--model",
        "unet_tiny",
        "--set",
        "levels=2",
        "--data",
        str(data),
        "--task",
        "segment",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--val-every",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--teacher",
        str(teacher),
        "--distill-temperature",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("best checkpoint:") == 1  # rank 0 alone reports
    events = [json.loads(x) for x in (tmp_path / "run/events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "val"]
    config = json.loads((tmp_path / "run/config.json").read_text())
    assert config["teacher"] == str(teacher) and config["distill_temperature"] == 2.0
