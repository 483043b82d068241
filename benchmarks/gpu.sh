#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md (issue 4), in one go of under 8 minutes on an H100/H200.
# Run from the repository root on a machine with a CUDA build of torch:
#   bash benchmarks/gpu.sh            # writes benchmarks/results/speed_gpu.jsonl and prints the tables
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import hbll_compile" 2>/dev/null || pip install -q --no-deps -e .
python -c "import networkx, rich, safetensors" 2>/dev/null || pip install -q networkx rich safetensors
out=benchmarks/results/speed_gpu.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# each line gets a time limit, so one slow or failing configuration cannot take the others' rows with it
# (seconds first; about 7 minutes in all)
run() { timeout "$1" python benchmarks/speed.py --device cuda --out "$out" "${@:2}" || echo "FAILED or timed out: ${*:2}"; }
run 180 --blocks 8 32 128 --width 256 --batch 64 --steps 30
run 120 --blocks 128 --width 1024 --batch 512 --steps 15
run 60 --model resnet --blocks 4 8 --batch 128 --steps 15
run 60 --model gpt --blocks 8 --width 256 --batch 64 --steps 15
