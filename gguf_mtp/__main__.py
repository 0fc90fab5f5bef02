"""``python -m gguf_mtp``: the same command line as the ``gguf-mtp`` entry point (handy in subprocess tests)."""

from .cli import main

main(prog_name="gguf-mtp")
