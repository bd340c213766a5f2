"""Publish a training run's best checkpoint into the zoo with metrics from ``medssl evaluate``: the weights go to
``models/<name>/model.safetensors`` (local, and the file to upload as release asset ``<name>/model.safetensors``,
see ``zoo.ZOO_URL``), the card to ``napari_medssl/zoo_cards/<name>.yaml`` (shipped in the package).

Steps: (1) take ``RUN/best.safetensors``; ``--fp16`` stores the weights as float16 (they load into float32
models; needed to stay under 10 MB for models that carry a ViT), ``--dino-backbone`` keeps only a DINO run's
teacher ViT (saved as a ``vit_*`` checkpoint: what ``attention_maps`` and ``dinocnn_*`` use; ``--vit-size N``
sets its input size, e.g. 64 for a DINO continued on 512-px images), and ``--drop-config KEY`` removes a
build-time key (a ``dino_checkpoint`` path; the weights are in the file);
(2) publish with :func:`napari_medssl.zoo.publish`; (3) with ``--data``, run ``medssl evaluate`` on the
published zoo model's validation split and re-write the card with those metrics and that exact command;
``--also-tta`` (segmenters) runs it a second time with ``--tta`` (mirroring test-time augmentation) and adds
those as ``metrics_tta`` with their own ``metrics_tta_command``.

``--rename-classes NAME CLASS...`` (alone) re-publishes a zoo model with its classes named, nothing else changed.

Usage (from the checkout root)::

    python scripts/zoo_publish.py --run runs/unet_tiny_hippocampus --name unet_tiny_hippocampus \\
        --data ../shared/data/hippocampus --dataset hippocampus --command "medssl finetune ..." \\
        --description "2D U-Net (tiny) segmenting hippocampus head/body on MSD Task04 axial slices"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from napari_medssl import zoo  # noqa: E402
from napari_medssl.models.layers.pos_embed import resize_pos_embed  # noqa: E402
from napari_medssl.models.registry import create_model, read_checkpoint, save_model  # noqa: E402
from napari_medssl.models.spec import attach_spec  # noqa: E402

DATASETS = {
    "hippocampus": {
        "name": "Medical Segmentation Decathlon Task04 Hippocampus (Vanderbilt), 198 labelled MRI crops",
        "path": "../shared/data/hippocampus",
        "licence": "CC-BY-SA 4.0",
        "citation": "Simpson et al. 2019, arXiv:1902.09063; Antonelli et al. 2022, Nat Commun 13:4128",
    },
    "mias": {
        "name": "mini-MIAS (MIAS MiniMammographic Database), 200 mammograms (normal vs abnormal)",
        "path": "../shared/data/mammography_mias",
        "licence": "MIAS licence: research use only; no rent, lease or sale (Licence.txt)",
        "citation": "Suckling et al. 1994, The Mammographic Image Analysis Society digital mammogram database",
    },
    "medical": {
        "name": "2D slices/images of MSD Task04 Hippocampus + mini-MIAS + TCIA Brain-Tumor-Progression "
        "PGBM-001 (two studies: T1post, T1prereg, FLAIRreg, T2reg) and PGBM-005 T1post",
        "path": "../shared/data/hippocampus, ../shared/data/mammography_mias, "
        "../shared/data/dicom/tcia_btp_PGBM-001, ../shared/data/dicom/tcia_btp_PGBM-005_T1post",
        "licence": "CC-BY-SA 4.0 (hippocampus); MIAS research-use-only licence; TCIA CC BY (data usage policy)",
        "citation": "Simpson et al. 2019; Suckling et al. 1994; Schmainda & Prah 2018 (TCIA), Clark et al. 2013",
    },
}
SPLIT_FILES = {
    "hippocampus": "models/splits/hippocampus_seed0.json (--split-file; the same for every hippocampus model)",
    "mias": "models/splits/mias_seed0.json (--split-file; the same for every mini-MIAS model)",
    "medical": "the run's own seeded split (seed 0, 20% of cases per data set held out)",
}
LICENCE = {
    "hippocampus": "weights: CC-BY-SA 4.0 (inherits the Task04 data licence)",
    "mias": "weights: research use only, no rent/lease/sale (inherits the MIAS licence)",
    "medical": "weights: research use only (inherits the MIAS terms), CC-BY-SA 4.0 and TCIA CC BY attributions",
}


def convert(
    run: Path,
    fp16: bool,
    dino_backbone: bool,
    drop: list[str],
    class_names: list[str] | None = None,
    vit_size: int | None = None,
) -> Path:
    """The file to publish: ``best.safetensors`` as is, or re-saved (fp16 / backbone only / config trimmed /
    class names set). ``vit_size``: the published DINO backbone's input size (default: the DINO's own), its
    position table resized to that grid."""
    src = run / "best.safetensors"
    if not (fp16 or dino_backbone or drop or class_names):
        return src
    state, config, extra = read_checkpoint(src)
    if class_names:
        k = extra.get("num_classes")
        if k is not None and len(class_names) != int(k):
            raise SystemExit(f"--class-names gives {len(class_names)} names for {k} classes")
        extra = {**extra, "class_names": list(class_names)}
    name = config.pop("name")
    for key in drop:
        config.pop(key, None)
    if dino_backbone:
        prefix = "teacher."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise SystemExit(
                f"{src}: no teacher.* tensors; keys start with {sorted({k.split('.')[0] for k in state})}"
            )
        dino = create_model(name, **config)
        vit = dino.backbone
        vit_cfg = {k: getattr(vit, k) for k in ("embed_dim", "depth", "num_heads") if hasattr(vit, k)}
        vit_cfg["img_size"] = list(vit.input_size) if vit_size is None else vit_size
        model = create_model("vit_tiny" if name.endswith("tiny") else "vit_small", **vit_cfg)
        own = model.state_dict()
        sub = {k: v for k, v in sub.items() if k in own}
        if sub["pos_embed"].shape != own["pos_embed"].shape:  # --vit-size: the fixed table on the new grid
            pos = sub["pos_embed"]
            grid = resize_pos_embed(pos[:, 1:], vit.base_grid, model.base_grid)
            sub["pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)
        model.load_state_dict(sub, strict=True)
        extra = {**extra, "task": "pretrain", "dino_source": f"{name} teacher backbone"}
    else:
        model = create_model(name, **config)
        model.load_state_dict(state, strict=True)
    if fp16:
        model = model.half()
    attach_spec(model, extra)
    out = run / ("zoo_fp16.safetensors" if fp16 else "zoo.safetensors")
    save_model(model, out, extra=extra)
    return out


def portable(text: str) -> str:
    """A recorded command or path as the card ships it: this checkout's data folder as ``$MEDSSL_DATA_DIR``."""
    for local in (str((ROOT.parent / "shared" / "data").resolve()), "../shared/data"):
        text = text.replace(local, "$MEDSSL_DATA_DIR")
    return text


