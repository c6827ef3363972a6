"""Parallel inference planning: per-rank sizes and layouts (the model shards itself: model/)."""
