#!/usr/bin/env bash
# GPU check in one command (about 5-8 minutes on one H200; hard limit 8 minutes):
#   bash benchmarks/gpu_check.sh [--out gpu.json]   # released 7B dims, random bf16 weights, cuda
#   bash benchmarks/gpu_check.sh --dry-run          # tiny preset on CPU: checks the script itself
# Prints a markdown table: decode tok/s at batch 1/32 vs the HBM roofline, ViT-g images/s at batch 64,
# time ratios vs transformers (1 prompt, 8 prompts greedy, 8 prompts beam 5), bf16/fp32 agreement.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT 480 "$python" "$here/gpu_check.py" "$@"
