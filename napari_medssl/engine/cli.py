"""The ``medssl`` command line: pretrain, finetune, evaluate, predict, ensemble, pacs, and list models.

Every subcommand is a thin consumer of the library (:func:`napari_medssl.engine.train`,
:func:`~napari_medssl.engine.evaluate.evaluate`, :mod:`napari_medssl.inference`). User errors (a bad value, a
missing file, a pickle checkpoint) print one line to stderr and exit with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .cli_pacs import cmd_pacs
from .cli_pacs import register as register_pacs

DESCRIPTION = """\
Self-supervised medical-image models: pretrain, fine-tune, evaluate and predict.

MODEL is a registered architecture (unet_tiny, mae_tiny ...; see `medssl models`), a zoo model (see
`medssl zoo`) or a .safetensors checkpoint written by a training run (run_dir/best.safetensors; a run folder
works too). DATA is an MSD-layout folder (imagesTr/, labelsTr/), a mini-MIAS folder (PNG + labels.csv),
a PNG/TIFF folder with labels.csv (image,label) or masks/, a DICOM folder, or a MedMNIST .npz.

examples:
  medssl finetune --model unet_tiny --data $MEDSSL_DATA_DIR/hippocampus --task segment --out runs/unet_hippo
  medssl pretrain --model mae_tiny --data $MEDSSL_DATA_DIR/mammography_mias --out runs/mae_mias --max-steps 2000
  medssl finetune --model runs/mae_mias/best.safetensors --data $MEDSSL_DATA_DIR/mammography_mias \\
      --task classify --out runs/mae_mias_cls
  medssl evaluate --model runs/unet_hippo/best.safetensors --data $MEDSSL_DATA_DIR/hippocampus --split val \\
      --out metrics.json
  medssl predict --model runs/unet_hippo/best.safetensors --input hippocampus_001.nii.gz --output labels.nii.gz
  torchrun --nproc_per_node=2 -m napari_medssl.engine.cli finetune ...   (DDP: one process per GPU/CPU share)
