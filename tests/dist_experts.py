"""One rank of tests/test_experts_cluster.py, under `mlx.launch --backend ring -n 2`.

    dist_experts.py SPEC.json

SPEC.json: {"folder", "out", "tokens": [[...], [...]], "chunks": [[a, b], ...], "batch": {...},
"cases": [{"name", "mode", "memory", "folder" (optional)}]}. Each case loads this rank's
part with --expert-memory `memory` (loading.sharded.load_sharded; None: resident), runs a
chunked prefill and token-by-token decode (also with a cache quantized to 8 bits), then a
batched decode, and writes this rank's logits (npz) and figures (json): what it streams,
what it read. A case the loader refuses writes its message instead.
"""

from __future__ import annotations

import sys

sys.modules.setdefault("torch", None)  # not needed here (see dist_worker.py)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from minimax_m3_mlx.loading.sharded import load_sharded  # noqa: E402
from minimax_m3_mlx.model.experts import ExpertMemoryError  # noqa: E402


def chunked(model, tokens, chunks, kv_bits=None):
    """Chunked prefill, then decode one token at a time to the end of `tokens` (a quantized cache: --kv-bits)."""
    cache = model.make_cache(kv_bits=kv_bits, kv_group_size=32)
    parts = [model(tokens[:, a:b], cache=cache) for a, b in chunks]
    parts += [model(tokens[:, i:i + 1], cache=cache) for i in range(chunks[-1][1], tokens.shape[1])]
    return np.array(mx.concatenate(parts, axis=1).astype(mx.float32))


def batched(model, prompts, nxt):
    """Rows prefilled alone, merged into batch caches, decoded together."""
    caches = []
    for p in prompts:
        cache = model.make_cache()
        model(mx.array([p]), cache=cache)
        caches.append(cache)
    batch = [type(c).merge([cs[j] for cs in caches]) for j, c in enumerate(caches[0])]
    return np.array(mx.concatenate([model(nxt[:, t:t + 1], cache=batch) for t in range(nxt.shape[1])], 1)
                    .astype(mx.float32))


def figures(model) -> dict:
    streamer, st = model.expert_streamer, model.load_stats
    layer = streamer.layers[0]
    s = streamer.stats
    return dict(
        n_slots=streamer.n_slots, slots=[lay.n_slots for lay in streamer.layers],
        tensors=sorted(t.name for lay in streamer.layers for t in lay.tensors.values()),
        parts={k: [p.axis, p.start, p.stop] for k, p in layer.parts.items()},
        slot_nbytes=layer.expert_nbytes, read_nbytes=layer.read_nbytes,
        hits=s.hits, misses=s.misses, rounds=s.rounds, stats_bytes=s.bytes_read, reads=s.reads,
        guessed_unused=s.guessed_unused,
        reader_bytes=streamer.reader.bytes_read, load_bytes=st.bytes_read, param_bytes=st.param_bytes,
        pool_bytes=st.expert_pool_bytes, plan_bytes=st.expected.weight_bytes, plan_experts=st.expected.expert_bytes,
    )


def run_case(group, spec, case) -> dict:
    try:
        folder = case.get("folder", spec["folder"])
        model, _ = load_sharded(folder, group, case["mode"], expert_memory=case["memory"])
    except ExpertMemoryError as e:
        return {"refused": str(e)}
    tokens = mx.array(spec["tokens"])
    out = {"chunked": chunked(model, tokens, spec["chunks"])}
    streamed = model.expert_streamer is not None  # else the resident part, to compare with
    after_chunked = figures(model) if streamed else {"misses": 0}
    out["kv8"] = chunked(model, tokens[:1], spec["chunks"], kv_bits=8)
    b = spec["batch"]
    out["batched"] = batched(model, b["prompts"], mx.array(b["next"]))
    np.savez(Path(spec["out"]) / f"{case['name']}-r{group.rank()}.npz", **out)
    if not streamed:
        return {}
    result = figures(model)
    result["chunked_misses"] = after_chunked["misses"]
    model.expert_streamer.close()
    return result


def main(spec_path):
    spec = json.loads(Path(spec_path).read_text())
    group = mx.distributed.init()
    results = {case["name"]: run_case(group, spec, case) for case in spec["cases"]}
    (Path(spec["out"]) / f"r{group.rank()}.json").write_text(json.dumps(results))
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))  # end together


if __name__ == "__main__":
    main(sys.argv[1])
