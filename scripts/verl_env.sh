#!/usr/bin/env bash
# Build (once) the isolated virtual environment that tests cppo-diag's verl plug-in against the real
# verl package from PyPI: /work/main/.venv-verl by default (override with VERL_VENV=...).
#
# Why a separate venv: verl pins transformers to a range that excludes the main venv's release and its
# default install pulls ray[default], wandb, tensorboard, ... (hundreds of MiB). The plug-in only needs
# `verl.trainer.ppo.core_algos` importable, so verl is installed with --no-deps plus the few packages that
# module's import chain really uses (verl/__init__ -> verl.protocol -> ray + tensordict; core_algos ->
# omegaconf, verl.workers.config -> transformers). Idempotent: exits at once when the stamp file matches.
#
#   bash scripts/verl_env.sh            # build if missing, then print the venv's python
#   VERL_SPEC='verl==0.9.1' bash scripts/verl_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERL_VENV:-$ROOT/.venv-verl}"
VERL_SPEC="${VERL_SPEC:-verl==0.9.1}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
# Runtime imports of verl.trainer.ppo.core_algos (and of cppo_diag: numpy, polars, pyarrow, tqdm, pyyaml).
# transformers: verl 0.9.1 requires >=5.5.3,<5.11 (5.6.0 excluded).
VERL_IMPORT_DEPS=(
  "ray>=2.41" "tensordict>=0.8,<=0.10,!=0.9.0" "omegaconf" "hydra-core" "codetiming" "packaging>=20"
  "transformers>=5.5.3,<5.11,!=5.6.0" "numpy>=2" "pyarrow>=19" "pandas"
)
OUR_DEPS=("polars>=1.0" "tqdm>=4.66" "pyyaml>=6" "safetensors>=0.4")
STAMP="$VENV/.cppo-diag-verl-stamp"
WANT="$VERL_SPEC|$TORCH_SPEC|${VERL_IMPORT_DEPS[*]}|${OUR_DEPS[*]}|v1"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

start=$(date +%s)
echo "building $VENV ($VERL_SPEC) ..." >&2
rm -rf "$VENV"
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [[ -n "$TORCH_SPEC" ]]; then "${PIP[@]}" "$TORCH_SPEC"; fi
"${PIP[@]}" --no-deps "$VERL_SPEC"
"${PIP[@]}" "${VERL_IMPORT_DEPS[@]}" "${OUR_DEPS[@]}"
"${PIP[@]}" --no-deps -e "$ROOT"
# Fail here (not later in a test) if the import chain needs something we did not install.
"$VENV/bin/python" -c "import verl.trainer.ppo.core_algos as c; assert hasattr(c, 'get_policy_loss_fn')"
echo "$WANT" > "$STAMP"
echo "built $VENV in $(( $(date +%s) - start )) s" >&2
echo "$VENV/bin/python"
