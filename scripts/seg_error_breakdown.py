"""Where a hippocampus segmenter's errors are: foreground boundary or head/body labels (for ``models/README.md``).

For each model, on the validation volumes of the shared split, per case then averaged: foreground IoU (both
labels as one), the share of the true foreground missed and the extra foreground predicted (as fractions of the
true foreground volume), and the share of the correctly found foreground given the wrong label (head ↔ body).
With several models, each one's per-case mean Dice is also compared with the first model's, case by case: the mean
paired difference with a bootstrap 95 % interval (resampling the cases), and in how many cases it is ahead. An
interval that excludes 0 means the gap is not validation-set noise.

``--cases train --first 60`` scores the first 60 training volumes instead: beside the validation numbers, it
shows how far a model fits its training labels past what generalises.

Usage (checkout root): ``python scripts/seg_error_breakdown.py unet_tiny_hippocampus emfformer_tiny_hippocampus
[--data ../shared/data/hippocampus] [--split models/splits/hippocampus_seed0.json] [--cases val|train]
[--first N]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medssl.engine.build import resolve_checkpoint  # noqa: E402
from napari_medssl.engine.data import open_data  # noqa: E402
from napari_medssl.engine.metrics import dice_iou_case  # noqa: E402
from napari_medssl.engine.samples import SampleSet  # noqa: E402
from napari_medssl.inference import segment_prepared  # noqa: E402
from napari_medssl.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="+", help="zoo names or checkpoints (2D or 3D hippocampus segmenters)"
    )
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    parser.add_argument("--split", default=str(ROOT / "models" / "splits" / "hippocampus_seed0.json"))
    parser.add_argument("--cases", choices=("val", "train"), default="val", help="which side of the split")
    parser.add_argument("--first", type=int, help="only the first N of those volumes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = set(json.loads(Path(args.split).read_text())[args.cases])
    cases = [c for c in open_data(args.data).cases() if c.id in wanted][: args.first]
    print(f"{len(cases)} {'validation' if args.cases == 'val' else 'training'} volumes")
    case_dice: dict[str, np.ndarray] = {}
    for spec in args.models:
        model = load_model(resolve_checkpoint(spec)).eval()
        dims = model.spec.spatial_dims
        samples = SampleSet(cases, train=False, task="segment", model_dims=dims, in_chans=1, slice_axis=0)
        rows, dices = [], []
        for i in range(len(cases)):
            image, label = samples._get(i)
            pred = (
                segment_prepared(model, torch.from_numpy(image), torch.device("cpu"), 0, 16).argmax(0).numpy()
            )
            dices.append(
                np.nanmean([d for d, _ in dice_iou_case(pred, label, int(model.num_classes)).values()])
            )
            found, true = pred > 0, label > 0
            both = found & true
            rows.append(
                (
                    both.sum() / (found | true).sum(),
                    (true & ~found).sum() / true.sum(),
                    (found & ~true).sum() / true.sum(),
                    (both & (pred != label)).sum() / max(both.sum(), 1),
                )
            )
        fg, missed, extra, swapped = np.mean(rows, axis=0)
        print(
            f"{spec}: mean Dice {np.mean(dices):.4f}, foreground IoU {fg:.3f}, missed {missed:.3f}, "
            f"extra {extra:.3f} (of the true foreground), wrong label inside the overlap {swapped:.3f}"
        )
        case_dice[spec] = np.array(dices)
    first, *others = args.models
    for spec in others:
        diff = case_dice[spec] - case_dice[first]
        rng = np.random.default_rng(0)  # the same resamples for every comparison, whatever the order
        boot = diff[rng.integers(0, len(diff), (10_000, len(diff)))].mean(axis=1)
        low, high = np.percentile(boot, [2.5, 97.5])
        print(
            f"{spec} - {first}: per-case mean Dice {diff.mean():+.4f} (bootstrap 95 % interval {low:+.4f} .. "
            f"{high:+.4f}); ahead in {(diff > 0).sum()} of {len(diff)} cases"
        )


if __name__ == "__main__":
    main()
