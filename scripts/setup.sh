#!/usr/bin/env bash
# One-time (idempotent) set-up: Debian packages, .venv/ with lmu_asr, its dev tools and
# JupyterLab for the demo notebook.
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# TTS engines and sox for the built-in corpus (see shared notes/tts-corpus.md).
APT_PACKAGES="espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k sox wordnet-base"
APT_PACKAGES+=" festvox-us-slt-hts"  # a held-out voice: only the corpus's unseen-voices split
# A real local SLURM cluster with accounting for tests and demos (slurm/dev-cluster.sh).
APT_PACKAGES+=" slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 util-linux"
APT_PACKAGES+=" chromium chromium-driver"  # a real browser for the MLflow UI test (selenium)
APT_PACKAGES+=" ${LMU_ASR_EXTRA_APT:-}"

missing=()
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lmu_asr-installed
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages into .venv/ (a few minutes the first time)"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -c scripts/constraints.txt -e ".[dev,notebook]"; } >"$log" 2>&1; then
    tail -n 40 "$log"
    echo "setup: pip install failed; the whole log is in $log" >&2
    exit 1
  fi
  .venv/bin/python -c "import torch, torchaudio, lmu_asr" # fail loudly if the install is broken
  echo "$want" > "$stamp"
fi
