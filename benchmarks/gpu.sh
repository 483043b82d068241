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
python benchmarks/speed.py --device cuda --blocks 8 32 128 --width 256 --batch 64 --steps 30 --out "$out"
python benchmarks/speed.py --device cuda --blocks 128 --width 1024 --batch 512 --steps 15 --out "$out"
