#!/usr/bin/env python3
"""Build and install llama-cpp-python 0.3.36 with gguf-mtp's llama.cpp patches, before gguf-mtp is installed.

Same as ``gguf-mtp runtime build`` / ``gguf-mtp runtime info`` but needs only Python and a compiler toolchain
(CMake, a C++17 compiler; CUDA toolkit for --cuda): it loads gguf_mtp/runtime_build.py by path, so the README
set-up can build the patched runtime first and ``pip install -e .`` then accepts it (one compile, not two).

    python3 tools/build_runtime.py build [--cuda] [--cuda-arch 86] [--no-rpc] [--jobs N] [--force] [--no-install]
    python3 tools/build_runtime.py info [--json]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE = Path(__file__).resolve().parent.parent / "gguf_mtp" / "runtime_build.py"


def _load():
    spec = importlib.util.spec_from_file_location("gguf_mtp_runtime_build", MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(_load().main(sys.argv[1:]))