"""

USER_ERRORS = (ValueError, OSError, FloatingPointError, MemoryError)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _model_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--model", required=True, metavar="NAME|CKPT", help=help_text)


def _training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument(
        "--data",
        required=True,
        action="append",
        metavar="DIR",
        help="data folder or .npz (repeat --data to train on several)",
    )
    g.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoints, split, events)")
    g.add_argument("--max-steps", type=int, default=1000, help="optimiser steps (default 1000)")
    g.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="wall-clock budget too (resumes included): stop at whichever of steps and minutes comes first; "
        "the learning rate then decays on time",
    )
    g.add_argument("--batch-size", type=int, default=8, help="samples per step and process (default 8)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, AdamW (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    g.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default 50)")
    g.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N or mps")
    g.add_argument(
        "--seed", type=int, default=0, help="seeds split, sampling, augmentation, init (default 0)"
    )
    g.add_argument(
        "--val-every", type=int, default=200, help="validate + checkpoint every N steps (default 200)"
    )
    g.add_argument(
        "--val-fraction", type=float, default=0.2, help="groups held out for validation (default 0.2)"
    )
    g.add_argument("--split-file", metavar="JSON", help="reuse another run's split.json")
    g.add_argument("--num-workers", type=int, default=0, help="data-loading processes (default 0)")
    g.add_argument(
        "--slice-axis",
        type=int,
        default=0,
        choices=(0, 1, 2),
        help="axis 2D models slice volumes along (0 = Z)",
    )
    g.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        metavar="N",
        help="sample size (Y X or Z Y X) when the model has none",
    )
    g.add_argument(
        "--no-augment", action="store_true", help="turn off flips, affine and intensity augmentation"
    )
    g.add_argument(
        "--flip-axes",
        type=int,
        nargs="*",
        default=[-1],
        metavar="AXIS",
        help="axes that may be flipped, counted from the end (default -1 = X); none to disable",
    )
    g.add_argument(
        "--best-metric", help="metric that picks best.safetensors (mean_dice, auc, val_loss, last ...)"
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model option, JSON value: --set spatial_dims=3 --set drop_path_rate=0.1",
    )
    g.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a checkpoint")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def _add_pretrain(sub) -> None:
    """The ``medssl pretrain`` sub-command."""
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining (MAE, DINO, MSMAE, MIRAM, MiM)",
        description="Pretrain with the model's own objective; labels are ignored (MSMAE uses "
        "class labels when the data have them). Example:\n  medssl pretrain --model mae_tiny "
        "--data $MEDSSL_DATA_DIR/mammography_mias --out runs/mae",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arg(p, "architecture, zoo model or checkpoint to continue from")
    _training_args(p)
    p.add_argument("--num-classes", type=int, default=0, help="classes for a supervised term (MSMAE)")


def _add_finetune(sub) -> None:
    """The ``medssl finetune`` sub-command."""
    p = sub.add_parser(
        "finetune",
        help="train a classifier or segmenter (from scratch or a checkpoint)",
        description="Fine-tune for classification or segmentation. Weights of a checkpoint that "
        "fit are kept; a head of another size starts fresh. Example:\n  medssl finetune --model "
        "unet_tiny --data $MEDSSL_DATA_DIR/hippocampus --task segment --out runs/unet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        metavar="NAME|CKPT",
        help="architecture, zoo model or checkpoint to start from (required unless --labels: then the default "
        "starting point for new structures, unet_start_medical)",
    )
    p.add_argument("--task", required=True, choices=("classify", "segment"), help="what to train for")
    _training_args(p)
    p.add_argument(
        "--labels",
        metavar="PAINTED",
        help="fast adaptation: a label volume painted on --data IMAGE's grid (0 unlabelled, 1 background, "
        "k+1 class k); trains a 2.5D model on crops around the paint, DIR/best.safetensors written early and "
        "kept current (see engine/adapt.py)",
    )
    p.add_argument("--num-classes", type=int, default=0, help="classes (default: from the data)")
    p.add_argument("--ignore-index", type=int, help="label value meaning unlabelled (painted labels: 0)")
    g = p.add_argument_group("knowledge distillation")
    g.add_argument(
        "--teacher",
        metavar="NAME|CKPT",
        help="a trained model (same task, classes and dims) whose soft outputs the student also learns from",
    )
    g.add_argument(
        "--distill-weight", type=float, default=1.0, help="weight of the KL term to the teacher (default 1)"
    )
    g.add_argument(
        "--distill-temperature",
        type=float,
        default=1.0,
        help="softmax temperature of the KL term (default 1)",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="validate and keep a moving average of the weights, decay warming up to DECAY (e.g. 0.999; "
        "default 0 = off)",
    )


def _add_evaluate(sub) -> None:
    """The ``medssl evaluate`` sub-command."""
    p = sub.add_parser(
        "evaluate",
        help="metrics of a model on a data folder",
        description="Segmentation: per-label Dice and IoU, mean_dice, mean_iou (per case, "
        "averaged). Classification: accuracy, balanced_accuracy, auc. Example:\n  medssl evaluate "
        "--model runs/unet/best.safetensors --data $MEDSSL_DATA_DIR/hippocampus --split val --out m.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arg(p, "zoo model or checkpoint")
    p.add_argument("--data", required=True, metavar="DIR", help="data folder or .npz")
    p.add_argument("--out", required=True, metavar="JSON", help="where to write the metrics")
    p.add_argument(
        "--split",
        default="all",
        choices=("all", "val"),
        help="all cases, or the validation split saved with the checkpoint's run",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch-size", type=int, default=8, help="slices/windows/images per forward pass")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--tta",
        action="store_true",
        help="segmenters: average with mirrored copies (test-time augmentation) along the axes the model "
        "was trained with random flips on; costs one extra pass per mirror",
    )


def _add_predict(sub) -> None:
    """The ``medssl predict`` sub-command."""
    p = sub.add_parser(
        "predict",
        help="segment or classify files",
        description="Segmenters write labels on the input's grid (NIfTI for volumes; .png/.tif "
        "for 2D images when --output says so); classifiers write class probabilities as JSON. "
        "Example:\n  medssl predict --model runs/unet/best.safetensors --input case.nii.gz "
        "--output labels.nii.gz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_arg(p, "zoo model or checkpoint")
    p.add_argument(
        "--input",
        required=True,
        metavar="FILE|DIR",
        help="a NIfTI/PNG/TIFF file, a DICOM series folder, or a folder of NIfTI/PNG/TIFF files",
    )
    p.add_argument(
        "--output",
        required=True,
        metavar="PATH",
        help="labels file (provenance beside it in PATH.json), .dcm (a DICOM SEG, for DICOM input), "
        "folder (several inputs) or .json",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch-size", type=int, default=8, help="slices/windows per forward pass")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--slice-axis", type=int, choices=(0, 1, 2), help="axis 2D models slice along (default: as trained)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse (exit status 1, nothing written) an input outside the model's training domain (its "
        "card's modality, spacing, field of view ...); without it such an input gets a warning",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="segmenters: average with mirrored copies (test-time augmentation) along the axes the model "
        "was trained with random flips on; costs one extra pass per mirror",
    )
    p.add_argument(
        "--heatmap",
        metavar="OUT.tif",
        help="mammography classifiers: also write the float32 abnormality map on the input's grid (a .tif "
        "file; a folder for several inputs)",
    )


def _add_ensemble(sub) -> None:
    """The ``medssl ensemble`` sub-command."""
    p = sub.add_parser(
        "ensemble",
        help="average several trained segmenters",
        description="Build one model from several trained segmenters (2D and 3D mixed; same classes and "
        "inputs) that averages their class probabilities, each member run as it was trained. The result "
        "evaluates, predicts and opens in the viewer like any checkpoint. Example:\n"
        "  medssl ensemble --model unet_tiny_hippocampus --model runs/mim/best.safetensors "
        "--out runs/ensemble.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, action="append", metavar="NAME|CKPT", help="a member (repeat: two or more)"
    )
    p.add_argument(
        "--weight", type=float, action="append", help="a member's weight, in order (default equal)"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the ensemble's .safetensors file")
    p.add_argument("--fp16", action="store_true", help="store the weights as float16 (half the size)")


def build_parser() -> argparse.ArgumentParser:
    """The ``medssl`` argument parser."""
    parser = _Parser(
        prog="medssl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    _add_pretrain(sub)
    _add_finetune(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_ensemble(sub)

    from napari_medssl.engine import cli_attention

    cli_attention.add_parser(sub, _Parser)

    sub.add_parser(
        "zoo", help="list the zoo's trained models", description="List the models in the zoo folders."
    )
    sub.add_parser(
        "models", help="list registered architectures", description="List registered architectures."
    )
    register_pacs(sub)  # medssl pacs find|pull|push
    return parser


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train(args: argparse.Namespace) -> int:
    """``pretrain`` / ``finetune``: run the training generator with a progress bar."""
    from tqdm import tqdm

    from napari_medssl.engine.config import TrainConfig
    from napari_medssl.engine.loop import train

    args.lr_given, args.lr = args.lr is not None, 1e-3 if args.lr is None else args.lr
    if getattr(args, "labels", None):
        from napari_medssl.engine import cli_adapt

        return cli_adapt.run(args)
    if not args.model:
        raise ValueError("--model is required (unless --labels gives painted labels)")
    config = TrainConfig(
        model=args.model,
        task="pretrain" if args.command == "pretrain" else args.task,
        data=args.data if len(args.data) > 1 else args.data[0],
        out_dir=args.out,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        device=args.device,
        seed=args.seed,
        val_every=args.val_every,
        val_fraction=args.val_fraction,
        split_file=args.split_file,
        num_workers=args.num_workers,
        num_classes=args.num_classes,
        ignore_index=getattr(args, "ignore_index", None),
        augment=not args.no_augment,
        flip_axes=tuple(args.flip_axes),
        slice_axis=args.slice_axis,
        patch_size=tuple(args.patch_size) if args.patch_size else None,
        model_overrides=_overrides(args.set),
        best_metric=args.best_metric,
        resume=not args.no_resume,
        teacher=getattr(args, "teacher", None),
        distill_weight=getattr(args, "distill_weight", 1.0),
        distill_temperature=getattr(args, "distill_temperature", 1.0),
        ema_decay=getattr(args, "ema", 0.0),
    )
    show = _rank0()
    bar = None
    try:
        for event in train(config):
            kind = event["event"]
            if bar is None:  # created on the first event, so set-up errors print alone
                bar = tqdm(
                    total=config.max_steps,
                    desc=args.command,
                    unit="step",
                    disable=not show,
                    dynamic_ncols=True,
                )
            if kind == "step":
                bar.n = event["step"]
                bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", refresh=False)
                bar.refresh()
            elif kind == "val" and show:
                shown = {k: round(v, 4) for k, v in event["metrics"].items() if isinstance(v, float)}
                bar.write(f"step {event['step']}: {shown}")
            elif kind == "done" and show:
                bar.close()
                print(f"best checkpoint: {event['best_path']}")
                print(json.dumps(event["metrics"], indent=1))
    finally:
        if bar is not None:
            bar.close()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: write metrics JSON."""
    from tqdm import tqdm

    from napari_medssl.engine.evaluate import evaluate

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise IsADirectoryError(f"--out must be a file name (metrics.json), not the folder {out}")
    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="evaluate", unit="item", dynamic_ncols=True))
        bars[0].n = done
        bars[0].refresh()

    try:
        result = evaluate(
            args.model,
            args.data,
            split=args.split,
            device=args.device,
            batch_size=args.batch_size,
            progress=progress,
            tta=args.tta,
        )
    finally:
        for bar in bars:
            bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["metrics"], indent=1))
    return 0


