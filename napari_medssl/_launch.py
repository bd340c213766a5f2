"""``python -m napari_medssl``: napari with the plugin's docks, a real image and a trained model.

By default the hippocampus MRI sample (from ``$MEDSSL_DATA_DIR``, else the public archive) is opened with its
labels, the Model dock selects a trained zoo segmenter for it (only one whose card's domain fits the image:
when none does, none is selected and a warning says why, see :mod:`napari_medssl.domain`), and the Attention & masking and Fine-tune docks
sit beside it. ``--sample mammogram`` opens a mini-MIAS mammogram and prefers a classifier; ``--image PATH``
opens any file the plugin reads; ``--model NAME`` picks a zoo model or a ``.safetensors`` checkpoint.
napari is imported only inside :func:`main`, so a spawned training process that re-imports this module stays
light.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from napari_medssl._gl_guard import keep_triton_out

DOCKS = ("Model", "Attention & masking", "Where to paint next", "Fine-tune")  # the last tab added shows
PLUGIN = "napari-medssl"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m napari_medssl``."""
    parser = argparse.ArgumentParser(prog="python -m napari_medssl", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sample", default="hippocampus", help="sample to open (hippocampus, mammogram, ...)"
    )
    parser.add_argument("--image", default=None, help="open this file or DICOM folder instead of a sample")
    parser.add_argument(
        "--model", default=None, help="zoo model name or .safetensors checkpoint for the Model dock"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda or mps")
    return parser.parse_args(argv)


def choose_model(cards: dict[str, dict[str, Any]], spatial_dims: int, hint: str) -> str | None:
    """A zoo model for the opened image: names mentioning ``hint`` (the data) first, then a segmenter for a
    volume or a classifier for a 2D image, then one that can be fine-tuned (not an ensemble: the Fine-tune dock
    trains the Model dock's model), then the best validation metric, cross-validated ones first; ``None`` when
    the zoo is empty."""
    if not cards:
        return None
    want = "segment" if spatial_dims == 3 else "classify"

    def score(card: dict[str, Any]) -> tuple[bool, float]:
        """``(no cross-validated figure, -metric)``: a card's cross-validated metric (``cv3_auc``: every
        image held out once) ranks it before any single-split figure, which on a small split can flatter a
        model by luck (a fold-0 AUC of 0.67 where all three folds give 0.57)."""
        metrics = card.get("metrics") or {}
        for cv in (True, False):
            for key in ("mean_dice", "auc", "accuracy"):
                found = [
                    v for k, v in metrics.items() if (re.fullmatch(rf"cv\d+_{key}", k) if cv else k == key)
                ]
                if found and isinstance(found[0], int | float):
                    return (not cv, -float(found[0]))
        return (True, 0.0)

    from napari_medssl.models.ensemble import NAME as ENSEMBLE

    def rank(name: str) -> tuple[bool, bool, bool, tuple[bool, float], str]:
        card = cards[name]
        ensemble = (card.get("architecture") or {}).get("name") == ENSEMBLE
        return (hint.lower() not in name.lower(), card.get("task") != want, ensemble, score(card), name)

    return sorted(cards, key=rank)[0]


PREDICTORS = ("segment", "classify")


def _predicts(card: dict[str, Any]) -> bool:
    """A segmenter or classifier meant to predict (not a pretrained backbone or a fine-tuning starting point)."""
    purpose = (card.get("domain") or {}).get("purpose", "predict")
    return card.get("task") in PREDICTORS and purpose == "predict"


def choose_fitting_model(
    cards: dict[str, dict[str, Any]], facts: Any, hint: str
) -> tuple[str | None, str | None]:
    """The :func:`choose_model` pick among the segmenters and classifiers whose domain fits the image (not
    those whose card's ``domain.purpose`` is ``starting point``: models to fine-tune, not to predict with).

    Args:
        cards: zoo cards by name.
        facts: the opened image (:class:`napari_medssl.domain.ImageFacts`).
        hint: preferred word in the model's name (the sample's name).

    Returns:
        ``(name, None)``, or ``(None, warning)`` when no shipped model that predicts fits: the warning names
        the image, what the nearest model was trained on, and the models that fit only as a starting point
        for fine-tuning. An empty zoo gives ``(None, None)``.
    """
    from napari_medssl import domain

    if not cards:
        return None, None
    verdicts = domain.fitting(cards, facts)
    usable = {n: c for n, c in cards.items() if verdicts[n].fits and _predicts(c)}
    pick = choose_model(usable, facts.spatial_dims, hint)
    if pick is not None:
        return pick, None
    nearest = choose_model({n: c for n, c in cards.items() if _predicts(c)}, facts.spatial_dims, hint)
    starters = sorted(n for n, v in verdicts.items() if v.fits)
    parts = [f"No shipped model fits {facts.name} ({domain.describe_image(facts)}): none was selected."]
    if nearest is not None:
        parts.append(f"For example, {verdicts[nearest].message}.")
    if starters:
        parts.append(f"Fits only as a starting point for fine-tuning: {', '.join(starters)}.")
    parts.append(
        "Paint the structure and fine-tune (Fine-tune dock), or pick a model in the Model dock at your own risk."
    )
    warning = " ".join(parts)
    return None, warning


def _zoo_cards() -> dict[str, dict[str, Any]]:
    from napari_medssl import zoo

    cards = {}
    for name in zoo.list_zoo():
        try:
            cards[name] = zoo.card(name)
        except ValueError:  # a broken card: skip it here, the Model dock reports it
            continue
    return cards


def open_layers(viewer: Any, args: argparse.Namespace) -> Any:
    """Add the image (and its labels) to the viewer; return the image layer."""
    if args.image:
        layers = viewer.open(args.image, plugin=PLUGIN)
    else:
        from napari_medssl import _sample_data

        loader = getattr(_sample_data, args.sample, None)
        if loader is None:
            raise ValueError(
                f"unknown sample {args.sample!r}; try hippocampus, mammogram, ct_nifti, ct_dicom"
            )
        layers = []
        for data, kwargs, kind in loader():
            layers.append(getattr(viewer, f"add_{kind}")(data, **kwargs))
    images = [ly for ly in layers if ly.__class__.__name__ == "Image"]
    if not images:
        raise ValueError("nothing to show: the input holds no image")
    viewer.layers.selection.active = images[0]
    return images[0]


def setup(viewer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Open the image, dock the widgets and select a model that fits the image (by its card's domain;
    none, with a warning, when no shipped model fits); return the docks by name."""
    from napari.utils.notifications import show_warning

    from napari_medssl import domain
    from napari_medssl._widgets.model_widget import NO_MODEL

    image = open_layers(viewer, args)
    from qtpy.QtWidgets import QApplication

    screen = QApplication.primaryScreen()
    if screen is not None:  # room for the canvas and the docks, within the screen
        avail = screen.availableGeometry()
        viewer.window.resize(min(1600, avail.width()), min(1000, avail.height()))
    docks = {}
    for i, name in enumerate(DOCKS):
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name, tabify=i > 1)
        docks[name] = widget
    model, misfit = args.model, None
    docks["Model"].image_combo.setCurrentText(image.name)
    if model is None:
        hint = args.sample if not args.image else image.name
        model, misfit = choose_fitting_model(_zoo_cards(), domain.facts_from_layer(image), hint)
    if model is None:
        docks["Model"].select(NO_MODEL, device=args.device)
        show_warning(
            misfit
            or "The model zoo is empty: train one (see models/README) or open a .safetensors checkpoint"
        )
    else:
        docks["Model"].select(model, device=args.device)
        fit = docks["Model"].domain_fit()
        if fit is not None and not fit.fits:  # a model the user asked for by name: keep it, say so
            show_warning(fit.message)
    docks["Fine-tune"].image_combo.setCurrentText(image.name)
    if image.ndim == 3 and not image.rgb:
        docks["Fine-tune"].new_labels_layer()  # ready to paint: 0 = unlabelled, k + 1 = class k
        viewer.layers.selection.active = image
    docks["Attention & masking"].image_combo.setCurrentText(image.name)
    if image.ndim == 3:
        viewer.dims.set_current_step(0, image.data.shape[0] // 2)
    return docks


def main(argv: Sequence[str] | None = None, run: bool = True) -> Any:
    """Open napari with the docks, the image and the model; block in the event loop when ``run``.

    Returns:
        The viewer (useful with ``run=False``, in tests and notebooks).
    """
    keep_triton_out()  # before napari makes an OpenGL context and before torch: see _gl_guard
    import napari

    args = parse_args(argv)
    viewer = napari.Viewer(title="napari-medssl")
    setup(viewer, args)
    if run:
        napari.run()
    return viewer
