"""Run-folder checkpoints: safetensors weights + optimiser state, a JSON record, all written atomically.

Layout of a run folder::

    config.json                  the TrainConfig
    split.json                   train/val case ids
    step_0000200.safetensors     model weights + config + extra (registry.save_model)
    step_0000200.optim.safetensors  optimiser tensors, RNG states; param groups as JSON metadata
    step_0000200.ema.safetensors    the moving average of the weights (runs with ``ema_decay``)
    last.json                    {"step", "weights", "optim", "best_value", "best_step", ...}: the commit record
    best.safetensors             the weights with the best validation metric
    events.jsonl                 every validation event

Every file is written to a temporary name, fsynced and renamed, and ``last.json`` is renamed into place only
after the files it names are complete. A crash at any moment leaves the previous ``last.json`` pointing at the
previous complete checkpoint; leftovers are removed on the next save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_medssl._atomic import atomic_write, atomic_write_text
from napari_medssl.models.registry import save_model, write_safetensors

LAST = "last.json"
BEST = "best.safetensors"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors and JSON metadata to a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: write_safetensors(tensors, tmp, {"json": json.dumps(meta)}))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("json", "{}"))
        return {k: fh.get_tensor(k) for k in fh.keys()}, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()`` into safetensors-able tensors and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state/{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class RunFolder:
    """Reads and writes the checkpoints of one run folder (only rank 0 should write)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)

    @property
    def best_path(self) -> Path:
        return self.dir / BEST

    def start_fresh(self) -> None:
        """Create the folder; forget an earlier run's commit record, best weights and event log."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (LAST, BEST, "events.jsonl"):
            (self.dir / name).unlink(missing_ok=True)

    def read_last(self) -> dict[str, Any] | None:
        """The ``last.json`` record, or ``None`` when the run has no checkpoint yet."""
        path = self.dir / LAST
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is damaged ({err}); delete it to start the run afresh") from None
        for key in ("weights", "optim", "ema"):
            if key in record and not (self.dir / record[key]).is_file():
                raise FileNotFoundError(f"{path} names {record[key]}, which is missing")
        return record

    def save_last(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        step: int,
        extra: dict[str, Any],
        record: dict[str, Any],
        rng: dict[str, torch.Tensor],
        ema: nn.Module | None = None,
    ) -> Path:
        """Write weights, optimiser + RNG state (and the weights' moving average ``ema``), then commit them
        in ``last.json``; remove older files."""
        stem = f"step_{step:07d}"
        weights = save_model(model, self.dir / f"{stem}.safetensors", extra={**extra, "step": step})
        tensors, meta = optimizer_tensors(optimizer)
        tensors.update({f"rng/{k}": v for k, v in rng.items()})
        save_tensors(self.dir / f"{stem}.optim.safetensors", tensors, meta)
        record = {**record, "step": step, "weights": weights.name, "optim": f"{stem}.optim.safetensors"}
        record.pop("ema", None)
        if ema is not None:
            record["ema"] = save_model(ema, self.dir / f"{stem}.ema.safetensors", extra={"step": step}).name
        atomic_write_text(self.dir / LAST, json.dumps(record, indent=1))
        self.clean(keep={weights.name, record["optim"], record.get("ema", "")})
        return weights

    def load_optim(self, record: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        """Restore the optimiser from a ``last.json`` record; return the saved RNG states."""
        tensors, meta = load_tensors(self.dir / record["optim"])
        restore_optimizer(optimizer, tensors, meta)
        return {k[4:]: v for k, v in tensors.items() if k.startswith("rng/")}

    def save_best(self, model: nn.Module, extra: dict[str, Any]) -> Path:
        """Write ``best.safetensors`` atomically."""
        return save_model(model, self.best_path, extra=extra)

    def clean(self, keep: set[str]) -> None:
        """Remove step files not in ``keep`` and temporary files left by an interrupted write."""
        for p in self.dir.iterdir():
            stale_step = p.name.startswith("step_") and p.name not in keep
            if stale_step or (p.name.startswith(".") and ".tmp" in p.name):
                p.unlink(missing_ok=True)

    def log(self, event: dict[str, Any]) -> None:
        """Append an event to ``events.jsonl``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")
