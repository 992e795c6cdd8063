#!/usr/bin/env bash
# Create .venv and install stepsmith with its test extras.
# Installs torch==2.13.0 FIRST: on this kind of machine pip finds that CPU wheel on local
# disk; resolving a bare `torch` from scratch would pull a multi-GB CUDA build. On your own
# machine set STEPSMITH_TORCH to the torch requirement you want (e.g. "torch" for CUDA).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q "${STEPSMITH_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,lora]"
python - <<'PY'
import torch, diffusers
print(f"stepsmith setup ok: torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}")
PY
