"""napari-medssl: self-supervised medical-image models in napari.

Importing this package loads neither torch nor Qt; import the subpackages you need
(``napari_medssl.models``, ``napari_medssl.engine``, ``napari_medssl.io``).
"""

__version__ = "0.1.0"
