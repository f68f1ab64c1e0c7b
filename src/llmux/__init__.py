"""llmux: many models, one GPU, one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
