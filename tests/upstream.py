"""Where the llama-cpp-python 0.3.36 sdist lives for dev tests (``python3 tools/fetch_sdist.py`` puts it there)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def sdist_dir() -> Path | None:
    """The unpacked sdist (GGUF_MTP_SDIST, else .work/sdist/), or None when absent."""
    env = os.environ.get("GGUF_MTP_SDIST")
    d = Path(env) if env else ROOT / ".work" / "sdist" / "llama_cpp_python-0.3.36"
    return d if (d / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file() else None


def llama_cpp_dir() -> Path:
    """The vendored llama.cpp tree, or skip the calling test."""
    d = sdist_dir()
    if d is None:
        pytest.skip("llama-cpp-python 0.3.36 sdist absent (python3 tools/fetch_sdist.py)")
    return d / "vendor" / "llama.cpp"
