"""Domain fit (napari_medssl.domain) on real images against the shipped zoo cards, the launcher's choice, and
``medssl predict`` warning / refusing under ``--strict``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medssl import domain, io, zoo
from napari_medssl._launch import choose_fitting_model
from napari_medssl.engine.cli import main

HIPPO_MODELS = [n for n in zoo.list_zoo() if n.endswith("_hippocampus")]
MIAS_MODELS = [n for n in zoo.list_zoo() if n.endswith("_mias")]
T1POST = "dicom/tcia_btp_PGBM-001/04-02-1992-FH-HEADBrain Protocols-79896/11-T1post-80644"


def image(data_dir: Path, rel: str) -> io.Volume:
    return next(v for v in io.read(data_dir / rel) if not v.is_label)


@pytest.fixture(scope="module")
def cards():
    return {n: zoo.card(n) for n in zoo.list_zoo()}


def test_every_shipped_card_records_a_valid_domain(cards):
    assert len(HIPPO_MODELS) >= 5 and len(MIAS_MODELS) >= 4
    for name, card in cards.items():
        domain.validate_domain(card.get("domain"), f"{name}: domain")
        assert card["domain"]["modality"], name


def test_tcia_brain_mr_misfits_every_hippocampus_model_and_the_message_names_both(data_dir, cards):
    facts = domain.facts_from_volume(image(data_dir, T1POST))
    assert facts.modality == "MR" and facts.body_part == "BRAIN" and facts.shape == (24, 320, 260)
    for name in HIPPO_MODELS:
        fit = domain.check(domain.model_domain(card=cards[name]), facts, name)
        assert not fit.fits, name
        assert "trained on 1 mm T1 hippocampus crops" in fit.message
        assert "this is 0.688×0.688×6.5 mm brain MR" in fit.message and "260×320×24 voxels" in fit.message
        assert "will not be meaningful" in fit.message
        assert any(r.startswith("field of view 179×220×156 mm") for r in fit.reasons), fit.reasons
    fit3d = domain.check(domain.model_domain(card=cards["unet_tiny_3d_hippocampus"]), facts)
    assert any("spacing" in r and "z above 1.5" in r for r in fit3d.reasons)  # 6.5 mm slices
    for name in MIAS_MODELS:  # mammogram classifiers: modality, body part and dimensionality all differ
        reasons = domain.check(domain.model_domain(card=cards[name]), facts).reasons
        assert "modality MR, not MG" in reasons and "body part BRAIN, not BREAST" in reasons


def test_a_hippocampus_crop_fits_every_hippocampus_model_and_no_mammogram_model(data_dir, cards):
    facts = domain.facts_from_volume(image(data_dir, "hippocampus/imagesTr/hippocampus_001.nii.gz"))
    for name in HIPPO_MODELS:
        fit = domain.check(domain.model_domain(card=cards[name]), facts, name)
        assert fit.fits and not fit.reasons, fit.message
        assert "body part" in fit.unknown  # NIfTI carries none: unknown, not a misfit
    for name in MIAS_MODELS:
        assert not domain.check(domain.model_domain(card=cards[name]), facts).fits


def test_unknown_facts_are_not_misfits_a_png_mammogram_without_spacing(data_dir, cards):
    vol = image(data_dir, "mammography_mias/mdb005.png")
    facts = domain.facts_from_volume(vol)
    assert facts.modality is None and facts.spacing is None  # a PNG says neither
    for name in MIAS_MODELS:
        fit = domain.check(domain.model_domain(card=cards[name]), facts, name)
        assert fit.fits, fit.message
        assert any("modality" in u for u in fit.unknown) and any("spacing" in u for u in fit.unknown)
    # its size in pixels is still compared: a 1024² image is no hippocampus crop
    fit = domain.check(domain.model_domain(card=cards["unet_tiny_hippocampus"]), facts)
    assert not fit.fits and any(r.startswith("size 1024×1024") for r in fit.reasons)


def test_ct_is_not_mr_and_a_card_without_domain_cannot_tell(data_dir, cards):
    facts = domain.facts_from_volume(image(data_dir, "dicom/ct_jpeg2000_no_uids"))
    fit = domain.check(domain.model_domain(card=cards["unet_tiny_3d_hippocampus"]), facts)
    assert "modality CT, not MR" in fit.reasons
    blank = domain.check(None, facts, "my_run")
    assert blank.fits and not blank.recorded and "records no training domain" in blank.message


def test_bad_domain_blocks_are_refused():
    with pytest.raises(ValueError, match="summary"):
        domain.validate_domain({"modality": ["MR"]})
    with pytest.raises(ValueError, match="unknown keys"):
        domain.validate_domain({"summary": "x", "modalty": ["MR"]})
    with pytest.raises(ValueError, match="exceeds"):
        domain.validate_domain(
            {"summary": "x", "image_dims": [2], "spacing_mm": {"min": [1, 1], "max": [2, 0.5]}}
        )
    with pytest.raises(ValueError, match="needs 3 axes"):
        domain.validate_domain({"summary": "x", "image_dims": [3], "fov_mm": {"min": [1, 1]}})


def test_launcher_selects_nothing_on_a_tcia_study_and_a_hippocampus_segmenter_on_a_crop(data_dir, cards):
    facts = domain.facts_from_volume(image(data_dir, T1POST))
    chosen, warning = choose_fitting_model(cards, facts, "T1post")
    assert chosen is None
    assert warning.startswith("No shipped model fits T1post (0.688×0.688×6.5 mm brain MR")
    assert "trained on 1 mm T1 hippocampus crops" in warning and "dino_tiny_medical" in warning
    crop = domain.facts_from_volume(image(data_dir, "hippocampus/imagesTr/hippocampus_001.nii.gz"))
    chosen, warning = choose_fitting_model(cards, crop, "hippocampus")
    assert chosen in HIPPO_MODELS and cards[chosen]["task"] == "segment" and warning is None
    # a starting point for fine-tuning that fits is named, never selected
    start = {**cards["unet_tiny_hippocampus"], "name": "unet_start"}
    start["domain"] = {**start["domain"], "purpose": "starting point", "fov_mm": None, "size_voxels": None}
    chosen, warning = choose_fitting_model({**cards, "unet_start": start}, facts, "T1post")
    starters = warning.split("fine-tuning: ")[1].split(".")[0].split(", ")
    assert chosen is None and {"dino_tiny_medical", "unet_start", "unet_start_medical"} <= set(starters)
    chosen, _ = choose_fitting_model(
        cards, domain.facts_from_volume(image(data_dir, "mammography_mias/mdb005.png")), "x"
    )
    assert chosen in MIAS_MODELS


def test_predict_warns_on_a_misfit_and_strict_refuses_it(data_dir, tmp_path, capsys):
    study = data_dir / T1POST
    out = tmp_path / "strict.nii.gz"
    code = main(
        [
            "predict",
            "--model",
            "unet_tiny_hippocampus",
            "--input",
            str(study),
            "--output",
            str(out),
            "--strict",
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    assert "error:" in err and "--strict: refused" in err and "0.688×0.688×6.5 mm brain MR" in err
    # a real crop written at 3 mm voxels: outside the 0.67-1.5 mm range, and small enough to predict quickly
    coarse = tmp_path / "coarse.nii.gz"
    nii = nib.load(data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(nii.dataobj), np.diag([3.0, 3.0, 3.0, 1.0])), coarse)
    out = tmp_path / "warned.nii.gz"
    code = main(["predict", "--model", "unet_tiny_hippocampus", "--input", str(coarse), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and out.is_file()
    assert (
        "warning: coarse.nii.gz:" in err and "this is 3×3×3 mm MR" in err and "will not be meaningful" in err
    )
    crop = data_dir / "hippocampus/imagesTr/hippocampus_001.nii.gz"
    out = tmp_path / "fits.nii.gz"
    code = main(
        [
            "predict",
            "--model",
            "unet_tiny_hippocampus",
            "--input",
            str(crop),
            "--output",
            str(out),
            "--strict",
            "--threads",
            "1",
        ]
    )
    assert code == 0 and out.is_file() and "warning" not in capsys.readouterr().err


def test_launcher_ranks_cross_validated_figures_first():
    """A card's cross-validated metric outranks another card's single-split one (small splits flatter by luck)."""
    from napari_medssl._launch import choose_model

    def card(**metrics):
        return {"task": "classify", "architecture": {"name": "vit_tiny"}, "metrics": metrics}

    cards = {
        "lucky_fold_mias": card(auc=0.67, cv3_auc=0.565),
        "steady_mias": card(auc=0.646, cv3_auc=0.622),
        "old_split_mias": card(auc=0.70),  # one split, also the one its checkpoint was selected on
    }
    assert choose_model(cards, 2, "mias") == "steady_mias"
    assert choose_model({"old_split_mias": cards["old_split_mias"]}, 2, "mias") == "old_split_mias"
    seg = {
        "a_seg": {"task": "segment", "metrics": {"mean_dice": 0.8}},
        "b_seg": {"task": "segment", "metrics": {"mean_dice": 0.9}},
    }
    assert choose_model(seg, 3, "x") == "b_seg"
