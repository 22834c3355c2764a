#!/usr/bin/env bash
# Set everything up, then run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lmu_asr hydra_plugins tests
.venv/bin/ruff format --check lmu_asr hydra_plugins tests
# Two workers (pytest-xdist): the tests that need the SLURM cluster run on one of them (they
# mostly wait on the scheduler; tests/conftest.py groups them), everything else on the other.
# LMU_ASR_TEST_WORKERS=0 runs the suite in one process.
exec .venv/bin/python -m pytest -n "${LMU_ASR_TEST_WORKERS:-2}" --dist loadgroup "$@"
