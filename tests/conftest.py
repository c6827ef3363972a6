"""Shared fixtures: tiny checkpoints in every layout and the transformers reference on them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from minimax_m3_mlx import synthetic  # noqa: E402

SEQ = 70  # >> block_size (4) x topk (3): selection drops blocks; 70 % 4 = 2 leaves a ragged tail block


@pytest.fixture(scope="session")
def tokens():
    return np.random.default_rng(0).integers(0, 256, (2, SEQ))


class Case:
    """A tiny config, its random weights, and the reference built on them (made once)."""

    def __init__(self, overrides=None, seed=1):
        from reference import build_reference

        self.config = synthetic.tiny_config(overrides)
        self.weights = synthetic.random_weights(self.config, seed=seed)
        self.reference, self.vision = build_reference(self.config, self.weights)
        self._ref_cache = {}

    def write(self, path, layout="original", **kw):
        """Write the checkpoint; returns the reference model for its (dequantised) weights."""
        from reference import build_reference

        ref_weights = synthetic.write_checkpoint(path, self.config, {**self.weights, **self.vision}, layout, **kw)
        ref_weights = {k: v for k, v in ref_weights.items() if k in self.weights}
        if all(np.array_equal(ref_weights[k], self.weights[k]) for k in self.weights):
            return self.reference
        return build_reference(self.config, ref_weights)[0]


@pytest.fixture(scope="session")
def default_case():
    return Case()
