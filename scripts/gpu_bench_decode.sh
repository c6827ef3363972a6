#!/usr/bin/env bash
# Issue #12's speed targets on one H200 (MLX CUDA), ready to run from the repository root:
#   bash scripts/gpu_bench_decode.sh            (results in bench_out/kvquant/)
# 1. one sparse layer at 128K and 1M: bf16 cache vs --kv-bits 4 (both sparse-attention
#    variants over the gathered quantized blocks) and mlx-lm's port (its cache unquantized);
# 2. the whole model (q4 weights) at 128K and 1M: bf16 cache vs --kv-bits 4 (and 8) vs mlx-lm.
# Targets: --kv-bits 4 no slower than the bf16 cache; >= 5x faster than mlx-lm.
set -euo pipefail
out=bench_out/kvquant
mkdir -p "$out"
msa="python scripts/bench_msa.py --dtype bfloat16 --phases decode,prefill --steps 20 --mlx-lm-prefill-max 32768"
$msa --contexts 131072,1048576 --impls ours,dense,mlx_lm --index-cache-dtype model --json "$out/msa_bf16.json" | tee "$out/msa_bf16.log"
for sq in dequantize matmul; do
  $msa --contexts 131072,1048576 --impls ours,dense --kv-bits 4 --sparse-quant $sq --json "$out/msa_kv4_$sq.json" | tee "$out/msa_kv4_$sq.log"
done
python scripts/bench_index_bits.py --contexts 131072 --queries 256 --json "$out/selection_change_128k.json" | tee "$out/selection_change.log"
dec="python scripts/bench_decode.py --formats q4 --contexts 131072,1048576 --mlx-lm-prefill-max 32768"
$dec --impls ours,mlx_lm --json "$out/decode_bf16.json" | tee "$out/decode_bf16.log"
$dec --impls ours --kv-bits 4 --json "$out/decode_kv4.json" | tee "$out/decode_kv4.log"
$dec --impls ours --kv-bits 8 --json "$out/decode_kv8.json" | tee "$out/decode_kv8.log"
