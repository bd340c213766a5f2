"""Domain fit: does an opened image look like the data a model was trained on?

A model card's ``domain:`` block (schema: :data:`DOMAIN_FIELDS`, documented in ``napari_medssl/README.md``)
records the images a model was trained for. :func:`check` compares the facts of an opened image
(:class:`ImageFacts`, from a :class:`~napari_medssl.io.Volume` or a napari layer's metadata) with it and
returns a :class:`DomainFit`: ``fits``, the reasons it does not, the facts that could not be compared, and a
plain message naming both sides, e.g. ``trained on 1 mm T1 hippocampus crops; this is 0.69×0.69×6.5 mm
brain MR (260×320×24 voxels): the predictions will not be meaningful``.

Rules: a fact the image does not carry (no modality in a PNG, unknown pixel spacing) is *unknown*, never a
misfit by itself; a card without a ``domain`` block fits everything (unknown); ranges hold per axis in napari
order (``z, y, x`` / ``y, x``) and ``null`` leaves an axis unchecked. Messages print sizes and spacings the
way readers say them, ``x×y×z``. Pure Python: no torch, napari or Qt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DOMAIN_FIELDS = {
    "summary": "the training images in a few words, used in messages ('1 mm T1 hippocampus crops')",
    "modality": "DICOM Modality codes (0008,0060) accepted: [MR], [CT], [MG], [OP] (fundus) ...",
    "sequence": "contrast / weighting / view of the training images (text)",
    "body_part": "DICOM BodyPartExamined values (0018,0015) accepted: [BRAIN, HEAD], [BREAST] ...",
    "structure": "what the images show and what the model finds in them (text)",
    "image_dims": "image dimensionalities accepted: [3] a volume, [2] a 2D image, [2, 3] either",
    "model_dims": "2: the model reads 2D images or slices (slice_axis says which axis), 3: whole volumes",
    "slice_axis": "axis a 2D model slices volumes along (napari order)",
    "channels": "1 (grey) or 3 (RGB)",
    "spacing_mm": "{min, max: accepted range per axis (null: unchecked), trained_min, trained_max}",
    "fov_mm": "field of view (size × spacing) in mm: {min, max, trained_min, trained_max} per axis",
    "size_voxels": "{min, max (checked only when the spacing is unknown), trained_min, trained_max}",
    "intensity": "how intensities are normalised before the model (text)",
    "notes": "anything else a user should know (text)",
    "purpose": "'predict' (default) or 'starting point': a model meant to be fine-tuned, never auto-selected",
}
"""Keys of a card's ``domain:`` block and what each holds. Only ``summary`` is required."""

RANGE_KEYS = ("spacing_mm", "fov_mm", "size_voxels")
PURPOSES = ("predict", "starting point")
UNKNOWN_MODALITIES = {"", "OT", "UNKNOWN", "NONE"}
NOT_MEANINGFUL = "the predictions will not be meaningful"

__all__ = [
    "DOMAIN_FIELDS",
    "DomainFit",
    "ImageFacts",
    "check",
    "describe_image",
    "facts_from_layer",
    "facts_from_metadata",
    "facts_from_volume",
    "fitting",
    "model_domain",
    "validate_domain",
]


@dataclass(frozen=True)
class ImageFacts:
    """What is known about an opened image (``None``: unknown).

    Attributes:
        name: Layer or series name.
        shape: Spatial shape in napari order (``(Z, Y, X)`` or ``(Y, X)``), channels excluded.
        spacing: Voxel size in mm per axis of ``shape``, or ``None`` when the file does not say.
        modality: DICOM Modality code, or ``None``.
        modality_guessed: The modality was guessed from intensities (NIfTI), not read from a header.
        body_part: DICOM BodyPartExamined, upper case, or ``None``.
        series: SeriesDescription (``T1post``), or ``None``.
        rgb: Colour channels on the last axis.
    """

    name: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    modality: str | None = None
    modality_guessed: bool = False
    body_part: str | None = None
    series: str | None = None
    rgb: bool = False

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return len(self.shape)


