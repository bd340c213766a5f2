"""Tissue lift of a DINO model's attention on held-out mammograms and brain MR slices, as `medssl attention`
computes it (same functions, same default resolution): median and bootstrap 95 % interval.

    MEDSSL_DATA_DIR=../shared/data python scripts/attention_lift.py --model dino_tiny_medical \
        [--model runs/x/best.safetensors] [--size N] [--json out.json]

Held out (never trained on by dino_tiny_medical or the CPU continuation of it; the card's validation split,
seed 0): the 42 mini-MIAS mammograms of 21 women in ``models/splits/dino_tiny_medical_seed0.json``'s ``val`` (``1:mdb…``,
as the card's ``split.val_ids`` lists them),
and every non-constant slice of the four MR series of TCIA PGBM-001's 1991-11-19 study (T1post, T1prereg,
FLAIRreg, T2reg; ``--mr-step 2``: every second one).

Two summaries per group, both printed:
- ``fixed head``: the head with the highest median lift, its median (what a reader who watches one head sees);
- ``best head per image``: the median over images of each image's highest head lift.
Intervals: 2000 bootstrap resamples of women (mammograms: a woman's two images together) or of slices (MR: the
slices of one series are correlated, so that interval is optimistic), percentile method, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from napari_medssl import overlays, zoo
from napari_medssl.engine import readers
from napari_medssl.engine.metrics import grouped_bootstrap

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSSL_DATA_DIR", REPO.parent / "shared" / "data"))
SPLIT = REPO / "models" / "splits" / "dino_tiny_medical_seed0.json"
MR_STUDY = "dicom/tcia_btp_PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993"
MR_SERIES = ("11-T1post-03326", "10008-T1prereg-91470", "35637-FLAIRreg-16386", "37910-T2reg-84816")


def held_out(
    mr_step: int = 1, part: str = "val", mg_step: int = 1
) -> dict[str, list[tuple[str, str, overlays.Plane]]]:
    """``{"mammograms": [(group, name, plane)], "MR slices": [...]}``: the card's held-out images (every
    ``mr_step``-th non-constant MR slice, every ``mg_step``-th mammogram). ``part="train"``: the training
    images of the same split instead (its mammograms; the MR series of PGBM-001's other study and PGBM-005), to
    choose between models without looking at the held-out images."""
    ids = json.loads(SPLIT.read_text())[part]
    mias = sorted(i.split(":", 1)[1] for i in ids if i.startswith("1:"))[::mg_step]
    out: dict[str, list] = {"mammograms": [], "MR slices": []}
    for stem in mias:
        img = readers.read_any(DATA / "mammography_mias" / f"{stem}.png")
        woman = f"w{(int(stem[3:]) + 1) // 2}"
        out["mammograms"].append((woman, stem, overlays.take_plane(np.asarray(img.data), rgb=img.rgb)))
    if part == "val":
        series = [DATA / MR_STUDY / s for s in MR_SERIES]
    else:
        roots = {"2": DATA / "dicom" / "tcia_btp_PGBM-001", "3": DATA / "dicom" / "tcia_btp_PGBM-005_T1post"}
        series = [roots[i[0]] / i[2:] for i in ids if i[0] in roots]
    for path in series:
        vol = np.asarray(readers.read_any(path).data)
        name = path.name if part == "val" else f"{path.parent.name}/{path.name}"
        for z in range(0, vol.shape[0], mr_step):
            if vol[z].max() > vol[z].min():
                out["MR slices"].append((f"{name}/{z}", f"{name}/{z}", overlays.take_plane(vol, (z, 0, 0))))
    return out


def evaluate(model: torch.nn.Module, images: dict, size: int | None, spec: str = "") -> dict:
    """Per group: lifts per image and head, grid sizes, both summaries with intervals, seconds per image
    (each group printed as it is done)."""
    result = {}
    for group, items in images.items():
        lifts, grids, t0 = [], set(), time.perf_counter()
        for _, _, plane in items:
            att = overlays.attention_heads(model, plane, size)
            lifts.append(att["tissue_lift"])
            grids.add(tuple(att["grid"]))
        secs = (time.perf_counter() - t0) / len(items)
        lifts = np.array(lifts)  # (images, H)
        groups = [g for g, _, _ in items]
        per_head = np.median(lifts, axis=0)
        head = int(np.nanargmax(per_head))
        lo, hi = grouped_bootstrap(lifts, groups)
        best = np.nanmax(lifts, axis=1)
        blo, bhi = grouped_bootstrap(best[:, None], groups)
        result[group] = {
            "n_images": len(items),
            "n_groups": len(set(groups)),
            "grids": sorted(grids),
            "median_per_head": [round(float(v), 3) for v in per_head],
            "fixed_head": head,
            "fixed_head_median": round(float(per_head[head]), 3),
            "fixed_head_ci": [round(float(lo[head]), 3), round(float(hi[head]), 3)],
            "best_head_per_image_median": round(float(np.median(best)), 3),
            "best_head_per_image_ci": [round(float(blo[0]), 3), round(float(bhi[0]), 3)],
            "seconds_per_image": round(secs, 3),
            "lifts": lifts.round(4).tolist(),
        }
        report(spec, group, result[group])
    return result


def report(spec: str, group: str, r: dict) -> None:
    print(
        f"{spec} | {group} ({r['n_images']} images, {r['n_groups']} groups, grids {r['grids'][:3]}): "
        f"per-head medians {r['median_per_head']}; fixed head {r['fixed_head']} median "
        f"{r['fixed_head_median']} [{r['fixed_head_ci'][0]}, {r['fixed_head_ci'][1]}]; best head per "
        f"image median {r['best_head_per_image_median']} [{r['best_head_per_image_ci'][0]}, "
        f"{r['best_head_per_image_ci'][1]}]; {r['seconds_per_image']} s/image",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="zoo name or checkpoint (repeat)")
    p.add_argument("--size", type=int, help="long side in pixels (default: medssl attention's default)")
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mr-step", type=int, default=1, help="every N-th MR slice (default 1: all)")
    p.add_argument("--mg-step", type=int, default=1, help="every N-th mammogram (default 1: all)")
    p.add_argument(
        "--images",
        choices=("val", "train"),
        default="val",
        help="val: the held-out images (default); train: the split's training images, to pick between models",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = held_out(args.mr_step, args.images, args.mg_step)
    results = {}
    for spec in args.model:
        model = zoo.load(spec).eval()
        results[spec] = evaluate(model, images, args.size, spec)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=list))


if __name__ == "__main__":
    main()
