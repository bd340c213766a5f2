"""Woman-grouped k-fold comparison of MIRAM, MAE, MSMAE and a from-scratch ViT as full-resolution patch
classifiers of mini-MIAS, scored per image by the sliding-window pipeline (napari_medssl.mammo).

Per method: (1) self-supervised pretraining on unlabelled breast patches of every development image (not for
the scratch ViT; labels are not used); (2) for each fold, a patch classifier (finding vs normal tissue)
fine-tuned for a fixed number of steps on the other folds' women, then every held-out image scored (top-k
mean of the windows; fixed in advance, nothing selected on the held-out fold); (3) image-level AUC over all
folds with a bootstrap 95 % interval (women resampled), AUC of the window maximum, and the share of marked
findings whose heatmap peak lies within radius + 16 px; (4) with ``--final``, the classifier fine-tuned on
every development woman with the same recipe (what the zoo ships).

Resumable: finished pieces (pretrained weights, fold checkpoints, per-fold scores) are reused.

Usage (from the checkout root; one torch thread, nice)::

    nice -n 10 python scripts/mammo_cv.py --data ../shared/data/mammography_mias --out runs/mammo_cv \\
        --methods miram scratch mae msmae --folds 3 --pretrain-steps 250 --finetune-steps 100 --final
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from napari_medssl import mammo  # noqa: E402
from napari_medssl.engine import mammo_train as mt  # noqa: E402
from napari_medssl.engine.metrics import bootstrap_auc  # noqa: E402
from napari_medssl.models.registry import load_model, save_model  # noqa: E402


def log(msg: str, out: Path) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(out / "log.txt", "a") as fh:
        fh.write(line + "\n")


def checkpoint_extra(method: str, args: argparse.Namespace, trained_on: list[str], pretrained: bool) -> dict:
    """What predict/evaluate need (the pipeline) and how the model was made."""
    return {
        "task": "classify",
        "class_names": ["normal", "abnormal"],
        "mammo": pipeline_of_run(args),
        "recipe": {
            "method": method,
            "pretrain_steps": args.pretrain_steps if pretrained else 0,
            "finetune_steps": args.finetune_steps,
            "batch_size": args.batch_size,
            "finetune_lr": args.lr,
            "augment": args.augment,
            "hard_rounds": args.hard_rounds,
            "hard_fraction": args.hard_fraction,
            "trained_on_images": len(trained_on),
            "encoder": encoder_of(args),
            "script": "scripts/mammo_cv.py",
        },
        "trained_on": trained_on,
    }


def pipeline_of_run(args: argparse.Namespace) -> dict:
    """The scoring pipeline of this run: the default one at ``--scale``."""
    pipe = dict(mammo.DEFAULT_PIPELINE)
    pipe.update(scale=args.scale, pixel_um=mammo.DEFAULT_PIPELINE["pixel_um"] * args.scale, tta=args.tta)
    return pipe


def encoder_of(args: argparse.Namespace) -> dict:
    """Encoder-size overrides (the same for every method); empty for the CPU defaults of METHODS."""
    keys = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads}
    return {k: v for k, v in keys.items() if v}


def evaluate_fold(
    model: torch.nn.Module, images: list[mammo.MammoImage], batch_size: int = 32, pipe: dict | None = None
) -> list[dict]:
    rows = []
    pipe = pipe or mammo.DEFAULT_PIPELINE
    for im in images:
        res = mammo.score_crop(model, im.crop, pipe, batch_size)
        hit = mammo.peak_hit(res["peak"], im, pipe)
        rows.append(
            {
                "id": im.id,
                "woman": im.woman,
                "abnormal": im.abnormal,
                "score_topk": res["score"],
                "score_max": float(res["probs"].max()),
                "peak": list(im.crop.to_input(res["peak"])),
                "n_findings": len(im.findings),
                "peak_hit": hit,
                "window_probs": [round(float(p), 5) for p in res["probs"]],
            }
        )
    return rows


def patch_scores(model: torch.nn.Module, test: list[mammo.MammoImage], args: argparse.Namespace) -> dict:
    """Abnormal probability of ``--patch-eval`` labelled held-out patches (half finding, half normal tissue;
    drawn as in training, flips only, a fixed seed): separates the patch classifier from the image scoring."""
    if args.patch_eval <= 0 or not any(im.findings for im in test):
        return {"probs": [], "labels": []}
    sampler = mammo.PatchSampler(test, seed=args.seed + 5000)
    x, y = sampler.batch(args.patch_eval, labelled=True)
    probs = mammo.window_probabilities(model, x[:, 0].numpy(), args.eval_batch)
    return {"probs": probs.tolist(), "labels": y.tolist()}


def patch_summary(mdir: Path, folds: int) -> dict:
    """Patch-level AUC per held-out fold and pooled (``{}`` when the fold files have no patch scores)."""
    from napari_medssl.engine.metrics import roc_auc

    per, probs, labels = [], [], []
    for f in range(folds):
        path = mdir / f"fold{f}_patches.json"
        if not path.is_file():
            return {}
        d = json.loads(path.read_text())
        if len(set(d["labels"])) < 2:
            return {}
        per.append(roc_auc(np.array(d["probs"]), np.array(d["labels"])))
        probs += d["probs"]
        labels += d["labels"]
    return {"patch_auc_folds": per, "patch_auc_pooled": roc_auc(np.array(probs), np.array(labels))}


def summarise(rows: list[dict]) -> dict:
    labels = np.array([r["abnormal"] for r in rows])
    groups = [r["woman"] for r in rows]
    auc, lo, hi = bootstrap_auc(np.array([r["score_topk"] for r in rows]), labels, groups)
    auc_max, lo_m, hi_m = bootstrap_auc(np.array([r["score_max"] for r in rows]), labels, groups)
    hits = [r["peak_hit"] for r in rows if r["peak_hit"] is not None]
    return {
        "n_images": len(rows),
        "n_abnormal": int(labels.sum()),
        "auc_topk": auc,
        "auc_topk_ci95": [lo, hi],
        "auc_max": auc_max,
        "auc_max_ci95": [lo_m, hi_m],
        "peak_hit_rate": float(np.mean(hits)) if hits else float("nan"),
        "peak_hits": int(np.sum(hits)),
        "n_marked": len(hits),
    }


def train_classifier(
    method: str,
    pre: torch.nn.Module | None,
    train: list[mammo.MammoImage],
    seed: int,
    path: Path,
    args: argparse.Namespace,
    out: Path,
) -> torch.nn.Module:
    """Fine-tune ``method``'s patch classifier (from ``pre``) on ``train`` and save it to ``path``."""
    torch.manual_seed(seed)
    model = mt.classifier_from(method, pre, encoder_of(args), args.device)
    sampler = mammo.PatchSampler(train, seed=seed + 100, augment=args.augment)
    what = f"{method} {path.stem}"
    mt.finetune(
        model,
        sampler,
        args.finetune_steps,
        args.batch_size,
        lr=args.lr,
        log=lambda m: log(m, out),
        what=what,
        hard_rounds=args.hard_rounds,
        hard_fraction=args.hard_fraction,
    )
    save_model(model, path, checkpoint_extra(method, args, [i.id for i in train], pre is not None))
    return model


