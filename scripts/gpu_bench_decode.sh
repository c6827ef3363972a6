#!/usr/bin/env bash
# Runs on the lent GPU after the MLX CUDA wheels are installed (see ../shared/gpu/README.md):
# the whole-model decode/prefill benchmark and the one-layer attention prefill. TAG names
# the outputs (before / after). BENCHMARKS.md quotes the tables.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
TAG=${TAG:-run}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 scripts/bench_decode.py --formats q4 --impls ours,mlx_lm --profile --kernels \
  --json $OUT/decode_$TAG.json 2>&1 | tee $OUT/decode_$TAG.log
python3 scripts/bench_decode.py --formats mac-256gb,mxfp8 --impls ours --contexts 4096,131072 --chunk 0 \
  --json $OUT/decode_formats_$TAG.json 2>&1 | tee $OUT/decode_formats_$TAG.log
python3 scripts/bench_msa.py --dtype bfloat16 --phases prefill --impls ours,dense --contexts 16384,131072 \
  --prefill-steps 3 --json $OUT/msa_prefill_$TAG.json 2>&1 | tee $OUT/msa_prefill_$TAG.log
grep -h -A20 "^impl " $OUT/decode_$TAG.log $OUT/decode_formats_$TAG.log
tail -4 $OUT/msa_prefill_$TAG.log
