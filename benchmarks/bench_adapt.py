"""Learning a new structure from painted slices in a minute: ``medssl finetune --labels`` vs a random forest.

Issue 15's goals, on the enhancing glioblastoma tumour of TCIA Brain-Tumor-Progression PGBM-001 (T1
post-contrast; its ``MaskTumor`` series lies on the T1post grid: same shape, origin, direction and spacing,
checked here, so no resampling is needed):

- (a) paint 40 % of a study's tumour slices (those with the most tumour; ``max(1, round(0.4 n))``), Dice on
  its unpainted slices (every voxel of every unpainted slice); both studies;
- (b) paint every tumour slice of the first study (1991-11-19), Dice on the whole follow-up (1992-04-02).

Painting convention: tumour voxels 2, the rest of each painted slice 1 (background), other slices 0. Each
method gets the same paint, side by side in this one run:

- ``start``: ``medssl finetune --task segment --data T1post --labels painted.nii.gz --out DIR --max-minutes M``
  (the default starting point), then ``medssl predict --model DIR/best.safetensors --input T1post``;
- ``random``: the same with ``--model unet_tiny`` (random initialisation, same 2.5D recipe);
- ``forest``: the ilastik-style anchor: scikit-image ``multiscale_basic_features`` (intensity, edges,
  texture; sigma 1–16) per slice, sklearn ``RandomForestClassifier`` (100 trees) on the painted voxels.

Dice has a bootstrap 95 % interval over the evaluated slices (1000 resamples). Every process runs with one
torch thread under ``nice``; the 1-minute budget is wall-clock on a machine other jobs share, so the load
average and the steps done are printed beside each result.

    nice -n 10 python benchmarks/bench_adapt.py --minutes 1 --out runs/bench_adapt
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medssl.engine.adapt import check_grid  # noqa: E402
from napari_medssl.engine.readers import read_any, write_labels  # noqa: E402

FIRST, FOLLOW = "11-19-1991", "04-02-1992"


def study(data: Path, date: str) -> tuple:
    """``(T1post folder, Volume, tumour mask)`` of PGBM-001's study on ``date`` (mask checked on the grid)."""
    folder = Path(glob.glob(str(data / "dicom" / "tcia_btp_PGBM-001" / f"{date}*"))[0])
    t1 = next(folder.glob("*T1post*"))
    img, mask = read_any(t1), read_any(next(folder.glob("*MaskTumor*")))
    check_grid(img.data.shape, mask.data.shape, img.affine, mask.affine, img.spacing)
    return t1, img, mask.data > 0


def paint(mask: np.ndarray, slices: list[int]) -> np.ndarray:
    """Tumour 2, the rest of each painted slice 1, other slices 0."""
    out = np.zeros(mask.shape, np.uint8)
    out[slices] = 1
    out[slices] = np.where(mask[slices], 2, 1)
    return out


def top_slices(mask: np.ndarray, fraction: float) -> list[int]:
    """The ``max(1, round(fraction · n))`` tumour slices with the most tumour."""
    counts = mask.reshape(len(mask), -1).sum(1)
    tumour = np.flatnonzero(counts)
    k = max(1, int(round(fraction * len(tumour))))
    return sorted(int(z) for z in tumour[np.argsort(-counts[tumour], kind="stable")[:k]])


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    s = pred.sum() + truth.sum()
    return 1.0 if s == 0 else float(2 * (pred & truth).sum() / s)


