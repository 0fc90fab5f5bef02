"""Full-size skeleton GGUFs: a variant's real metadata and tensor layout, with a data region that is a sparse hole.

A skeleton lets llama.cpp (no_alloc loads, quantizer dry runs) see a 31B model's exact tensor list, shapes and
per-tensor quant types without downloading or storing any weights: the file's apparent size is the real one, its
disk usage is the header (a few MB, mostly the 262144-token vocabulary). Layouts come from ``layout.py`` (the
exporter's tables for the registry variant; llama.cpp's per-tensor mix for quantized ones). The planner does not
need the files; they are for llama.cpp, and for people who want to look at one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from ..fsutil import atomic_output, check_output_path
from ..keys import Keys
from .layout import Layout, layout_for
from .memory import pad

ALIGN = 32  # general.alignment default


def write_sparse(path: str | os.PathLike, layout: Layout) -> int:
    """Write the header and tensor infos, then extend the file to its full size without writing data.

    Returns the apparent file size. On file systems with sparse files, disk usage is the header only.
    """
    w = GGUFWriter(os.fspath(path), layout.arch)  # adds general.architecture itself
    for key, kv in layout.metadata.items():
        if key != Keys.General.ARCHITECTURE:
            w.add_key_value(key, kv.value, kv.type, kv.sub_type)
    for t in layout.tensors:
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(np.float32), t.n_bytes,
                          raw_dtype=GGMLQuantizationType[t.type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    fout.flush()
    data_start = pad(fout.tell(), ALIGN)
    total = data_start + sum(pad(t.n_bytes, ALIGN) for t in layout.tensors)
    fout.truncate(total)
    w.close()
    return total


def make_skeleton(variant: str, out: str | os.PathLike, quant: str | None = None, role: str = "target",
                  force: bool = False) -> tuple[Path, Layout, int]:
    """Write a sparse full-size skeleton GGUF; returns (path, layout, apparent size)."""
    check_output_path(out, force)
    layout = layout_for(variant, role, quant)
    with atomic_output(out, force) as tmp:
        size = write_sparse(tmp, layout)
    return Path(out), layout, size


def dry_run_types(path: str | os.PathLike, quant: str) -> dict[str, str]:
    """Per-tensor types llama.cpp's quantizer chooses for ``quant`` (gguf_mtp.quantize in dry-run mode: llama.cpp
    reads the header and no tensor data, so a sparse skeleton is enough). The yardstick ``quantmix`` is tested
    against."""
    from ..quantize import quantize

    result = quantize(path, None, quant, dry_run=True)
    return {t.name: t.dst_type.upper() for t in result.tensors}


__all__ = ["dry_run_types", "make_skeleton", "write_sparse"]
