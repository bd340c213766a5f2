"""Where to paint next: does painting the most uncertain slices help more than painting random ones?

Two set-ups, each run side by side in one process (paired: same case, same seed, same training budget):

``--task hippocampus`` (the existing engine: the Fine-tune dock's own path,
:func:`napari_medssl.annotation_samples.finetune_events` on :func:`~napari_medssl.annotation_samples.segmentation_samples`).
A user opens a new case (validation volumes of the zoo's split, never trained on) with the shipped 2D U-Net
``unet_tiny_hippocampus``, paints ``--add`` whole slices from the ground truth (anterior 2, posterior 3,
the rest 1) and fine-tunes ``--steps`` steps. ``uncertain`` paints the slices ranked first by
:func:`napari_medssl.uncertainty.rank_slices` on the start model's entropy over test-time augmentation
(:func:`napari_medssl.uncertainty.uncertainty`); ``random`` paints slices drawn at random (seeded). Score: mean
Dice of the two classes on the slices neither arm painted.

``--task tumour`` (needs :mod:`napari_medssl.engine.adapt`, the fast adaptation): the enhancing tumour of TCIA
PGBM-001 T1post (``MaskTumor`` is on the T1post grid, checked); paint the slice with the most tumour, adapt
``--start`` for ``--steps0`` steps (M0), rank by M0's uncertainty, then each arm paints ``--add`` more slices
and adapts M0 on for ``--steps`` steps; tumour Dice on the slices neither arm painted.

The paired difference (uncertain − random) gets a mean and a bootstrap 95 % interval (10,000 resamples of the
pairs). Steps, not minutes, bound training, so the load of other jobs on a shared machine changes the time
taken, not the result. One torch thread; run under ``nice``::

    nice -n 10 python benchmarks/bench_paint_next.py --task hippocampus --cases 8 --seeds 2
    nice -n 10 python benchmarks/bench_paint_next.py --task tumour --seeds 3 --steps0 80 --steps 20
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medssl import inference, io, uncertainty, zoo  # noqa: E402
from napari_medssl.engine.readers import read_any  # noqa: E402

STUDIES = ("11-19-1991", "04-02-1992")


def study(data: Path, date: str) -> tuple:
    """``(Volume, tumour mask)`` of PGBM-001's T1post on ``date``, the mask checked on the image's grid."""
    folder = Path(glob.glob(str(data / "dicom" / "tcia_btp_PGBM-001" / f"{date}*"))[0])
    from napari_medssl.engine.adapt import check_grid

    img, mask = read_any(next(folder.glob("*T1post*"))), read_any(next(folder.glob("*MaskTumor*")))
    check_grid(img.data.shape, mask.data.shape, img.affine, mask.affine, img.spacing)
    return img, mask.data > 0


def paint(mask: np.ndarray, slices: list[int]) -> np.ndarray:
    """Tumour 2, the rest of each painted slice 1, other slices 0."""
    out = np.zeros(mask.shape, np.uint8)
    for z in slices:
        out[z] = np.where(mask[z], 2, 1)
    return out


def adapt(img, painted: np.ndarray, start: str, steps: int, seed: int, out: Path) -> str:
    """Adapt ``start`` on ``painted`` for ``steps`` steps; the checkpoint's path."""
    from napari_medssl.engine.adapt import AdaptConfig, adapt_events

    cfg = AdaptConfig(
        out_dir=str(out),
        model=start,
        max_steps=steps,
        max_minutes=1e6,
        seed=seed,
        first_checkpoint_s=1e9,  # only the final checkpoint: no time spent saving along the way
        checkpoint_every_s=1e9,
    )
    best = None
    # the affine, as `medssl finetune --labels` passes it: the checkpoint records where the paint is (its prior)
    for ev in adapt_events(img.data, painted, cfg, spacing_yx=tuple(img.spacing[1:]), affine=img.affine):
        if ev["event"] == "done":
            best = ev["best_path"]
    return str(best)


def predict(path: str, img) -> np.ndarray:
    """Tumour mask predicted by the checkpoint at ``path``."""
    model = zoo.load(path)
    probs = inference.segment_probabilities(model, img.data, spacing=tuple(img.spacing), affine=img.affine)
    return probs.argmax(0) == 1


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)


