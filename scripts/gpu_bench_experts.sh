#!/usr/bin/env bash
# Runs on the lent GPU after the MLX CUDA wheels are installed (see ../shared/gpu/README.md):
# --expert-memory at the real widths with every miss read from the host's disk (the page
# cache dropped), 3 MoE layers (a 12.2 GB bank), 10/25/100% of the bank, uniform and zipf
# routing, decode and a 2048-token prefill chunk; then the copy path at 25% beside it.
# BENCHMARKS.md ("Experts from the disk") quotes the table. Needs ~13 GB free on the disk.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
FOLDER=${FOLDER:-/tmp/expert-bank}
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import mlx.core as mx; from minimax_m3_mlx.model import experts; \
print(mx.default_device(), 'writes in place:', experts.writes_in_place())"
df -h "$(dirname "$FOLDER")" | tail -1
python3 scripts/bench_experts.py --folder "$FOLDER" --layers 3 --decode 12 --chunk 2048 --fractions ${FRACTIONS:-0.1,0.25,1.0} \
  --routings uniform,zipf --run-timeout 90 --json $OUT/experts_gpu.json 2>&1 | tee $OUT/experts_gpu.log | grep -v '^{'
python3 scripts/bench_experts.py --folder "$FOLDER" --decode 12 --chunk 2048 --fractions 0.25 --routings uniform \
  --path copies --run-timeout 90 --json $OUT/experts_gpu_copies.json --clean 2>&1 | tee $OUT/experts_gpu_copies.log | grep -v '^{'
