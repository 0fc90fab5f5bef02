"""llama.cpp's own converter for dev tests: where the llama-cpp-python 0.3.36 sdist lives (``python3
tools/fetch_sdist.py`` puts it there), running its convert_hf_to_gguf.py, and reading GGUFs to compare with ours."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parent.parent

# All jobs in one Python process: the converter's imports (torch, transformers) cost more than the conversions.
DRIVER = """
import json, os, runpy, sys
script, args, jobs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.path.insert(0, os.path.dirname(script))  # where the script's own `conversion` package lives
for src, out, outtype in jobs:
    sys.argv = [script, src, *args, "--outfile", out, "--outtype", outtype]
    runpy.run_path(script, run_name="__main__")
"""


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


def converter_tree() -> Path:
    """The vendored llama.cpp tree, with transformers importable for its converter, or skip the calling test."""
    lcpp = llama_cpp_dir()
    pytest.importorskip("transformers")
    return lcpp


def run_converter(lcpp: Path, jobs: list[tuple[Path, Path, str]], *args: str) -> None:
    """convert_hf_to_gguf.py SRC ARGS --outfile OUT --outtype OUTTYPE for each (SRC, OUT, OUTTYPE) job."""
    env = {**os.environ, "PYTHONPATH": str(lcpp / "gguf-py")}
    plain = json.dumps([[str(src), str(out), outtype] for src, out, outtype in jobs])
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(lcpp / "convert_hf_to_gguf.py"), json.dumps(args),
                           plain], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"upstream converter failed: {proc.stderr[-3000:]}")


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(key -> (value, field types), tensor -> (type, shape, bytes)) of a GGUF, for comparing two files."""
    r = GGUFReader(path)
    kv = {k: (f.contents(), [int(t) for t in f.types]) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.asarray(t.data).tobytes())
               for t in r.tensors}
    return kv, tensors
