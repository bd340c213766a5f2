#!/usr/bin/env bash
# Build the project's environment: Debian packages for a real (X/OpenGL) napari window when run as root,
# then a virtual environment in .venv with the package installed (editable) and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends xvfb xauth libgl1-mesa-dri libglx-mesa0 libegl1 \
    libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
    libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libxcb-xkb1 libfontconfig1 \
    libdbus-1-3 >/dev/null
  # a real PACS for the DICOMweb tests: they start their own Orthanc on a free loopback port
  if ! command -v Orthanc >/dev/null || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then
    apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb >/dev/null
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[testing]"
