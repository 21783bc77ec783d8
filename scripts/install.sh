#!/usr/bin/env bash
# Installs sodec-jax and everything its tests need, in the only order that works on a CPU box:
#   1. torch==2.13.0 first (the CPU build; any looser torch requirement pulls several GB of CUDA),
#   2. the pinned requirements,
#   3. the `lpips` wheel WITHOUT its dependencies (it would pull torchvision; we only read its
#      shipped linear-head weights),
#   4. this package in editable mode (console script `sodec`).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -r requirements.txt
$PIP install -q --no-deps lpips==0.1.4
$PIP install -q --no-deps -e .
python3 - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision",) if importlib.util.find_spec(m) is not None]
if bad:
    sys.exit(f"install.sh: {bad} is installed and breaks torch 2.13.0 here; run `pip uninstall -y {' '.join(bad)}`")
import jax, flax, torch
print(f"sodec-jax installed: jax {jax.__version__}, flax {flax.__version__}, torch {torch.__version__}")
PY
