#!/usr/bin/env bash
# Build the environment and launch napari with the plugin's docks, a real image and a trained model ready.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export MEDSSL_DATA_DIR=${MEDSSL_DATA_DIR:-$(cd .. && pwd)/shared/data}
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null; then
  echo "no DISPLAY: starting napari on a virtual screen (xvfb-run)" >&2
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m napari_medssl "$@"
fi
exec .venv/bin/python -m napari_medssl "$@"
