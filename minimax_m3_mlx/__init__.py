"""MiniMax-M3 on Apple Silicon with MLX."""

from .model.cache import SparseKVCache
from .weights.sanitize import CheckpointError, get_model_classes, load, load_model
from .config import ConfigError, ModelArgs
from .model.model import Model

__all__ = [
    "Model", "ModelArgs", "SparseKVCache", "load", "load_model", "get_model_classes",
    "CheckpointError", "ConfigError",
]
__version__ = "0.1.0"
