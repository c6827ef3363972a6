#!/usr/bin/env bash
# Runs on the lent GPU after the MLX CUDA wheels are installed (see ../shared/gpu/README.md).
# Writes JSON + logs to $OUT; BENCHMARKS.md quotes the tables.
set -x
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
python3 scripts/bench_msa.py --dtype bfloat16 --contexts 16384,131072,524288,1048576 --check 16384 \
  --mlx-lm-prefill-max 131072 --dense-prefill-max 1048576 --prefill-steps 3 --json $OUT/msa_bf16.json 2>&1 | tee $OUT/msa_bf16.log
python3 scripts/bench_msa.py --dtype bfloat16 --contexts 131072,1048576 --impls ours \
  --index-cache-dtype model --prefill-steps 3 --json $OUT/msa_bf16_modelidx.json 2>&1 | tee $OUT/msa_bf16_modelidx.log
