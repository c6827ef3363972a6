#!/usr/bin/env bash
# Issue #12's speed targets on the lent H200, after the MLX CUDA wheels are installed
# (see ../shared/gpu/README.md); one command from the repository root:
#   OUT=/tmp/out bash scripts/gpu_bench_kvquant.sh
# 1. one sparse layer at 128K and 1M: bf16 cache (bf16 index keys, exact) vs --kv-bits 4
#    with each attention over the gathered quantized blocks (dequantize / matmul), and
#    mlx-lm's port (its cache unquantized: all it can do);
# 2. index keys: selection change of 8- and 4-bit keys at 128K;
# 3. the whole model (q4 weights) at 128K and 1M: bf16 cache vs --kv-bits 4 and 8 vs mlx-lm.
# Targets: --kv-bits 4 no slower than the bf16 cache at 128K and 1M; >= 5x faster than mlx-lm.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
LAYERS=${LAYERS:-2,10}
mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
MSA="python3 scripts/bench_msa.py --dtype bfloat16 --contexts 131072,1048576 --phases decode,prefill --steps 20"
$MSA --impls ours,dense,mlx_lm --index-cache-dtype model --mlx-lm-prefill-max 32768 \
  --json $OUT/kvq_msa_bf16.json 2>&1 | tee $OUT/kvq_msa_bf16.log | grep -v '^{'
for SQ in dequantize matmul; do
  $MSA --impls ours,dense --kv-bits 4 --sparse-quant $SQ \
    --json $OUT/kvq_msa_kv4_$SQ.json 2>&1 | tee $OUT/kvq_msa_kv4_$SQ.log | grep -v '^{'
done
python3 scripts/bench_index_bits.py --contexts 131072 --queries 256 \
  --json $OUT/kvq_selection_change.json 2>&1 | tee $OUT/kvq_selection_change.log
DEC="python3 scripts/bench_decode.py --formats q4 --contexts 131072,1048576 --layers $LAYERS --repeats 2"
$DEC --impls ours,mlx_lm --json $OUT/kvq_decode_bf16.json 2>&1 | tee $OUT/kvq_decode_bf16.log | grep -v '^{'
for B in 4 8; do
  $DEC --impls ours --kv-bits $B --json $OUT/kvq_decode_kv$B.json 2>&1 | tee $OUT/kvq_decode_kv$B.log | grep -v '^{'
done