def bootstrap(diffs: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), (n, len(diffs)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def run_study(date: str, args: argparse.Namespace, log) -> list[dict]:
    img, mask = study(Path(args.data), date)
    counts = mask.reshape(len(mask), -1).sum(1)
    first = [int(counts.argmax())]
    out = Path(args.out) / date
    t0 = time.time()
    m0 = adapt(img, paint(mask, first), args.start, args.steps0, 0, out / "m0")
    unc = uncertainty.uncertainty(zoo.load(m0), img.data, spacing=tuple(img.spacing), affine=img.affine)
    ranked = [z for z, _ in uncertainty.rank_slices(unc.entropy, painted=paint(mask, first))]
    top = ranked[: args.add]
    print(
        f"{date}: M0 on slice {first} in {time.time() - t0:.0f} s; ranked {ranked[:6]}...; tumour slices "
        f"{np.flatnonzero(counts).tolist()}",
        flush=True,
    )
    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        rand = sorted(int(z) for z in rng.choice(ranked, args.add, replace=False))
        arms = {"uncertain": sorted(top), "random": rand}
        evaluate = [z for z in range(len(mask)) if z not in first + top + rand]
        row = {"study": date, "seed": seed, "first": first, "eval_slices": evaluate}
        for arm, added in arms.items():
            path = adapt(img, paint(mask, first + added), m0, args.steps, seed, out / f"{arm}_{seed}")
            pred = predict(path, img)
            row[arm] = {
                "added": added,
                "tumour_voxels_added": int(counts[added].sum()),
                "dice": dice(pred[evaluate], mask[evaluate]),
            }
        row["m0_dice"] = dice(predict(m0, img)[evaluate], mask[evaluate])
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
        rows.append(row)
    return rows


# -- hippocampus: the existing engine (the Fine-tune dock's path) ------------------------------------------------
def hippo_cases(data: Path, n: int, skip: int = 0) -> list[str]:
    """``n`` validation cases of the zoo's hippocampus split (never trained on), after the first ``skip``."""
    split = json.loads((ROOT / "models" / "splits" / "hippocampus_seed0.json").read_text())
    return split["val"][skip : skip + n]


def finetune_on(image: np.ndarray, painted: np.ndarray, start: str, steps: int, seed: int, out: Path) -> str:
    """Fine-tune ``start`` on the painted slices as the Fine-tune dock does (in this process); the best path."""
    from napari_medssl.annotation_samples import finetune_events, segmentation_samples

    samples = segmentation_samples(image, painted, model_dims=2)
    config = dict(
        model=start,
        task="segment",
        out_dir=str(out),
        max_steps=steps,
        batch_size=8,
        lr=1e-3,
        warmup_steps=min(50, max(1, steps // 10)),
        val_every=steps,
        val_fraction=0.0,
        num_classes=3,
        device="cpu",
        resume=False,
        seed=seed,
        ignore_index=samples["ignore_index"],
    )
    best = None
    for ev in finetune_events(
        samples["images"],
        samples["labels"],
        config,
        ["background", "anterior", "posterior"],
        ids=samples["ids"],
        validate_on_train=True,
    ):
        if ev["event"] == "done":
            best = ev["best_path"]
    return str(best)


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([dice(pred == k, truth == k) for k in (1, 2)]))


def run_hippocampus(args: argparse.Namespace, log) -> list[dict]:
    data = Path(args.data) / "hippocampus"
    start = zoo.load(args.start)
    rows = []
    for case in hippo_cases(data, args.cases, args.skip_cases):
        image = io.read(data / "imagesTr" / f"{case}.nii.gz")[0].data
        truth = io.read(data / "labelsTr" / f"{case}.nii.gz")[0].data.astype(np.int64)
        unc = uncertainty.uncertainty(start, image)
        ranked = [z for z, _ in uncertainty.rank_slices(unc.entropy)]
        top = sorted(ranked[: args.add])
        before = inference.segment(start, image)
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 + seed)
            rand = sorted(int(z) for z in rng.choice(len(image), args.add, replace=False))
            evaluate = [z for z in range(len(image)) if z not in top + rand]
            row = {
                "case": case,
                "seed": seed,
                "eval_slices": evaluate,
                "start_dice": mean_dice(before[evaluate], truth[evaluate]),
            }
            for arm, added in (("uncertain", top), ("random", rand)):
                painted = np.zeros(image.shape, np.uint8)
                painted[added] = truth[added] + 1
                out = Path(args.out) / case / f"{arm}_{seed}"
                path = finetune_on(image, painted, args.start, args.steps, seed, out)
                pred = inference.segment(zoo.load(path), image)
                row[arm] = {
                    "added": added,
                    "labelled_voxels_added": int((truth[added] > 0).sum()),
                    "dice": mean_dice(pred[evaluate], truth[evaluate]),
                }
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
            log.flush()
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default="runs/bench_paint_next")
    p.add_argument("--task", choices=("hippocampus", "tumour"), default="hippocampus")
    p.add_argument(
        "--start", default=None, help="starting model (default: unet_tiny_hippocampus / unet_tiny)"
    )
    p.add_argument("--cases", type=int, default=8, help="hippocampus: validation cases")
    p.add_argument("--skip-cases", type=int, default=0, help="hippocampus: start after this many cases")
    p.add_argument("--steps0", type=int, default=60, help="adaptation steps of M0 on the first slice")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps after painting (100 / 20)")
    p.add_argument("--add", type=int, default=None, help="slices painted in each arm (3 / 2)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--studies", nargs="+", default=list(STUDIES))
    args = p.parse_args()
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    hippo = args.task == "hippocampus"
    args.start = args.start or ("unet_tiny_hippocampus" if hippo else "unet_tiny")
    args.steps = args.steps or (100 if hippo else 20)
    args.add = args.add or (3 if hippo else 2)
    rows = []
    with open(Path(args.out) / "results.jsonl", "a") as log:
        if hippo:
            rows = run_hippocampus(args, log)
        else:
            for date in args.studies:
                rows += run_study(date, args, log)
    diffs = np.array([r["uncertain"]["dice"] - r["random"]["dice"] for r in rows])
    lo, hi = bootstrap(diffs)
    print(
        f"uncertain {np.mean([r['uncertain']['dice'] for r in rows]):.3f}, random "
        f"{np.mean([r['random']['dice'] for r in rows]):.3f}, before painting "
        f"{np.mean([r.get('m0_dice', r.get('start_dice')) for r in rows]):.3f}; "
        f"paired difference {diffs.mean():+.3f} (95 % interval {lo:+.3f} .. {hi:+.3f}), {len(rows)} pairs; "
        f"uncertain better in {(diffs > 0).sum()}/{len(rows)}"
    )


if __name__ == "__main__":
    main()
