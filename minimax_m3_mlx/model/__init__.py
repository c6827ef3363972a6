"""The model core: layers, attention, MSA, MoE, caches, the vision tower and `Model`."""

from .model import Model

__all__ = ["Model"]