def run_method(method: str, images: list[mammo.MammoImage], folds: list[int], args, out: Path) -> dict:
    mdir = out / method
    mdir.mkdir(parents=True, exist_ok=True)
    pre = None
    if method not in mt.SUPERVISED_ONLY:
        pre_path = mdir / "pretrained.safetensors"
        if pre_path.is_file():
            pre = load_model(pre_path, map_location=args.device)
        else:
            torch.manual_seed(args.seed)
            sampler = mammo.PatchSampler(images, seed=args.seed, augment=args.augment)
            pre = mt.pretrain(
                method,
                sampler,
                args.pretrain_steps,
                args.batch_size,
                lr=1e-3,
                log=lambda m: log(m, out),
                device=args.device,
                encoder=encoder_of(args),
            )
            save_model(pre, pre_path, {"task": "pretrain", "mammo": pipeline_of_run(args)})
    rows: list[dict] = []
    for f in range(args.folds):
        fold_json = mdir / f"fold{f}.json"
        if fold_json.is_file():
            rows += json.loads(fold_json.read_text())
            continue
        train = [im for im, k in zip(images, folds) if k != f]
        test = [im for im, k in zip(images, folds) if k == f]
        fold_ckpt = mdir / f"fold{f}.safetensors"
        if fold_ckpt.is_file():  # trained before (e.g. re-scoring a run with another pipeline): reuse it
            model = load_model(fold_ckpt, map_location=args.device).eval()
        else:
            model = train_classifier(method, pre, train, args.seed + f, fold_ckpt, args, out)
        fold_rows = [
            dict(r, fold=f) for r in evaluate_fold(model, test, args.eval_batch, pipeline_of_run(args))
        ]
        fold_json.write_text(json.dumps(fold_rows))
        patch_json = mdir / f"fold{f}_patches.json"
        if not patch_json.is_file():
            patch_json.write_text(json.dumps(patch_scores(model, test, args)))
        rows += fold_rows
        log(
            f"{method} fold {f}: {summarise(fold_rows) if len({r['abnormal'] for r in fold_rows}) > 1 else ''}",
            out,
        )
    summary = {
        "method": method,
        **summarise(rows),
        "folds": args.folds,
        "pretrain_steps": 0 if method in mt.SUPERVISED_ONLY else args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "batch_size": args.batch_size,
        "augment": args.augment,
        "hard_rounds": args.hard_rounds,
        "scale": args.scale,
        "tta": args.tta,
        **patch_summary(mdir, args.folds),
    }
    (mdir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"SUMMARY {json.dumps(summary)}", out)
    if args.final and not (mdir / "final.safetensors").is_file():
        train_classifier(method, pre, images, args.seed + 1000, mdir / "final.safetensors", args, out)
    return summary


