"""Building blocks shared by the model families (pure torch)."""

from napari_medssl.models.layers.attention import (
    ATTENTION_KINDS,
    LinformerAttention,
    NystromAttention,
    PerformerAttention,
    SDPAAttention,
    make_attention,
)

__all__ = [
    "ATTENTION_KINDS",
    "LinformerAttention",
    "NystromAttention",
    "PerformerAttention",
    "SDPAAttention",
    "make_attention",
]