@dataclass(frozen=True)
class DomainFit:
    """The verdict of :func:`check`.

    Attributes:
        fits: ``False`` when a known fact of the image is outside the model's domain.
        reasons: One line per misfit (empty when it fits).
        unknown: Facts that could not be compared (the image or the card does not say).
        message: A plain sentence naming the training data and the image (and the reasons).
        model: The model's name, as given to :func:`check`.
        image: The image described (``0.69×0.69×6.5 mm brain MR (260×320×24 voxels)``).
        recorded: ``False`` when the model records no domain (nothing could be compared).
        summary: The training data in a few words (the card's ``domain.summary``).
    """

    fits: bool
    reasons: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    message: str = ""
    model: str = ""
    image: str = ""
    recorded: bool = True
    summary: str = ""

    @property
    def short(self) -> str:
        """The message without the model's name and the per-fact reasons (for a narrow dock)."""
        if not self.recorded:
            return "no training domain recorded"
        verdict = NOT_MEANINGFUL if not self.fits else "it fits"
        return f"trained on {self.summary}; this is {self.image}: {verdict}"


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def facts_from_metadata(
    metadata: Mapping[str, Any] | None,
    shape: Sequence[int],
    *,
    rgb: bool = False,
    name: str = "image",
) -> ImageFacts:
    """Facts of an image from its metadata (a :class:`Volume`'s, or a napari layer's, which holds it).

    Args:
        metadata: ``Volume.metadata`` plus ``modality`` (what ``io.layer_data`` gives a layer); may be empty
            for images from other plugins (everything is then unknown but the shape).
        shape: The data's shape (a trailing colour axis when ``rgb``).
        rgb: Whether the last axis holds colour channels.
        name: The layer or series name.
    """
    meta = dict(metadata or {})
    spatial = tuple(int(s) for s in (shape[:-1] if rgb else shape))
    header = meta.get("header") if isinstance(meta.get("header"), Mapping) else {}
    spacing = meta.get("spacing")
    known = meta.get("spacing_known", True) and spacing is not None and len(spacing) == len(spatial)
    modality = _text(meta.get("modality") or header.get("Modality"))
    if modality is not None and modality.upper() in UNKNOWN_MODALITIES:
        modality = None
    body = _text(header.get("BodyPartExamined"))
    return ImageFacts(
        name=str(meta.get("name") or name),
        shape=spatial,
        spacing=tuple(float(s) for s in spacing) if known else None,
        modality=modality.upper() if modality else None,
        modality_guessed=bool(meta.get("modality_guessed", False)),
        body_part=body.upper() if body else None,
        series=_text(header.get("SeriesDescription")),
        rgb=bool(rgb),
    )


def facts_from_volume(volume: Any) -> ImageFacts:
    """Facts of a :class:`~napari_medssl.io.Volume` (modality, spacing, shape, header)."""
    meta = {**volume.metadata, "modality": volume.modality, "spacing": list(volume.spacing)}
    return facts_from_metadata(meta, volume.data.shape, rgb=volume.rgb, name=volume.name)


def facts_from_layer(layer: Any) -> ImageFacts:
    """Facts of a napari Image layer (duck-typed: ``metadata``, ``data``, ``rgb``, ``name``; no napari import).

    This plugin's reader puts the volume's metadata on the layer; a layer from elsewhere gives the shape only.
    """
    meta = dict(getattr(layer, "metadata", None) or {})
    rgb = bool(getattr(layer, "rgb", False))
    return facts_from_metadata(meta, layer.data.shape, rgb=rgb, name=str(getattr(layer, "name", "image")))


