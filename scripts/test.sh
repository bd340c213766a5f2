#!/usr/bin/env bash
# Build the environment and run the whole test suite headless (GUI tests under Xvfb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export MEDSSL_DATA_DIR=${MEDSSL_DATA_DIR:-$(cd .. && pwd)/shared/data}
export MEDSSL_TEST_OUTPUT=${MEDSSL_TEST_OUTPUT:-$PWD/test-output}
mkdir -p "$MEDSSL_TEST_OUTPUT"
exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python -m pytest "$@"
