"""Training engine: generators of events, data sources, checkpoints, DDP, evaluation, the ``medssl`` CLI.

See ``README.md`` in this folder for the map. Typical use::

    from napari_medssl.engine import TrainConfig, train

    cfg = TrainConfig(model="unet_tiny", task="segment", data="$MEDSSL_DATA_DIR/hippocampus", out_dir="runs/h")
    for event in train(cfg):
        if event["event"] == "val":
            print(event["step"], event["metrics"]["mean_dice"])
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "TrainConfig": "config",
    "ArrayData": "data",
    "Case": "data",
    "ConcatData": "data",
    "DataSource": "data",
    "DicomFolder": "data",
    "ImageFolder": "data",
    "MSDFolder": "data",
    "MedMNIST": "data",
    "MiasFolder": "data",
    "open_data": "data",
    "evaluate": "evaluate",
    "Trainer": "loop",
    "finetune": "loop",
    "pretrain": "loop",
    "read_events": "loop",
    "train": "loop",
}


def __getattr__(name: str) -> Any:
    """Import on first use, so ``medssl --help`` and ``import napari_medssl.engine`` stay light."""
    if name in _WHERE:
        return getattr(import_module(f"napari_medssl.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'napari_medssl.engine' has no attribute {name!r}")


__all__ = [
    "ArrayData",
    "Case",
    "ConcatData",
    "DataSource",
    "DicomFolder",
    "ImageFolder",
    "MSDFolder",
    "MedMNIST",
    "MiasFolder",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "finetune",
    "open_data",
    "pretrain",
    "read_events",
    "train",
]
