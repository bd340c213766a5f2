"""The ``medssl attention`` sub-command: per-head [CLS] attention maps of one image, as DINO's
visualize_attention script writes them (the work is :mod:`napari_medssl.attention_files`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

DESCRIPTION = (
    "Write the last layer's [CLS] attention of a ViT-based model (DINO, MAE, MSMAE, MIRAM, ViT) on one image: "
    "head_0.tif, head_1.tif ... (float32, on the input's pixel grid), mask_K.tif with --threshold, and "
    "attention.json (patch grid, input size, each head's tissue lift, settings). The default resolution is the "
    "image's own, capped at 512 px on the long side on a CPU (1024 on a GPU) and never below a 64 x 64 patch "
    "grid. Example:\n  medssl attention --model dino_tiny_medical --input mdb005.png --out attn/"
)


def add_parser(sub: Any, parser_class: type) -> None:
    """Register ``attention`` on the ``medssl`` sub-parsers."""
    p = sub.add_parser(
        "attention",
        help="per-head attention maps of one image (TIFFs + attention.json)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, metavar="NAME|CKPT", help="zoo model, checkpoint or run folder (ViT-based)"
    )
    p.add_argument(
        "--input",
        required=True,
        metavar="IMAGE",
        help="PNG/TIFF image, NIfTI file, DICOM file or DICOM series folder (volumes: one slice)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--size",
        type=int,
        metavar="N",
        help="long side of the model's input in pixels (default: the image's own, capped at 512 on a CPU, "
        "at least 64 patches on the short side)",
    )
    p.add_argument("--head", type=int, metavar="H", help="write only this head (0-based; default all)")
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="also write mask_H.tif: the patches holding this share of each head's attention, in (0, 1]",
    )
    p.add_argument(
        "--slice", type=int, metavar="Z", help="volumes: slice along the first axis (default middle)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def cmd_attention(args: argparse.Namespace) -> int:
    """``attention``: the maps of one image into ``--out``."""
    from napari_medssl import zoo
    from napari_medssl.attention_files import image_plane, write_attention
    from napari_medssl.inference import pick_device

    device = pick_device(args.device)
    model = zoo.load(args.model, device=str(device)).eval()  # zoo name, checkpoint or run folder
    plane, info = image_plane(args.input, args.slice)
    record = write_attention(
        model,
        plane,
        args.out,
        size=args.size,
        head=args.head,
        threshold=args.threshold,
        device=device,
        settings={"model": str(args.model), **info},
    )
    print(json.dumps({k: record[k] for k in ("grid", "input_size", "tissue_lift", "best_head")}))
    return 0
