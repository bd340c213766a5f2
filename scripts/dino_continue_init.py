"""A DINO checkpoint whose student and teacher start from a published ViT (e.g. ``dino_tiny_medical``).

    python scripts/dino_continue_init.py dino_tiny_medical runs/dino_hr/init.safetensors \
        --set img_size=256 --set global_size=128 --set local_size=48 --set head_use_bn=true --set out_dim=1024

The zoo keeps only the teacher backbone of a DINO run (a ``vit_*`` checkpoint), so continuing its training
needs a DINO model around it: both ViTs get the published weights (position tables resized to the new size),
the projection heads start fresh. ``medssl pretrain --model`` the written file then continues DINO training,
e.g. at a higher resolution (the CPU recipe in ``models/dino_tiny_medical/card.yaml``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from napari_medssl import zoo
from napari_medssl.models import create_model
from napari_medssl.models.dino_import import load_dino_checkpoint
from napari_medssl.models.registry import save_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="zoo name or checkpoint of a ViT (a DINO teacher backbone)")
    p.add_argument("out", type=Path, help="the DINO checkpoint to write")
    p.add_argument("--arch", default="dino_tiny", help="registered DINO builder (default dino_tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DINO option (JSON value)")
    args = p.parse_args()
    vit = zoo.load(args.source)
    kwargs = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    kwargs.update({k: getattr(vit, k) for k in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans")})
    dino = create_model(args.arch, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "vit.safetensors"
        save_model(vit.float(), src)
        report = load_dino_checkpoint(src, dino)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(dino, args.out, extra={"continued_from": str(args.source)})
    print(
        f"{args.out}: {len(report['loaded'])} backbone tensors from {args.source}, adapted {report['adapted']}"
    )


if __name__ == "__main__":
    main()