def dice_interval(pred: np.ndarray, truth: np.ndarray, seed: int = 0, n: int = 1000) -> list[float]:
    """Bootstrap 95 % interval of the Dice over the slices (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    inter = (pred & truth).reshape(len(pred), -1).sum(1)
    total = pred.reshape(len(pred), -1).sum(1) + truth.reshape(len(truth), -1).sum(1)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(pred), len(pred))
        vals.append(2 * inter[idx].sum() / max(1, total[idx].sum()))
    return [round(float(v), 3) for v in np.percentile(vals, [2.5, 97.5])]


def forest(image: np.ndarray, painted: np.ndarray, target: np.ndarray, seed: int = 0) -> np.ndarray:
    """The random-forest anchor: trained on the painted voxels of ``image``, predicts ``target``."""
    from functools import partial

    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    from napari_medssl.transforms import normalize_intensity

    feats = partial(
        multiscale_basic_features,
        intensity=True,
        edges=True,
        texture=True,
        sigma_min=1,
        sigma_max=16,
        channel_axis=None,
    )
    src, dst = normalize_intensity(image), normalize_intensity(target)
    xs, ys = [], []
    rng = np.random.default_rng(seed)
    for z in np.flatnonzero(painted.reshape(len(painted), -1).any(1)):
        f = feats(src[z])
        lab = painted[z]
        for value in (1, 2):  # at most 20k voxels of each class per slice
            where = np.flatnonzero(lab.ravel() == value)
            take = rng.choice(where, min(len(where), 20000), replace=False) if len(where) else where
            xs.append(f.reshape(-1, f.shape[-1])[take])
            ys.append(np.full(len(take), value))
    clf = RandomForestClassifier(n_estimators=100, max_depth=None, n_jobs=1, random_state=seed)
    clf.fit(np.concatenate(xs), np.concatenate(ys))
    pred = np.zeros(target.shape, bool)
    for z in range(len(dst)):
        f = feats(dst[z])
        pred[z] = clf.predict(f.reshape(-1, f.shape[-1])).reshape(dst.shape[1:]) == 2
    return pred


def network(
    t1: Path,
    painted_file: Path,
    predict_on: Path,
    out: Path,
    minutes: float,
    model: str | None,
    threads: int = 1,
    seed: int = 0,
) -> tuple:
    """Fine-tune through the CLI contract and predict; ``(prediction == tumour, facts)``."""
    medssl = [sys.executable, "-m", "napari_medssl.engine.cli"]
    cmd = [
        *medssl,
        "finetune",
        "--task",
        "segment",
        "--data",
        str(t1),
        "--labels",
        str(painted_file),
        "--out",
        str(out),
        "--max-minutes",
        str(minutes),
        "--seed",
        str(seed),
        "--no-resume",
    ]
    threads_arg = ["--threads", str(threads)] if threads else []  # 0: torch's choice, as a user runs it
    cmd += threads_arg
    if model:
        cmd += ["--model", model]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if first is None and (out / "best.safetensors").is_file():
            first = time.monotonic() - t0
    if proc.wait() != 0:
        raise RuntimeError("".join(lines[-20:]))
    record = json.loads((out / "adapt.json").read_text())
    first_ckpt = [float(m.group(1)) for ln in lines if (m := re.search(r"\((\d+\.\d) s\)", ln))]
    pred_file = out / "pred.nii.gz"
    subprocess.run(
        [
            *medssl,
            "predict",
            "--model",
            str(out / "best.safetensors"),
            "--input",
            str(predict_on),
            "--output",
            str(pred_file),
            *threads_arg,
        ],
        check=True,
        capture_output=True,
    )
    facts = {
        "steps": record["steps"],
        "train_s": record["elapsed_s"],
        "clock": record["clock"],
        "train_wall_s": record["wall_s"],
        "train_cpu_s": record["cpu_s"],
        "command_s": round(time.monotonic() - t0, 1),
        "first_checkpoint_s_in_run": first_ckpt[0] if first_ckpt else None,
        "threads": threads or "torch default",
        "seed": seed,
        "load_avg_1min": round((load0 + os.getloadavg()[0]) / 2, 2),
    }
    return read_any(pred_file).data == 1, facts


def main() -> None:
    """Run every scenario and method; print one JSON line each and a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("MEDSSL_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--out", default="runs/bench_adapt")
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--methods", nargs="+", default=["start", "random", "forest"])
    ap.add_argument("--start-model", default=None, help="starting point (default: the zoo's)")
    ap.add_argument("--scenarios", nargs="+", default=["a_follow", "a_first", "b"])
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: the budget counts the training process's CPU seconds (one thread: an idle core)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (0: torch's choice, as `medssl` runs)"
    )
    ap.add_argument("--seed", type=int, default=0, help="`medssl finetune --seed`")
    args = ap.parse_args()
    os.environ["MEDSSL_ADAPT_CLOCK"] = args.clock
    data, out = Path(args.data), Path(args.out)
    studies = {d: study(data, d) for d in (FIRST, FOLLOW)}
    rows = []
    for name in args.scenarios:
        if name == "b":
            (t1, img, mask), (t1_eval, img_eval, truth) = studies[FIRST], studies[FOLLOW]
            slices = [int(z) for z in np.flatnonzero(mask.reshape(len(mask), -1).any(1))]
            keep = np.ones(len(truth), bool)
        else:
            t1, img, mask = studies[FOLLOW if name == "a_follow" else FIRST]
            t1_eval, img_eval, truth = t1, img, mask
            slices = top_slices(mask, 0.4)
            keep = np.ones(len(mask), bool)
            keep[slices] = False
        painted = paint(mask, slices)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        painted_file = write_labels(painted, img, folder / "painted.nii.gz")
        for method in args.methods:
            t0 = time.monotonic()
            facts: dict = {}
            if method == "forest":
                pred = forest(img.data, painted, img_eval.data)
                facts = {"train_and_predict_s": round(time.monotonic() - t0, 1)}
            else:
                model = args.start_model if method == "start" else "unet_tiny"
                pred, facts = network(
                    t1, painted_file, t1_eval, folder / method, args.minutes, model, args.threads, args.seed
                )
            d = dice(pred[keep], truth[keep])
            row = {
                "scenario": name,
                "method": method,
                "painted_slices": slices,
                "dice": round(d, 3),
                "ci95": dice_interval(pred[keep], truth[keep]),
                **facts,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| scenario | method | Dice | 95 % CI | steps | load |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['method']} | {r['dice']:.3f} | {r['ci95']} | {r.get('steps', '-')} | "
            f"{r.get('load_avg_1min', '-')} |"
        )


if __name__ == "__main__":
    main()
