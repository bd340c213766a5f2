"""Which saliency map is more faithful for the mini-MIAS classifiers: Grad-CAM, attention rollout or raw
[CLS] attention, each against random maps, by deletion and insertion AUC (RISE's metrics, patch by patch).

    MEDSSL_DATA_DIR=../shared/data python benchmarks/bench_faithfulness.py \
        [--model scratch_vit_tiny_mias --model mae_tiny_mias ...] [--random 3] [--patches-per-step 1] \
        [--json out.json]

Images: the 42 validation mammograms of ``models/splits/mias_seed0.json`` (held out from every mini-MIAS
classifier), at each classifier's input size (64 x 64, as ``medssl predict`` feeds them). Target: the class the
model predicts. Deletion: patches replaced by a blurred copy (sigma 4 px) most salient first; lower AUC = more
faithful. Insertion: patches of the image pasted into the blurred copy; higher = more faithful. Random: the
mean AUC over ``--random`` uniform-noise maps per image. Printed per model and method: mean AUCs, and the
paired difference to random with a 95 % bootstrap interval (2000 resamples of women, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_medssl import explain, overlays, zoo
from napari_medssl.engine import readers
from napari_medssl.engine.metrics import grouped_bootstrap

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSSL_DATA_DIR", REPO.parent / "shared" / "data"))
MODELS = ("scratch_vit_tiny_mias", "mae_tiny_mias", "msmae_tiny_mias", "miram_tiny_mias")
METHODS = {
    "grad_cam": explain.grad_cam,
    "rollout": explain.attention_rollout,
    "raw_attention": explain.raw_attention,
}


def val_images() -> list[tuple[str, np.ndarray]]:
    """(woman, image) of the shared mini-MIAS validation split."""
    split = json.loads((REPO / "models" / "splits" / "mias_seed0.json").read_text())
    out = []
    for case in split["val"]:
        stem = case.split(":")[-1]
        img = readers.read_any(DATA / "mammography_mias" / f"{stem}.png")
        plane = overlays.take_plane(np.asarray(img.data), rgb=img.rgb).data
        out.append((f"w{(int(stem[3:]) + 1) // 2}", plane))
    return out


def run_model(name: str, images: list, n_random: int, step: int) -> dict:
    model = zoo.load(name).eval()
    aucs: dict[str, dict[str, list[float]]] = {
        m: {"deletion": [], "insertion": []} for m in (*METHODS, "random")
    }
    for i, (_, plane) in enumerate(images):
        x = overlays.model_input(plane, model)
        with torch.no_grad():
            target = int(model(x).argmax(dim=1))
        maps = {m: fn(model, x)[0] for m, fn in METHODS.items()}
        maps.update(
            {f"random{k}": r for k, r in enumerate(explain.random_maps(maps["grad_cam"].shape, n_random, i))}
        )
        res = {
            m: explain.deletion_insertion(model, x, s, target, patches_per_step=step) for m, s in maps.items()
        }
        for m in METHODS:
            for kind in ("deletion", "insertion"):
                aucs[m][kind].append(res[m][f"{kind}_auc"])
        for kind in ("deletion", "insertion"):
            aucs["random"][kind].append(
                float(np.mean([res[f"random{k}"][f"{kind}_auc"] for k in range(n_random)]))
            )
    return aucs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", action="append", help="zoo classifier (repeat; default the four mini-MIAS ones)"
    )
    p.add_argument("--random", type=int, default=3, help="random maps per image (default 3)")
    p.add_argument("--patches-per-step", type=int, default=1, help="patches per curve step (default 1)")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = val_images()
    groups = [g for g, _ in images]
    print(f"{len(images)} validation mammograms of {len(set(groups))} women; load {os.getloadavg()[0]:.1f}")
    out = {}
    for name in args.model or MODELS:
        t0 = time.perf_counter()
        aucs = run_model(name, images, args.random, args.patches_per_step)
        out[name] = summary = {}
        for m in METHODS:
            row = {}
            for kind, better in (("deletion", -1), ("insertion", 1)):
                a, r = np.array(aucs[m][kind]), np.array(aucs["random"][kind])
                lo, hi = grouped_bootstrap(better * (a - r), groups, np.mean)
                row[kind] = {
                    "auc": round(float(a.mean()), 4),
                    "random": round(float(r.mean()), 4),
                    "gain_vs_random": round(float((better * (a - r)).mean()), 4),
                    "gain_ci": [round(float(lo), 4), round(float(hi), 4)],
                }
            summary[m] = row
            print(
                f"{name:>22} {m:>13}: deletion {row['deletion']['auc']:.3f} (random {row['deletion']['random']:.3f}, "
                f"gain {row['deletion']['gain_vs_random']:+.3f} [{lo_hi(row['deletion'])}]); insertion "
                f"{row['insertion']['auc']:.3f} (random {row['insertion']['random']:.3f}, gain "
                f"{row['insertion']['gain_vs_random']:+.3f} [{lo_hi(row['insertion'])}])",
                flush=True,
            )
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def lo_hi(row: dict) -> str:
    return f"{row['gain_ci'][0]:+.3f}, {row['gain_ci'][1]:+.3f}"


if __name__ == "__main__":
    main()
