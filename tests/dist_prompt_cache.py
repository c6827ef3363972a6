"""One rank of tests/test_prompt_cache_cluster.py, under `mlx.launch --backend ring -n 2`.

    dist_prompt_cache.py CKPT MODE CACHE_DIR OUT.npz

Each rank loads its part (MODE: tensor or pipeline), prefills a prompt through the
prompt cache with a disk tier, then a new cache object (as after a restart) restores it
from disk; rank 1 first loses its second block, so the ranks must agree on one block.
Rank 0 writes the logits of the rest of the prompt and the restored length.
"""

from __future__ import annotations

import sys

sys.modules.setdefault("torch", None)  # not needed here (see dist_worker.py)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from minimax_m3_mlx.loading import load_model  # noqa: E402
from minimax_m3_mlx.loading.sharded import load_sharded  # noqa: E402
from minimax_m3_mlx.serving.prompt_cache import TieredPromptCache  # noqa: E402

TOKENS = [int(t) for t in np.random.default_rng(11).integers(0, 256, 900)]


def main(ckpt, mode, cache_dir, out):
    group = mx.distributed.init()
    model = load_sharded(ckpt, group, mode=mode)[0] if group.size() > 1 else load_model(ckpt)[0]
    pc = TieredPromptCache(directory=cache_dir)
    pc.attach(model, ckpt, group=group)
    cache, rest = pc.fetch_nearest_cache("m", TOKENS[:700])
    cache = model.make_cache()
    model(mx.array([TOKENS[:700]]), cache=cache)
    mx.eval([c.state for c in cache])
    pc.insert_cache("m", TOKENS[:700], cache)
    pc.flush()
    if group.rank() == 1:
        sorted(pc.store.dir.glob("0000001-*"))[0].unlink()
    again = TieredPromptCache(directory=cache_dir)
    again.attach(model, ckpt, group=group)
    cache, rest = again.fetch_nearest_cache("m", TOKENS)
    logits = model(mx.array([rest]), cache=cache)[0].astype(mx.float32)
    mx.eval(logits)
    if group.rank() == 0:
        np.savez(out, logits=np.array(logits), restored=len(TOKENS) - len(rest))


if __name__ == "__main__":
    main(*sys.argv[1:])
