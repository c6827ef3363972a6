#!/usr/bin/env bash
# Runs on the lent GPU after the MLX CUDA wheels are installed (see ../shared/gpu/README.md).
# PART=main: ours and mlx-lm, 4-bit, four contexts; PART=extra: the same script on the
# package before the speed work (./before, if present), the other weight formats and the
# prefill-attention variants. TAG names the outputs. BENCHMARKS.md quotes the tables.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TAG=${TAG:-run}
LAYERS=${LAYERS:-2,10}
if [ "${PART:-main}" = main ]; then
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
  python3 scripts/bench_decode.py --formats q4 --impls ours,mlx_lm --layers $LAYERS --repeats 2 --profile --kernels \
    --json $OUT/decode_$TAG.json 2>&1 | tee $OUT/decode_$TAG.log | grep -v '^{'
else
  if [ -d before ]; then
    BENCH_PACKAGE_ROOT=$PWD/before python3 scripts/bench_decode.py --formats q4 --impls ours --layers $LAYERS \
      --repeats 2 --profile --kernels --json $OUT/decode_before_$TAG.json 2>&1 | tee $OUT/decode_before_$TAG.log | grep -v '^{'
  fi
  python3 scripts/profile_prefill.py --contexts 16384,131072 2>&1 | tee $OUT/prefill_variants_$TAG.log
  python3 scripts/bench_decode.py --formats mac-256gb,mxfp8 --impls ours --contexts 4096,131072 --chunk 0 \
    --layers $LAYERS --repeats 2 --json $OUT/decode_formats_$TAG.json 2>&1 | tee $OUT/decode_formats_$TAG.log | grep -v '^{'
fi
