"""``python -m napari_medssl``: open napari with the plugin's docks, a real image and a trained model."""

from napari_medssl._launch import main

if __name__ == "__main__":
    main()
