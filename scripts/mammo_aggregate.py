"""How a mammogram's window probabilities become one image score: AUC of several rules on a finished
``scripts/mammo_cv.py`` run, and an honest (nested) choice between them.

Every fold file of ``mammo_cv.py`` keeps each held-out image's sliding-window probabilities
(``window_probs``). This script scores the same held-out images with other rules, no model run:

- ``max``, ``top1`` .. ``top10`` (mean of the k best windows), ``mean`` (all windows),
- ``contrast3`` (mean of the 3 best minus the median window: how much an image's worst spot stands out of its
  own breast; dense breasts score high everywhere).

``nested``: for each fold, the rule with the best AUC on the *other* folds' held-out images is applied to this
fold (the fold's own labels never take part in its choice); the pooled AUC of those scores is the honest
figure for "choose the rule on our data". The per-rule AUCs are exploratory: picking the best of them after
seeing them is selection on the reported images.

    python scripts/mammo_aggregate.py runs/cv_hard/cnn [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_medssl.engine.metrics import bootstrap_auc, roc_auc  # noqa: E402


def _topk(k: int) -> Callable[[np.ndarray], float]:
    return lambda p: float(np.sort(p)[-min(k, p.size) :].mean())


RULES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda p: float(p.max()),
    **{f"top{k}": _topk(k) for k in (2, 3, 5, 10)},
    "mean": lambda p: float(p.mean()),
    "contrast3": lambda p: _topk(3)(p) - float(np.median(p)),
}


def load_rows(method_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(method_dir.glob("fold[0-9].json")):
        rows += json.loads(path.read_text())
    if not rows or "window_probs" not in rows[0]:
        raise SystemExit(f"{method_dir}: no fold files with window_probs (rerun mammo_cv.py to make them)")
    return rows


def auc_of(rows: list[dict], rule: str) -> float:
    scores = np.array([RULES[rule](np.array(r["window_probs"])) for r in rows])
    return roc_auc(scores, np.array([r["abnormal"] for r in rows]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method_dir", type=Path, help="a mammo_cv.py run's method folder (fold*.json)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    rows = load_rows(args.method_dir)
    labels = np.array([r["abnormal"] for r in rows])
    groups = [r["woman"] for r in rows]
    out: dict = {"n_images": len(rows), "rules": {}}
    print("| rule | pooled AUC (95 % CI, women resampled) | per-fold AUC |\n|---|---|---|")
    folds = sorted({r["fold"] for r in rows})
    for rule, fn in RULES.items():
        scores = np.array([fn(np.array(r["window_probs"])) for r in rows])
        auc, lo, hi = bootstrap_auc(scores, labels, groups)
        per = [auc_of([r for r in rows if r["fold"] == f], rule) for f in folds]
        out["rules"][rule] = {"auc": auc, "ci95": [lo, hi], "folds": per}
        print(f"| {rule} | {auc:.3f} ({lo:.3f}–{hi:.3f}) | {', '.join(f'{a:.3f}' for a in per)} |")
    chosen, nested = {}, []
    for f in folds:
        others = [r for r in rows if r["fold"] != f]
        best = max(RULES, key=lambda rule: auc_of(others, rule))
        chosen[f] = best
        nested += [(RULES[best](np.array(r["window_probs"])), r) for r in rows if r["fold"] == f]
    scores = np.array([s for s, _ in nested])
    auc, lo, hi = bootstrap_auc(
        scores, np.array([r["abnormal"] for _, r in nested]), [r["woman"] for _, r in nested]
    )
    out["nested"] = {"auc": auc, "ci95": [lo, hi], "chosen": chosen}
    print(
        f"\nnested choice (rule picked on the other folds): AUC {auc:.3f} ({lo:.3f}–{hi:.3f}), chosen {chosen}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