def rename_classes(name: str, class_names: list[str]) -> Path:
    """Re-publish zoo model ``name`` with its classes named (same weights, same metrics: names change no
    number); the card keeps every other field."""
    import tempfile

    card = dict(zoo.card(name))
    src = zoo.weights_path(name)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        (run / "best.safetensors").symlink_to(src.resolve())
        state, config, extra = read_checkpoint(src)
        fp16 = any(v.dtype == torch.float16 for v in state.values())
        ckpt = convert(run, fp16, False, [], class_names)
        for key in ("name", "architecture", "task", "classes", "weights", "folder", "card_path"):
            card.pop(key, None)
        fields = {
            k: card.pop(k)
            for k in ("description", "command", "metrics", "metrics_command", "data", "licence")
        }
        return zoo.publish(ckpt, name, **fields, **card)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--rename-classes":  # --rename-classes NAME CLASS0 CLASS1 ...
        print(rename_classes(sys.argv[2], sys.argv[3:]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--data", help="data folder for `medssl evaluate --split val` (none: no evaluation)")
    p.add_argument("--command", required=True, help="the exact command(s) that trained it")
    p.add_argument("--description", required=True)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--dino-backbone", action="store_true")
    p.add_argument(
        "--vit-size",
        type=int,
        help="with --dino-backbone: the ViT's input size (default: the DINO's img_size), e.g. 64 for a DINO "
        "continued on 512-px images whose fixed position table is the 64-px one resized",
    )
    p.add_argument("--drop-config", action="append", default=[])
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--also-tta", action="store_true", help="also evaluate with --tta (segmenters)")
    p.add_argument("--class-names", nargs="+", help="name the classes in the published weights (in order)")
    p.add_argument(
        "--metrics-json",
        help="metrics for a model `medssl evaluate` cannot score (pretraining); with --data, added to its "
        "metrics (e.g. the cross-validation's cv3_*)",
    )
    p.add_argument("--metrics-command", default="", help="how --metrics-json was measured")
    p.add_argument(
        "--split-note", help="what the split is, for the card (default: the data set's split file)"
    )
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="FIELD",
        help="copy this field (e.g. domain) from the card already published under --name (a new version of a "
        "model whose domain has not changed)",
    )
    args = p.parse_args()

    ckpt = convert(args.run, args.fp16, args.dino_backbone, args.drop_config, args.class_names, args.vit_size)
    split = json.loads((args.run / "split.json").read_text())
    cfg_path = args.run / "config.json"  # absent for a model that was not trained itself (an ensemble)
    train_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else None
    split_entry = {
        "file": args.split_note or SPLIT_FILES[args.dataset],
        "seed": split.get("seed"),
        "val_fraction": split.get("val_fraction"),
        "n_train": len(split["train"]),
        "n_val": len(split["val"]),
        "val_ids": split["val"],
    }
    training = None
    if train_cfg is not None:
        keys = ("max_steps", "max_minutes", "batch_size", "lr", "warmup_steps", "seed", "device")
        training = {k: train_cfg[k] for k in keys if train_cfg.get(k) is not None}
        last = args.run / "last.json"
        if last.is_file():  # the steps the run did (a time-bound run stops before max_steps)
            training["steps_done"] = json.loads(last.read_text())["step"]
    more = {"split": split_entry, "training": training, "notes": args.note}
    if args.keep:
        old = zoo.card(args.name)
        missing = [k for k in args.keep if k not in old]
        if missing:
            raise SystemExit(f"the published card of {args.name} has no {missing}")
        more.update({k: old[k] for k in args.keep})
    common = dict(
        description=args.description,
        command=portable(args.command),
        data={k: portable(v) for k, v in DATASETS[args.dataset].items()},
        licence=LICENCE[args.dataset],
        **more,
    )
    given = json.loads(args.metrics_json) if args.metrics_json else {}
    folder = zoo.publish(ckpt, args.name, metrics=given, metrics_command=portable(args.metrics_command), **common)
    if not args.data:
        print(folder)
        return
    cmd = [
        "medssl", "evaluate", "--model", args.name, "--data", args.data, "--split", "val",
        "--out", "metrics.json", "--device", "cpu", "--batch-size", str(args.eval_batch_size),
    ]  # fmt: skip

    def evaluate(cmd: list[str], out: Path) -> dict:
        run_cmd = [str(ROOT / ".venv/bin/medssl"), *cmd[1:]]
        run_cmd[run_cmd.index("--out") + 1] = str(out)
        subprocess.run(run_cmd, check=True, cwd=ROOT)
        metrics = json.loads(out.read_text())["metrics"]
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}

    metrics = {**evaluate(cmd, args.run / "zoo_metrics.json"), **given}  # --metrics-json adds (cv3_*)
    if args.also_tta:
        tta_cmd = [*cmd, "--tta"]
        common["metrics_tta"] = evaluate(tta_cmd, args.run / "zoo_metrics_tta.json")
        common["metrics_tta_command"] = portable(shlex.join(tta_cmd))
    how = shlex.join(cmd) + (f"; {args.metrics_command}" if given and args.metrics_command else "")
    folder = zoo.publish(ckpt, args.name, metrics=metrics, metrics_command=portable(how), **common)
    print(folder, json.dumps(metrics), json.dumps(common.get("metrics_tta", {})))


if __name__ == "__main__":
    main()
