"""``medssl finetune --task segment --data IMAGE --labels PAINTED [--model NAME] --out DIR --max-minutes M``.

Reads the image (any file or DICOM series folder the readers open) and the painted label volume (0 unlabelled,
1 background, ``k + 1`` class ``k``), checks them (:func:`napari_medssl.engine.adapt.preflight`: same grid,
two classes painted, a starting model that takes the image) before anything trains, then runs
:func:`napari_medssl.engine.adapt.adapt_events`, printing one line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def run(args: argparse.Namespace) -> int:
    """The ``finetune --labels`` command; returns the exit status."""
    from napari_medssl.engine import adapt
    from napari_medssl.engine.readers import read_any

    if args.task != "segment":
        raise ValueError("--labels (painted label volumes) fine-tunes segmenters: use --task segment")
    if len(args.data) != 1:
        raise ValueError(f"--labels goes with one --data IMAGE, got {len(args.data)}")
    image = read_any(args.data[0])
    painted = read_any(args.labels)
    if image.rgb:
        adapt.slices25d.check_image(image.data, rgb=True)
    adapt.check_grid(image.data.shape, painted.data.shape, image.affine, painted.affine, image.spacing)
    cfg = adapt.AdaptConfig(
        out_dir=args.out,
        model=args.model,
        max_minutes=args.max_minutes if args.max_minutes is not None else 1.0,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seed=args.seed,
        device="cpu" if args.device == "auto" else args.device,
        extra={"data": str(args.data[0]), "labels": str(args.labels)},
        clock=os.environ.get("MEDSSL_ADAPT_CLOCK", "wall"),  # "cpu": a budget of CPU time (benchmarks)
    )
    if args.lr_given:
        cfg.lr = args.lr
    spacing_yx = tuple(image.spacing[-2:])
    adapt.preflight(image.data, painted.data, cfg, rgb=image.rgb)
    record: dict[str, Any] = {}
    for event in adapt.adapt_events(image.data, painted.data, cfg, spacing_yx, image.affine):
        kind = event["event"]
        if kind == "checkpoint" and event.get("elapsed_s") is not None:
            print(f"step {event['step']}: {event['path']} ({event['elapsed_s']:.1f} s)", flush=True)
        elif kind == "done":
            record = event.get("record") or {}
            print(f"best checkpoint: {event['best_path']}")
    print(json.dumps({k: record[k] for k in ("steps", "elapsed_s", "checkpoints") if k in record}))
    return 0
