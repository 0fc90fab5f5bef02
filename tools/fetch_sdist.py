#!/usr/bin/env python3
"""Fetch and unpack the llama-cpp-python 0.3.36 sdist into .work/sdist/ (once; later runs reuse it).

Dev tests compare our exporter with the upstream converter and our flags with llama-server's argument table
from this sdist; they skip when it is absent. GGUF_MTP_SDIST may point at an unpacked copy instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".work" / "sdist"


def sdist_dir() -> Path:
    env = os.environ.get("GGUF_MTP_SDIST")
    return Path(env) if env else DEST / f"llama_cpp_python-{VERSION}"


def main() -> int:
    target = sdist_dir()
    if (target / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        print(f"sdist present: {target}")
        return 0
    DEST.mkdir(parents=True, exist_ok=True)
    archive = DEST / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(DEST)], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(DEST, filter="data")
    print(f"sdist unpacked: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
