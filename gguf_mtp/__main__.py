"""``python -m gguf_mtp`` runs the CLI."""

from .cli import main

main(prog_name="gguf-mtp")
