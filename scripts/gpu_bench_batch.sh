#!/usr/bin/env bash
# Batched decode on the lent GPU (after the MLX CUDA wheels are installed, as for
# gpu_bench_decode.sh): ours and mlx-lm's port, 4-bit, 8K and 64K, 1/2/4/8 streams, with
# the bytes model's prediction per row. BENCHMARKS.md quotes the table (issue #13's targets:
# >= 1.35x at 4 streams, >= 1.6x at 8, and ahead of mlx-lm's batched port at every count).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TAG=${TAG:-run}
LAYERS=${LAYERS:-10}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 scripts/bench_batch.py --format q4 --impls ours,mlx_lm --contexts 8192,65536 --streams 1,2,4,8 \
  --layers $LAYERS --tokens 24 --warm 4 --json $OUT/batch_$TAG.json 2>&1 | tee $OUT/batch_$TAG.log | grep -v '^{'
