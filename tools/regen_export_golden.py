#!/usr/bin/env python3
"""Rewrite tests/golden/export-*.json from the current exporter, projector included (after an intended change).

    tools/regen_export_golden.py                 # every golden file
    tools/regen_export_golden.py tiny-unified    # only the cases whose name contains one of the words

Runs tests/test_export_golden.py with GGUF_MTP_REGEN_GOLDEN=1 (words become pytest's ``-k`` expression, so other
golden files stay as they are); review the diff before committing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    env = {**os.environ, "GGUF_MTP_REGEN_GOLDEN": "1"}
    select = ["-k", " or ".join(argv)] if argv else []
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_export_golden.py"), *select], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