def model_domain(model: Any = None, card: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The domain block of a loaded model (``model.spec.domain``: its card's) or of a card."""
    if model is not None and model.spec.domain:
        return dict(model.spec.domain)
    dom = (card or {}).get("domain") if isinstance(card, Mapping) else None
    return dict(dom) if isinstance(dom, Mapping) else None


def _num(value: float) -> str:
    value = float(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _xyz(values: Sequence[float | None], unit: str = "") -> str:
    """Per-axis values (napari order) printed ``x×y×z`` (``any`` for an unchecked axis)."""
    return "×".join("any" if v is None else _num(v) for v in reversed(list(values))) + unit


def describe_image(facts: ImageFacts) -> str:
    """``0.69×0.69×6.5 mm brain MR (T1post, 260×320×24 voxels)``: what is known, unknowns left out."""
    words = []
    if facts.spacing is not None:
        words.append(_xyz(facts.spacing, " mm"))
    if facts.body_part:
        words.append(facts.body_part.lower())
    if facts.modality:
        words.append(facts.modality + (" (guessed)" if facts.modality_guessed else ""))
    else:
        words.append("2D image" if facts.spatial_dims == 2 else "volume")
    inner = ", ".join(
        [
            *([facts.series] if facts.series else []),
            _xyz(facts.shape, " pixels" if len(facts.shape) == 2 else " voxels"),
        ]
    )
    return f"{' '.join(words)} ({inner})"


def _range_reasons(what: str, values: Sequence[float], rng: Mapping[str, Any], unit: str) -> list[str]:
    """One misfit line for per-axis ``values`` against ``rng['min'|'max']`` (aligned on the last axes)."""
    axes = "zyx"[-len(values) :]
    out = []
    for bound, worse in (("min", "below"), ("max", "above")):
        limits = rng.get(bound)
        if limits is None:
            continue
        limits = [None] * (len(values) - len(limits)) + list(limits)[-len(values) :]
        for axis, v, lim in zip(axes, values, limits, strict=True):
            if lim is not None and ((v < lim) if bound == "min" else (v > lim)):
                out.append(f"{axis} {worse} {_num(lim)}")
    if not out:
        return []
    return [f"{what} {_xyz(values, unit)} ({', '.join(out)}{unit})"]


def _listed(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [str(v).upper() for v in items]


def _categorical(domain: Mapping[str, Any], facts: ImageFacts) -> tuple[list[str], list[str]]:
    reasons: list[str] = []
    unknown: list[str] = []
    modalities = _listed(domain.get("modality"))
    if modalities:
        if facts.modality is None:
            unknown.append("modality (the image does not say)")
        elif facts.modality not in modalities:
            guess = " (guessed from its intensities)" if facts.modality_guessed else ""
            reasons.append(f"modality {facts.modality}{guess}, not {' or '.join(modalities)}")
    parts = _listed(domain.get("body_part"))
    if parts:
        if facts.body_part is None:
            unknown.append("body part")
        elif facts.body_part not in parts:
            reasons.append(f"body part {facts.body_part}, not {' or '.join(parts)}")
    dims = [int(d) for d in domain.get("image_dims") or []]
    if dims and facts.spatial_dims not in dims:
        want = " or ".join("a volume" if d == 3 else "a 2D image" for d in dims)
        reasons.append(f"a {facts.spatial_dims}D image; the model takes {want}")
    channels = domain.get("channels")
    if channels is not None and (3 if facts.rgb else 1) != int(channels):
        reasons.append(f"{'RGB' if facts.rgb else 'grey'} pixels; the model takes {channels} channel(s)")
    return reasons, unknown


def _geometric(domain: Mapping[str, Any], facts: ImageFacts) -> tuple[list[str], list[str]]:
    reasons: list[str] = []
    unknown: list[str] = []
    spacing = domain.get("spacing_mm") or {}
    fov = domain.get("fov_mm") or {}
    size = domain.get("size_voxels") or {}
    if facts.spacing is None:
        if spacing.get("min") is not None or spacing.get("max") is not None or fov:
            unknown.append("pixel spacing (the file does not say)")
        reasons += _range_reasons("size", facts.shape, size, " voxels")
        return reasons, unknown
    reasons += _range_reasons("spacing", facts.spacing, spacing, " mm")
    extent = [n * s for n, s in zip(facts.shape, facts.spacing, strict=True)]
    reasons += _range_reasons("field of view", extent, fov, " mm")
    return reasons, unknown


def check(domain: Mapping[str, Any] | None, facts: ImageFacts, model: str = "this model") -> DomainFit:
    """Compare an image with a model's domain.

    Args:
        domain: The card's ``domain`` block (:func:`model_domain`); ``None``: nothing to compare (fits).
        facts: The image (:func:`facts_from_volume`, :func:`facts_from_layer`).
        model: The model's name, for the message.

    Returns:
        The verdict; ``message`` names the training data and the image.
    """
    image = describe_image(facts)
    if not domain:
        return DomainFit(
            True,
            (),
            ("the model's domain (its card records none)",),
            f"{model}: its card records no training domain; cannot tell whether it fits this {image}",
            model,
            image,
            recorded=False,
        )
    summary = str(domain.get("summary") or "its training data")
    reasons, unknown = _categorical(domain, facts)
    more, unknown_geo = _geometric(domain, facts)
    reasons += more
    unknown += unknown_geo
    if reasons:
        message = (
            f"{model} was trained on {summary}; this is {image}: {NOT_MEANINGFUL} ({'; '.join(reasons)})"
        )
    else:
        message = f"{model} was trained on {summary}; this is {image}: it fits"
        if unknown:
            message += f" as far as known (unknown: {', '.join(unknown)})"
    return DomainFit(not reasons, tuple(reasons), tuple(unknown), message, model, image, summary=summary)


def fitting(cards: Mapping[str, Mapping[str, Any]], facts: ImageFacts) -> dict[str, DomainFit]:
    """The verdict of every card (by model name) for one image."""
    return {name: check(model_domain(card=card), facts, name) for name, card in cards.items()}


def validate_domain(domain: Any, where: str = "domain") -> None:
    """Check a card's ``domain`` block against :data:`DOMAIN_FIELDS`.

    Raises:
        ValueError: not a mapping, an unknown key, no ``summary``, a range whose ``min`` exceeds ``max`` or
            whose axes do not match ``image_dims``.
    """
    if not isinstance(domain, Mapping):
        raise ValueError(f"{where} must be a mapping of {', '.join(DOMAIN_FIELDS)}")
    extra = set(domain) - set(DOMAIN_FIELDS)
    if extra:
        raise ValueError(f"{where}: unknown keys {sorted(extra)}; allowed: {', '.join(DOMAIN_FIELDS)}")
    if domain.get("purpose", "predict") not in PURPOSES:
        raise ValueError(
            f"{where}.purpose must be one of {', '.join(PURPOSES)}, got {domain.get('purpose')!r}"
        )
    if not domain.get("summary"):
        raise ValueError(f"{where}: 'summary' (the training images in a few words) is required")
    dims = domain.get("image_dims") or [2, 3]
    for key in RANGE_KEYS:
        rng = domain.get(key)
        if rng is None:
            continue
        if not isinstance(rng, Mapping):
            raise ValueError(f"{where}.{key} must be a mapping with min/max per axis")
        lo, hi = rng.get("min"), rng.get("max")
        for bound in (lo, hi):
            if bound is not None and len(bound) != max(dims):
                raise ValueError(f"{where}.{key}: {bound} needs {max(dims)} axes (napari order)")
        if lo is not None and hi is not None:
            for a, b in zip(lo, hi, strict=True):
                if a is not None and b is not None and float(a) > float(b):
                    raise ValueError(f"{where}.{key}: min {lo} exceeds max {hi}")
