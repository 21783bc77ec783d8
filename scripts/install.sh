#!/usr/bin/env bash
# Installs sodec-jax and everything its tests need, in the only order that works on a CPU box:
#   1. torch==2.13.0 first (the CPU build; any looser torch requirement pulls several GB of CUDA),
#   2. the pinned requirements,
#   3. the `lpips` wheel WITHOUT its dependencies (it would pull torchvision; we only read its
#      shipped linear-head weights),
#   4. this package in editable mode (console script `sodec`).
# --gpu (or SODEC_GPU=1): after the pinned requirements, the CUDA build of the same jax
# (requirements-gpu.txt: jax[cuda12]==0.10.2; SODEC_CUDA=13 for jax[cuda13]); torch stays CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU="${SODEC_GPU:-0}"
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    *) echo "install.sh: unknown option $arg (use --gpu for the CUDA jax)" >&2; exit 2 ;;
  esac
done
CUDA="${SODEC_CUDA:-12}"
if [ "$CUDA" != 12 ] && [ "$CUDA" != 13 ]; then
  echo "install.sh: SODEC_CUDA=$CUDA must be 12 or 13" >&2; exit 2
fi
PIP="python3 -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -r requirements.txt
if [ "$GPU" = 1 ]; then
  if [ "$CUDA" = 12 ]; then
    $PIP install -q -r requirements-gpu.txt
  else
    JAX_VERSION="$(sed -n 's/^jax==//p' requirements.txt)"
    $PIP install -q "jax[cuda13]==${JAX_VERSION}"
  fi
fi
$PIP install -q --no-deps lpips==0.1.4
$PIP install -q --no-deps -e .
python3 - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision",) if importlib.util.find_spec(m) is not None]
if bad:
    sys.exit(f"install.sh: {bad} is installed and breaks torch 2.13.0 here; run `pip uninstall -y {' '.join(bad)}`")
import jax, flax, torch
print(f"sodec-jax installed: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}, devices {jax.devices()}")
PY
