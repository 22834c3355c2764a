#!/usr/bin/env bash
# Set everything up, then train the demo model on the built-in corpus (local MLflow, no cluster).
# Extra arguments are Hydra overrides, e.g. `bash scripts/demo.sh trainer.max_minutes=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lmu_asr.launch "$@"