def paired_difference(
    a: list[dict], b: list[dict], n: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """AUC(a) − AUC(b) on the same images with a bootstrap 95 % interval (women resampled, both together)."""
    from napari_medssl.engine.metrics import roc_auc

    sb = {r["id"]: r["score_topk"] for r in b}
    ids = [r["id"] for r in a if r["id"] in sb]
    sa = {r["id"]: r["score_topk"] for r in a}
    lab = {r["id"]: r["abnormal"] for r in a}
    women = sorted({r["woman"] for r in a})
    members = {w: [r["id"] for r in a if r["woman"] == w and r["id"] in sb] for w in women}

    def diff(sel: list[str]) -> float:
        y = np.array([lab[i] for i in sel])
        return roc_auc(np.array([sa[i] for i in sel]), y) - roc_auc(np.array([sb[i] for i in sel]), y)

    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        sel = [i for j in rng.integers(0, len(women), len(women)) for i in members[women[j]]]
        if len({lab[i] for i in sel}) == 2:
            vals.append(diff(sel))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return diff(ids), float(lo), float(hi)


def roc_auc_of(rows: list[dict]) -> float:
    """Image AUC (top-k score) of some rows; NaN when a class is missing."""
    from napari_medssl.engine.metrics import roc_auc

    return roc_auc(np.array([r["score_topk"] for r in rows]), np.array([r["abnormal"] for r in rows]))


def table(out: Path, methods: list[str]) -> str:
    """Markdown table of the finished methods' summaries and paired AUC differences against MIRAM."""
    rows, per = [], {}
    for m in methods:
        if not (out / m / "summary.json").is_file():
            continue
        s = json.loads((out / m / "summary.json").read_text())
        per[m] = [r for f in range(s["folds"]) for r in json.loads((out / m / f"fold{f}.json").read_text())]
        lo, hi = s["auc_topk_ci95"]
        lo_m, hi_m = s["auc_max_ci95"]
        folds = [roc_auc_of([r for r in per[m] if r.get("fold") == f]) for f in range(s["folds"])]
        patch = s.get("patch_auc_pooled")
        rows.append(
            f"| {m} | {s['pretrain_steps']} + {s['finetune_steps']} | {s['auc_topk']:.3f} ({lo:.3f}–{hi:.3f}) | "
            f"{s['auc_max']:.3f} ({lo_m:.3f}–{hi_m:.3f}) | {s['peak_hits']}/{s['n_marked']} "
            f"({100 * s['peak_hit_rate']:.0f} %) | {', '.join(f'{a:.3f}' for a in folds)} | "
            f"{'—' if patch is None else f'{patch:.3f}'} |"
        )
    head = (
        "| method | steps (pretrain + fine-tune) | AUC top-3 mean (95 % CI) | AUC max (95 % CI) | "
        "heatmap peak in finding | per-fold AUC (top-3) | patch AUC (held-out) |\n|---|---|---|---|---|---|---|"
    )
    lines = [head, *rows]
    if "miram" in per:
        for m in [k for k in per if k != "miram"]:
            d, lo, hi = paired_difference(per["miram"], per[m])
            lines.append(
                f"\nMIRAM − {m}: AUC {d:+.3f} (paired bootstrap 95 % interval {lo:+.3f} .. {hi:+.3f})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="mini-MIAS-format folder (labels.csv + images)")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument(
        "--methods", nargs="+", default=["miram", "scratch", "mae", "msmae"], choices=sorted(mt.METHODS)
    )
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--pretrain-steps", type=int, default=250)
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4, help="fine-tuning peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--augment",
        default="flip",
        choices=mammo.AUGMENTATIONS,
        help="training-patch augmentation (all methods)",
    )
    ap.add_argument(
        "--scale",
        type=int,
        default=1,
        help="reduce the breast crop by this factor before the 128-px windows (2: 400 µm, 51-mm windows)",
    )
    ap.add_argument(
        "--tta", action="store_true", help="score each window as the mean over its 8 rotations/reflections"
    )
    ap.add_argument(
        "--hard-rounds",
        type=int,
        default=0,
        help="hard-negative mining rounds during fine-tuning (0: none; training images only)",
    )
    ap.add_argument(
        "--hard-fraction",
        type=float,
        default=0.5,
        help="share of normal patches drawn from the mined windows",
    )
    ap.add_argument(
        "--patch-eval",
        type=int,
        default=256,
        help="held-out labelled patches per fold for the patch-level AUC",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast in training on cuda)")
    ap.add_argument("--eval-batch", type=int, default=32, help="windows per forward pass when scoring")
    ap.add_argument("--embed-dim", type=int, help="encoder width for every method (default 128)")
    ap.add_argument("--depth", type=int, help="encoder depth for every method (default 4)")
    ap.add_argument("--heads", type=int, help="encoder heads for every method (default 4)")
    ap.add_argument("--table", action="store_true", help="print the finished methods' table and stop")
    ap.add_argument("--prepare-only", action="store_true", help="crop the images into OUT/prepared.pkl, stop")
    ap.add_argument("--limit", type=int, help="only the first N images (smoke tests)")
    ap.add_argument("--final", action="store_true", help="also fine-tune on every woman (the shipped model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.table:
        print(table(out, args.methods))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ("prepared.pkl" if args.scale == 1 else f"prepared_s{args.scale}.pkl")
    if cache.is_file():
        images = pickle.loads(cache.read_bytes())
    else:
        images = mammo.prepare_images(args.data, scale=args.scale)
        cache.write_bytes(pickle.dumps(images))
    if args.prepare_only:
        return 0
    if args.limit:
        images = images[: args.limit]
    folds = mt.woman_folds(
        [i.id for i in images], [i.woman for i in images], [i.abnormal for i in images], args.folds, args.seed
    )
    (out / "folds.json").write_text(json.dumps({i.id: k for i, k in zip(images, folds)}, indent=0))
    log(
        f"{len(images)} images, {sum(i.abnormal for i in images)} abnormal, folds {np.bincount(folds).tolist()}",
        out,
    )
    results = [run_method(m, images, folds, args, out) for m in args.methods]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
