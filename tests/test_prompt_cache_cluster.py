"""The prompt cache's disk tier under `mlx.launch` (2 ranks on localhost): each rank keeps
its own blocks, the ranks agree on the prefix restored (one rank lost a block), and the
logits after the restore equal one process's over the same prefix."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from minimax_m3_mlx import load_model, synthetic
from ring import launch_args

WORKER = Path(__file__).parent / "dist_prompt_cache.py"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_ranks_restore_their_own_blocks_alike(tmp_path_factory, default_case, mode):
    from dist_prompt_cache import TOKENS

    ckpt = tmp_path_factory.mktemp(f"pc_cluster_{mode}")
    synthetic.write_checkpoint(ckpt, default_case.config, default_case.weights, "original")
    out, cache_dir = ckpt.parent / f"{mode}.npz", ckpt.parent / f"{mode}-cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*launch_args(2), str(WORKER), str(ckpt), mode, str(cache_dir), str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    got = np.load(out)
    assert int(got["restored"]) == 256  # rank 1 lacks block 2: both ranks restore block 1 only
    assert len({p.name for p in cache_dir.iterdir()}) == 2  # one folder per rank
    model = load_model(ckpt)[0]
    cache = model.make_cache()
    model(mx.array([TOKENS[:256]]), cache=cache)
    want = np.array(model(mx.array([TOKENS[256:]]), cache=cache)[0].astype(mx.float32))
    assert np.abs(got["logits"] - want).max() / np.abs(want).max() < 1e-4