def _predict_inputs(path: Path) -> list[Path]:
    from napari_medssl.engine import readers

    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        return [path]
    if next(path.rglob("*.dcm"), None) is not None:
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and (readers.is_nifti(p) or readers.is_image(p)))
    if not files:
        raise ValueError(f"{path}: no NIfTI, PNG/TIFF or DICOM files to predict")
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (
        ".nii.gz",
        ".nii",
        *[s for s in (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".dcm")],
    ):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_domain(model: Any, volume: Any, path: Path, args: argparse.Namespace) -> None:
    """Warn (stderr) when ``volume`` is outside the model's training domain; raise under ``--strict``."""
    from napari_medssl import domain

    dom = domain.model_domain(model)  # model.spec.domain: the zoo card's (a run's checkpoint has none)
    fit = domain.check(dom, domain.facts_from_volume(volume), str(args.model))
    if fit.fits:
        return
    if args.strict:
        raise ValueError(f"{path.name}: {fit.message} (--strict: refused; nothing was written)")
    sys.stderr.write(f"medssl predict: warning: {path.name}: {fit.message}\n")


def _provenance(model: Any, path: Path, loaded: Any) -> dict[str, Any]:
    """The provenance record of one prediction (model.spec's source and weights sha256, source series UID)."""
    from napari_medssl import provenance

    uid = provenance.series_uid(loaded.metadata)
    return provenance.record(model, source=path, source_series_uid=uid)


