"""Which overlay fits a model, and computing it: the pure dispatch behind the Attention & masking dock.

:func:`method_for` picks the overlay a model supports (MSMAE masking, MAE reconstruction, MiM nested masks, or
DINO-style attention for any ViT); :func:`compute_overlays` runs it through :mod:`napari_medssl.overlays` and
returns :class:`~napari_medssl.overlays.OverlayLayer` descriptions; :func:`parse_ratios` reads MiM's masking
ratios from text. No Qt: the dock calls these in a worker thread.
"""

from __future__ import annotations

from typing import Any

from napari_medssl import overlays

__all__ = ["METHODS", "compute_overlays", "method_for", "parse_ratios"]

METHODS = (
    "DINO attention",
    "MSMAE masking",
    "MAE reconstruction",
    "MiM nested masks",
    "Grad-CAM (classifier)",
)


def method_for(model: Any) -> str:
    """The overlay that fits a model: MSMAE, MAE, MiM, Grad-CAM (other ViT classifiers) or DINO-style attention
    (any ViT)."""
    name = model.spec.name.lower()
    if hasattr(model, "masking_pattern"):
        return "MSMAE masking"
    if name.startswith("mim") or hasattr(model, "nested_masks"):
        return "MiM nested masks"
    if hasattr(model, "reconstruct") and not name.startswith("miram"):
        return "MAE reconstruction"
    if model.spec.task == "classify":
        return "Grad-CAM (classifier)"
    return "DINO attention"


def compute_overlays(method: str, model: Any, plane: Any, volume: Any, params: dict[str, Any]) -> list[Any]:
    """Dispatch to :mod:`napari_medssl.overlays` (worker thread); ``params["size"]`` is the resolution (long
    side in pixels, ``None`` for the default) of the ViT overlays."""
    device = params.get("device", "cpu")
    if method == "DINO attention":
        head = params.get("head")
        return overlays.dino_overlays(
            model,
            plane,
            threshold=params["threshold"],
            head=None if head is None or head < 0 else head,
            device=device,
            size=params.get("size"),
        )
    if method == "MSMAE masking":
        return overlays.msmae_overlays(
            model, plane, seed=params["seed"], device=device, size=params.get("size")
        )
    if method == "MAE reconstruction":
        return overlays.mae_overlays(
            model,
            plane,
            mask_ratio=params["mask_ratio"],
            seed=params["seed"],
            device=device,
            size=params.get("size"),
        )
    if method == "MiM nested masks":
        return overlays.mim_overlays(
            volume["shape"],
            params["ratios"],
            params["seed"],
            volume["scale"],
            volume["translate"],
            model=model,
        )
    if method == "Grad-CAM (classifier)":
        return overlays.saliency_overlays(model, plane, device=device)
    raise ValueError(f"unknown overlay {method!r}; choose one of {', '.join(METHODS)}")


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0.5, 0.6, 0.5"`` → ``(0.5, 0.6, 0.5)``.

    Raises:
        ValueError: not a comma-separated list of numbers in (0, 1).
    """
    try:
        ratios = tuple(float(t) for t in text.replace(";", ",").split(",") if t.strip())
    except ValueError:
        raise ValueError(
            f"ratios must be numbers separated by commas, e.g. '0.5, 0.6, 0.5'; got {text!r}"
        ) from None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise ValueError(f"each ratio must be in (0, 1), got {text!r}")
    return ratios
