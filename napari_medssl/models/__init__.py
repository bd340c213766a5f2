"""Pure-torch models (no Qt, napari or magicgui imports anywhere below this folder)."""

from napari_medssl.models.registry import (
    create_model,
    list_models,
    load_model,
    read_checkpoint,
    register_model,
    save_model,
)

__all__ = ["create_model", "list_models", "load_model", "read_checkpoint", "register_model", "save_model"]
