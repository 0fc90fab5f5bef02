#!/usr/bin/env python3
"""Rewrite tests/golden/export-*.json from the current exporter, projector included (after an intended change).

    tools/regen_export_golden.py

Runs tests/test_export_golden.py with GGUF_MTP_REGEN_GOLDEN=1; review the diff before committing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = {**os.environ, "GGUF_MTP_REGEN_GOLDEN": "1"}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_export_golden.py")], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
