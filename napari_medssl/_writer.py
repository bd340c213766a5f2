"""npe2 writers: a Labels layer → NIfTI on its source image's grid, DICOM SEG on its DICOM series, or PNG/TIFF.

Thin adapters over ``io``; a prediction's provenance (``metadata["medssl"]["provenance"]``, set by the Model
dock) goes into the SEG's header, or beside a NIfTI file as ``<file>.json``.
"""

from __future__ import annotations

from typing import Any

from napari_medssl.io import write_labels


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write labels as ``.nii``/``.nii.gz`` on the grid in the layer's ``metadata["affine"]``.

    Labels painted on an image opened by this plugin carry that grid (see ``io.grid_metadata``); other
    layers fall back to their ``scale`` and ``translate``.
    """
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    written = write_labels(
        path,
        data,
        attributes.get("metadata"),
        scale=attributes.get("scale"),
        translate=attributes.get("translate"),
    )
    prov = ((attributes.get("metadata") or {}).get("medssl") or {}).get("provenance")
    if prov:
        from napari_medssl.provenance import write_sidecar

        write_sidecar(written[0], prov)
    return written


def write_labels_image(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write 2D labels as ``.png`` (or ``.tif``/``.tiff``, which also take 3D stacks)."""
    if not str(path).lower().endswith((".png", ".tif", ".tiff")):
        path = f"{path}.png"
    return write_labels(path, data, attributes.get("metadata"))


def write_labels_dicom_seg(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write labels on a DICOM series as a DICOM SEG (``.dcm``) referencing that series.

    The source series comes from the layer's metadata (labels predicted by the Model dock, read from a
    SEG, or given the image's ``io.grid_metadata``); else from an image layer of the current viewer with
    the same shape, scale and translate that was opened from DICOM by this plugin.
    """
    from napari_medssl.io.dicom_seg import write_seg

    if not str(path).lower().endswith(".dcm"):
        path = f"{path}.dcm"
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt: a headless write
        viewer = None
    files, kwargs = seg_source(data, attributes, viewer.layers if viewer is not None else ())
    return [str(write_seg(path, data, files, **kwargs))]


def seg_source(data: Any, attributes: dict[str, Any], layers: Any = ()) -> tuple[list[str], dict[str, Any]]:
    """The DICOM source files and ``build_seg`` keywords for a Labels layer's ``data`` and ``attributes``.

    From the layer's own metadata (see ``io.dicom_seg.seg_inputs``), else from the first DICOM image layer
    among ``layers`` with the same shape, scale and translate.

    Raises:
        MedicalImageWriteError: No DICOM series to reference.
    """
    import numpy as np

    from napari_medssl.io.dicom_seg import seg_inputs

    metadata = dict(attributes.get("metadata") or {})
    if not (metadata.get("reference_files") or metadata.get("format") == "dicom"):
        shape = tuple(np.shape(data))
        for layer in layers:
            md = getattr(layer, "metadata", None) or {}
            if (
                md.get("format") == "dicom"
                and md.get("files")
                and type(layer).__name__ == "Image"
                and tuple(layer.data.shape[: layer.ndim]) == shape
                and np.allclose(layer.scale, attributes.get("scale", layer.scale))
                and np.allclose(layer.translate, attributes.get("translate", layer.translate))
            ):
                metadata.update({k: md[k] for k in ("files", "format", "header") if k in md})
                break
    return seg_inputs(metadata)
