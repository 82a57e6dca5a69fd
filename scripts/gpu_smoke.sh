#!/usr/bin/env bash
# GPU smoke check, no network, ~5 minutes on one CUDA GPU (see scripts/gpu_smoke.py):
#   1. SD3-medium-shaped benchmark at 1024 px, bf16: ControlNet-only and full-step latency of the 23-layer
#      teacher vs the 12-layer student, one distillation step (samples/s, peak memory);
#   2. the smoke profile's DVC pipeline on the GPU with bf16 distillation.
# Without a GPU it prints a clear message and the dry run (parameter counts, memory plan) and exits 0
# (--require-gpu: exit 2).  Usage: scripts/gpu_smoke.sh [--dry-run] [--image-size 512] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_IGNORE_ISATTY=1 TQDM_DISABLE=1 GX_ANALYTICS_ENABLED=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec timeout "${GPU_SMOKE_TIMEOUT:-330}" "$PY" scripts/gpu_smoke.py "$@"
