"""Serving: generation on mlx-lm's loop (generate, chat), mlx-lm's OpenAI-compatible server,
and image/video inputs through transformers' processors (multimodal)."""