def cmd_predict(args: argparse.Namespace) -> int:
    """``predict``: labels files or a probabilities JSON."""
    from tqdm import tqdm

    from napari_medssl import inference, mammo, zoo
    from napari_medssl.engine import readers

    model = zoo.load(args.model, device=args.device)
    spec = model.spec
    if not spec.predicts:
        raise ValueError(f"{args.model} is a {spec.task!r} model; fine-tune it before predicting")
    axis = args.slice_axis if args.slice_axis is not None else spec.slice_axis
    if args.heatmap and mammo.pipeline_of(model) is None:
        raise ValueError(f"--heatmap needs a mammography patch classifier; {args.model} is not one")
    inputs = _predict_inputs(Path(args.input))
    if args.strict:  # every input checked before anything is written
        for path in inputs:
            _check_domain(model, readers.read_any(path), path, args)
    output = Path(args.output)
    names = list(spec.class_names) or [str(i) for i in range(spec.num_classes)]
    results: dict[str, Any] = {}
    segment_codes = (spec.card or {}).get("segment_codes")  # DICOM SEG codes per class (zoo card)
    for path in tqdm(inputs, desc="predict", unit="file", dynamic_ncols=True, disable=len(inputs) < 2):
        loaded = readers.read_any(path)
        _check_domain(model, loaded, path, args)
        if spec.task == "segment":
            labels = inference.segment(
                model,
                loaded.data,
                slice_axis=axis,
                batch_size=args.batch_size,
                rgb=loaded.rgb,
                mirror=inference.training_flip_axes(model) if args.tta else (),
                spacing=loaded.spacing,
                affine=loaded.affine,
            )
            if spec.label_values:  # trained on remapped labels (painted 1..K): write those values
                labels = np.asarray(spec.label_values)[labels]
            target = output / f"{_stem(path)}.nii.gz" if len(inputs) > 1 or output.is_dir() else output
            if len(inputs) == 1 and not (
                readers.is_nifti(target) or readers.is_image(target) or readers.is_dicom_output(target)
            ):
                raise ValueError(
                    f"--output {output}: name a .nii.gz/.nii (or .png/.tif for 2D, .dcm for a DICOM SEG) "
                    "file or a folder"
                )
            written = readers.write_prediction(
                labels,
                loaded,
                target,
                _provenance(model, path, loaded),
                names,
                segment_codes=segment_codes,
            )
            results[path.name] = str(written)
        elif mammo.pipeline_of(model) is not None:  # full-resolution patches, sliding window, heatmap
            results[path.name] = _predict_mammogram(model, loaded.data, path, args, len(inputs), names)
            results[path.name]["provenance"] = _provenance(model, path, loaded)
        else:
            probs = inference.classify(
                model, loaded.data, slice_axis=axis, batch_size=args.batch_size, rgb=loaded.rgb
            )
            entry: dict[str, Any] = {}
            if probs.ndim == 2:  # a 2D model on a volume: one row per slice, and their mean
                entry["per_slice"] = probs.round(6).tolist()
                probs = probs.mean(0)
            entry["probabilities"] = {n: round(float(p), 6) for n, p in zip(names, probs)}
            entry["prediction"] = names[int(probs.argmax())]
            entry["provenance"] = _provenance(model, path, loaded)
            results[path.name] = entry
    if spec.task == "classify":
        if output.suffix.lower() != ".json":
            raise ValueError(f"--output {output}: a classifier writes probabilities to a .json file")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1) if spec.task == "classify" else "\n".join(results.values()))
    return 0


