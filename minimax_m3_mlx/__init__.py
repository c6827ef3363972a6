"""MiniMax-M3 on Apple Silicon with MLX."""

from .config import ConfigError, ModelArgs
from .io import CheckpointError
from .loading import get_model_classes, load, load_model
from .model import Model
from .model.cache import SparseKVCache
from .serving.prompt_cache import TieredPromptCache

__all__ = [
    "Model", "ModelArgs", "SparseKVCache", "load", "load_model", "get_model_classes",
    "CheckpointError", "ConfigError", "TieredPromptCache",
]
__version__ = "0.1.0"
