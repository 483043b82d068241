#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md (issue 4), in one go of about 5 minutes on an H100/H200: first the
# CPU-against-GPU check of every zoo model (benchmarks/cuda_check.py), then the speed rows.
# Run from the repository root on a machine with a CUDA build of torch (PYTHON names its interpreter):
#   bash benchmarks/gpu.sh            # writes benchmarks/results/speed_gpu.jsonl and prints the tables
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# the checkout itself is imported, installed or not (the GPU machine may have no index to build from)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$python -c "import networkx, rich, safetensors, hypothesis"
out=benchmarks/results/speed_gpu.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$python -c "import torch; print('torch', torch.__version__)"
timeout 120 $python benchmarks/cuda_check.py --device cuda || echo "FAILED or timed out: cuda_check"
# each line gets a time limit, so one slow or failing configuration cannot take the others' rows with it
# (seconds first; about 4 minutes in all on an H200, 2026-12-04)
run() { timeout "$1" $python benchmarks/speed.py --device cuda --out "$out" "${@:2}" || echo "FAILED or timed out: ${*:2}"; }
run 150 --blocks 8 32 --width 256 --batch 64 --steps 20
run 60 --model resnet --blocks 4 8 --batch 128 --steps 15
run 60 --model gpt --blocks 8 --width 256 --batch 64 --steps 15
# N=128 did not finish within 180 s (d=256) and 120 s (d=1024) on the H200: GPU_LONG=1 runs it last
if [[ "${GPU_LONG:-0}" == 1 ]]; then
  run 600 --blocks 128 --width 256 --batch 64 --steps 10
  run 600 --blocks 128 --width 1024 --batch 512 --steps 10
fi