def _predict_mammogram(
    model: Any, image: np.ndarray, path: Path, args: argparse.Namespace, n_inputs: int, names: list[str]
) -> dict[str, Any]:
    """One mammogram through :func:`napari_medssl.mammo.score_image`; ``--heatmap`` written as float32 TIFF."""
    import tifffile

    from napari_medssl import mammo

    res = mammo.score_image(model, image, mammo.pipeline_of(model), batch_size=args.batch_size)
    probs = [1.0 - res["score"], res["score"]]
    entry: dict[str, Any] = {
        "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs)},
        "prediction": names[int(np.argmax(probs))],
        "heatmap_peak": list(res["peak"]),
    }
    if args.heatmap:
        target = Path(args.heatmap)
        if n_inputs > 1 or target.is_dir():
            target = target / f"{_stem(path)}_heatmap.tif"
        elif target.suffix.lower() not in (".tif", ".tiff"):
            raise ValueError(f"--heatmap {target}: name a .tif file (or a folder for several inputs)")
        target.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(target, res["heatmap"].astype(np.float32))
        entry["heatmap"] = str(target)
    return entry


def cmd_zoo(args: argparse.Namespace) -> int:
    """``zoo``: one line per zoo model."""
    from napari_medssl import zoo

    names = zoo.list_zoo()
    if not names:
        print(f"no zoo models in {', '.join(str(d) for d in zoo.zoo_dirs())}")
    for name in names:
        c = zoo.card(name)
        metrics = c.get("metrics") or {}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{name}\t{c.get('task')}\t{shown}\t{c.get('description', '')}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    """``ensemble``: several segmenters' checkpoints → one averaging model."""
    from napari_medssl.models.ensemble import from_checkpoints
    from napari_medssl.models.registry import save_model
    from napari_medssl.resolve import resolve

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors file, got {out}")
    paths = [resolve(spec).path for spec in args.model]  # trained models only (an architecture is refused)
    if args.weight and len(args.weight) != len(paths):
        raise ValueError(f"{len(args.weight)} --weight values for {len(paths)} members")
    model = from_checkpoints(paths, args.weight)
    if args.fp16:
        model = model.half()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, extra=dict(model.spec.extra))
    size = out.stat().st_size / 1e6
    print(f"{out}: {len(paths)} members, {model.spec.num_classes} classes, {size:.1f} MB")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: registered architectures."""
    from napari_medssl.models import list_models

    print("\n".join(list_models()))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    """``attention``: see :mod:`napari_medssl.engine.cli_attention`."""
    from napari_medssl.engine.cli_attention import cmd_attention as run

    return run(args)


COMMANDS = {
    "attention": cmd_attention,
    "pretrain": cmd_train,
    "finetune": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "ensemble": cmd_ensemble,
    "zoo": cmd_zoo,
    "models": cmd_models,
    "pacs": cmd_pacs,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medssl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        sys.stderr.write(f"medssl {args.command}: error: {message}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"medssl {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
