"""Re-predict the checkpoints of ``benchmarks/bench_adapt.py`` runs whole-slice and by windows of the training crop.

The same ``best.safetensors`` of each scenario (``RUN/<scenario>/start/``) predicted twice through
:func:`napari_medssl.inference.segment_probabilities` with the study's spacing and affine (what ``medssl predict``
does): once with the window its checkpoint records (or ``--window`` for checkpoints written before windows were
recorded), once with the window removed (whole slices, the behaviour before 2026-12-04). Dice on the scenario's
evaluated slices, as the benchmark scores it, and the seconds each prediction took (their ratio: what the windows
cost). History: docs/experiments/2026-12-04-adapt-windowed-inference.md.

    python scripts/adapt_repredict.py runs/bench_s11/seed0 runs/bench_s11/seed1 --window 96
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_adapt as ba  # noqa: E402

from napari_medssl import inference, slices25d  # noqa: E402
from napari_medssl.models.registry import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench_adapt.py --out folders")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--window", type=int, default=96, help="for checkpoints that record none (default 96)")
    ap.add_argument("--method", default="start", help="the benchmark method folder (start, random)")
    args = ap.parse_args()
    studies = {d: ba.study(Path(args.data), d) for d in (ba.FIRST, ba.FOLLOW)}
    print(
        "| run | scenario | Dice whole slice | Dice windows | s whole | s windows | time ratio |\n"
        "|---|---|---|---|---|---|---|"
    )
    for run in args.runs:
        for name in ("a_follow", "a_first", "b"):
            ckpt = run / name / args.method / "best.safetensors"
            if not ckpt.is_file():
                continue
            if name == "b":
                _, img, truth = studies[ba.FOLLOW]
                keep = np.ones(len(truth), bool)
            else:
                _, img, truth = studies[ba.FOLLOW if name == "a_follow" else ba.FIRST]
                keep = np.ones(len(truth), bool)
                keep[ba.top_slices(truth, 0.4)] = False
            model = load_model(str(ckpt))
            rec = model.spec.extra[slices25d.KEY]
            window = rec.get("window") or args.window
            scores, took = [], []
            for w in (None, window):
                rec["window"] = w
                t0 = time.perf_counter()
                probs = inference.segment_probabilities(
                    model, np.asarray(img.data), spacing=img.spacing, affine=img.affine
                )
                took.append(time.perf_counter() - t0)
                scores.append(ba.dice((probs.argmax(0) == 1)[keep], truth[keep]))
            print(
                f"| {run} | {name} | {scores[0]:.3f} | {scores[1]:.3f} | {took[0]:.2f} | {took[1]:.2f} | "
                f"{took[1] / took[0]:.2f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
