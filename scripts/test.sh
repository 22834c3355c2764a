#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lmu_asr hydra_plugins tests
.venv/bin/ruff format --check lmu_asr hydra_plugins tests
exec .venv/bin/python -m pytest "$@"
