"""Keep Triton out of the viewer process.

Mesa's OpenGL drivers (llvmpipe under Xvfb, radeonsi, ...) and Triton each load their own LLVM; importing
Triton after napari has made an OpenGL context segfaults the viewer (seen here: ``torchvision.ops`` imports
``torch._dynamo``, which imports Triton). The viewer process never compiles kernels (fine-tuning runs in a
separate process, which does not import this module), so the napari side marks Triton as absent before torch
is imported; torch then treats Triton as not installed.
"""

from __future__ import annotations

import sys


def keep_triton_out() -> None:
    """Mark Triton unavailable in this process unless it is already imported."""
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]
