"""How often quantized index keys change the block selection, at the real widths.

    python scripts/bench_index_bits.py --contexts 16384,32768 --queries 64

For each context: index keys [S, 128] and 4 index heads' queries for the last `--queries`
positions, in bf16 (the model dtype); the selection with the keys as stored by default
(bf16, scored float32: exact) against the selection with 8- and 4-bit keys (group 64,
dequantized and scored float32). Prints the fraction of selected blocks that differ.
The keys and queries are random unit-RMS vectors (GemmaRMSNorm's output scale): with no
trained weights their block maxima are closer than a trained indexer's, so this is a
pessimistic figure; rerun with real activations where there are some.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx

from minimax_m3_mlx.model import msa
from minimax_m3_mlx.model.kvquant import QuantizedRows


def selection_change(S: int, queries: int, bits: int, group_size: int = 64, block_size: int = 128,
                     topk: int = 16, heads: int = 4, dim: int = 128, seed: int = 0) -> float:
    kk, kq = mx.random.split(mx.random.key(seed))
    keys = mx.random.normal((1, 1, S, dim), key=kk).astype(mx.bfloat16)
    q = mx.random.normal((1, heads, queries, dim), key=kq).astype(mx.bfloat16)
    offset = S - queries

    def select(index_keys):
        scores = msa.index_block_scores(q, index_keys, offset, block_size)
        return msa.select_blocks(scores, offset, block_size, topk, 1)[0]

    exact = select(keys)
    quant = select(QuantizedRows(mx.quantize(keys, group_size=group_size, bits=bits), group_size, bits))
    # same set? compare as per-(head, query) block sets
    n_blocks = -(-S // block_size)
    a = (exact[..., None] == mx.arange(n_blocks)).any(axis=-2)
    b = (quant[..., None] == mx.arange(n_blocks)).any(axis=-2)
    return (a & ~b).sum().item() / a.sum().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="16384,32768")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--bits", default="8,4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    for S in map(int, a.contexts.split(",")):
        for bits in map(int, a.bits.split(",")):
            rates = [selection_change(S, a.queries, bits, a.group_size, seed=s) for s in range(a.seeds)]
            rows.append({"context": S, "index_bits": bits, "changed": sum(rates) / len(rates)})
            print(f"device={mx.default_device()} context={S} index_bits={bits}: "
                  f"{100 * rows[-1]['changed']:.2f}% of selected blocks differ from the exact selection")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
