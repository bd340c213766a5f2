"""The ``medssl`` CLI: help, one-line errors, and finetune → evaluate → predict on real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medssl.engine.cli import main
from napari_medssl.engine.metrics import dice_iou_case, segmentation_metrics
from napari_medssl.models import load_model
from napari_medssl.testing.training import TINY_VIT, one_thread, small_mias, small_msd  # noqa: F401

MEDSSL = Path(sys.executable).with_name("medssl")


def first_png(folder: Path) -> Path:
    return sorted(folder.glob("*.png"))[0]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_teaches_with_examples():
    proc = subprocess.run([str(MEDSSL), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for word in ("pretrain", "finetune", "evaluate", "predict", "examples:", "--model unet_tiny"):
        assert word in proc.stdout
    sub = subprocess.run([str(MEDSSL), "finetune", "--help"], capture_output=True, text=True, timeout=60)
    assert "--ignore-index" in sub.stdout and "--max-steps" in sub.stdout and "Example" in sub.stdout


def test_errors_are_one_line_without_traceback(tmp_path, data_dir, capsys):
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickle)
    hippo = data_dir / "hippocampus"
    cases = [
        (
            ["finetune", "--model", "no_such", "--data", hippo, "--task", "segment", "--out", tmp_path / "r"],
            "unknown model",
        ),
        (["evaluate", "--model", pickle, "--data", hippo, "--out", tmp_path / "m.json"], "safetensors"),
        (
            [
                "finetune",
                "--model",
                "unet_tiny",
                "--data",
                tmp_path / "nowhere",
                "--task",
                "segment",
                "--out",
                tmp_path / "r",
            ],
            "not found",
        ),
        (
            [
                "finetune",
                "--model",
                "unet_tiny",
                "--data",
                hippo,
                "--task",
                "segment",
                "--out",
                tmp_path / "r",
                "--max-steps",
                "0",
            ],
            "max_steps",
        ),
        (
            [
                "predict",
                "--model",
                tmp_path / "missing.safetensors",
                "--input",
                tmp_path,
                "--output",
                tmp_path / "o",
            ],
            "not found",
        ),
        (
            [
                "finetune",
                "--model",
                "unet_tiny",
                "--data",
                hippo,
                "--task",
                "segment",
                "--out",
                tmp_path / "r",
                "--set",
                "oops",
            ],
            "KEY=VALUE",
        ),
    ]
    for argv, words in cases:
        code, out, err = run_cli(capsys, *argv)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 1 and len(lines) == 1 and words in lines[0], (argv, err)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", "unet_tiny"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "required" in err
    # the installed console script: same one line, no traceback, non-zero status
    proc = subprocess.run(
        [
            str(MEDSSL),
            "evaluate",
            "--model",
            str(pickle),
            "--data",
            str(hippo),
            "--out",
            str(tmp_path / "m.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr and "pickle" in proc.stderr


def test_finetune_evaluate_predict_segmentation(data_dir, tmp_path, capsys):
    msd = small_msd(data_dir, tmp_path / "msd", n=5)
    run = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "finetune",
        "--model",
        "unet_tiny",
        "--set",
        "levels=2",
        "--data",
        msd,
        "--task",
        "segment",
        "--out",
        run,
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--val-every",
        "3",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--ema",
        "0.9",
    )
    assert code == 0 and "best checkpoint:" in out
    assert json.loads((run / "config.json").read_text())["ema_decay"] == 0.9
    assert (run / json.loads((run / "last.json").read_text())["ema"]).is_file()
    metrics_path = tmp_path / "metrics.json"
    code, _, _ = run_cli(
        capsys,
        "evaluate",
        "--model",
        run / "best.safetensors",
        "--data",
        msd,
        "--split",
        "val",
        "--out",
        metrics_path,
    )
    assert code == 0
    result = json.loads(metrics_path.read_text())
    val_ids = json.loads((run / "split.json").read_text())["val"]
    assert result["split"] == "val" and result["n_cases"] == len(val_ids) == 1
    # recompute by hand: predict the val case with the CLI, then score the written NIfTI against its label
    case = msd / "imagesTr" / f"{val_ids[0]}.nii.gz"
    out_nii = tmp_path / "pred.nii.gz"
    code, _, _ = run_cli(
        capsys, "predict", "--model", run / "best.safetensors", "--input", case, "--output", out_nii
    )
    assert code == 0
    written, source = nib.load(out_nii), nib.load(case)
    np.testing.assert_allclose(written.affine, source.affine)
    assert written.shape == source.shape
    pred = np.asarray(written.dataobj)
    ref = np.asarray(nib.load(msd / "labelsTr" / case.name).dataobj)
    by_hand = segmentation_metrics([dice_iou_case(pred, ref, 3)])
    for key in ("dice_1", "dice_2", "iou_1", "iou_2", "mean_dice", "mean_iou"):
        assert result["metrics"][key] == pytest.approx(by_hand[key], abs=1e-9, nan_ok=True)
    code, _, _ = run_cli(capsys, "evaluate", "--model", run, "--data", msd, "--out", tmp_path / "all.json")
    assert code == 0 and json.loads((tmp_path / "all.json").read_text())["n_cases"] == 5
    code, _, _ = run_cli(
        capsys,
        "predict",
        "--model",
        run / "best.safetensors",
        "--input",
        msd / "imagesTr",
        "--output",
        tmp_path / "preds",
    )
    assert code == 0 and len(list((tmp_path / "preds").glob("*.nii.gz"))) == 5
    # --tta: mirroring along the axis the run flipped (X); predict --tta scores the same as evaluate --tta
    tta_path = tmp_path / "tta.json"
    code, _, _ = run_cli(
        capsys, "evaluate", "--model", run / "best.safetensors", "--data", msd, "--split", "val",
        "--out", tta_path, "--tta",
    )  # fmt: skip
    tta = json.loads(tta_path.read_text())
    assert code == 0 and tta["mirror"] == [-1] and result["mirror"] == []
    code, _, _ = run_cli(
        capsys, "predict", "--model", run / "best.safetensors", "--input", case, "--output", out_nii, "--tta"
    )
    pred = np.asarray(nib.load(out_nii).dataobj)
    by_hand = segmentation_metrics([dice_iou_case(pred, ref, 3)])
    assert code == 0 and tta["metrics"]["mean_dice"] == pytest.approx(by_hand["mean_dice"], nan_ok=True)


def test_classifier_predicts_probabilities_json(data_dir, tmp_path, capsys):
    mias = small_mias(data_dir, tmp_path / "mias", n_women=4)
    run = tmp_path / "run"
    sets = [x for k, v in TINY_VIT.items() for x in ("--set", f"{k}={v}")]
    code, _, _ = run_cli(
        capsys,
        "finetune",
        "--model",
        "vit_tiny",
        *sets,
        "--data",
        mias,
        "--task",
        "classify",
        "--out",
        run,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--val-every",
        "2",
    )
    assert code == 0
    model = load_model(run / "best.safetensors")
    assert model.input_size == (32, 32) and model.num_classes == 2
    code, out, _ = run_cli(
        capsys,
        "predict",
        "--model",
        run / "best.safetensors",
        "--input",
        first_png(mias),
        "--output",
        tmp_path / "p.json",
    )
    assert code == 0
    entry = json.loads((tmp_path / "p.json").read_text())[first_png(mias).name]
    assert set(entry["probabilities"]) == {"normal", "abnormal"}
    assert sum(entry["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    code, _, err = run_cli(
        capsys,
        "predict",
        "--model",
        run / "best.safetensors",
        "--input",
        first_png(mias),
        "--output",
        tmp_path / "p.nii.gz",
    )
    assert code == 1 and ".json" in err
