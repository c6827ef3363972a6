"""Weights and layouts: checkpoint tensor names -> this package's, expert stacking, fused-tensor
splits, FP8/MXFP8 (quant.py), vision names, and how tensors split across ranks (sharding.py).
Imports no Model: the loaders and Model.sanitize call into it."""
