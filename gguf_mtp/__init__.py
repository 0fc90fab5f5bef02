"""gguf-mtp: Gemma 4 + its MTP drafters as GGUF files, planned and run fast on one GPU."""

__version__ = "0.1.0"
