#!/usr/bin/env python3
"""Build the tiny Gemma 4 test checkpoints (target + MTP drafter per family) under OUTDIR.

    tools/make_tiny_models.py OUTDIR [--seed N] [--family NAME ...] [--force]

Writes OUTDIR/<family>/{target,drafter} in the Hugging Face layout; families: tiny-e, tiny-dense,
tiny-moe, tiny-q, tiny-unified (all by default; repeat --family or separate names with commas). An existing family
directory is refused unless --force. Bad input prints one ``error:`` line and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    from gguf_mtp.errors import GgufMtpError
    from gguf_mtp.tiny import FAMILIES, make_tiny_models
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gguf_mtp.errors import GgufMtpError
    from gguf_mtp.tiny import FAMILIES, make_tiny_models


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.split("\n\n")[0], epilog=f"families: {', '.join(FAMILIES)}")
    parser.add_argument("outdir", metavar="OUTDIR", help="directory to write the families into (created)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    parser.add_argument("--family", action="append", default=None, metavar="NAME",
                        help="build only this family (repeatable, or comma-separated)")
    parser.add_argument("--force", action="store_true", help="replace existing family directories")
    args = parser.parse_args(argv)
    families = None
    if args.family:
        families = [name.strip() for item in args.family for name in item.split(",") if name.strip()]
    try:
        built = make_tiny_models(args.outdir, seed=args.seed, families=families, force=args.force)
    except GgufMtpError as e:
        if os.environ.get("GGUF_MTP_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if os.environ.get("GGUF_MTP_DEBUG"):
            raise
        print(f"error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    for name, path in built.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
