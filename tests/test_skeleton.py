"""Skeleton GGUFs: real Gemma 4 layouts at full size, sparse on disk, loadable by llama.cpp without reading data."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from gguf_mtp import keys
from gguf_mtp.cli import main
from gguf_mtp.gguffile import read_gguf
from gguf_mtp.registry import get_variant
from gguf_mtp.skeleton import base_layout, layout_for, write_sparse


@pytest.mark.parametrize("variant", ["E2B", "E4B", "26B-A4B", "31B"])
def test_layout_matches_registry_parameter_count(variant: str) -> None:
    """The tensor list counts what the registry's parameter estimate counts (tied head once)."""
    v = get_variant(variant)
    layout = base_layout(v, "target")
    n = 0
    for t in layout.tensors:
        k = 1
        for d in t.shape:
            k *= d
        n += k
    est = v.params_estimate()
    assert n - est.target == 0 or abs(n / est.target - 1) < 0.001, (n, est.target)


def test_shared_kv_layers_have_no_kv_weights() -> None:
    layout = base_layout(get_variant("E2B"), "target")
    names = {t.name for t in layout.tensors}
    assert "blk.14.attn_k.weight" in names and "blk.15.attn_k.weight" not in names  # 35 layers, 20 shared
    layout = base_layout(get_variant("31B"), "target")
    names = {t.name for t in layout.tensors}
    assert "blk.4.attn_v.weight" in names and "blk.5.attn_v.weight" not in names  # k_eq_v on full layers


def test_skeleton_is_sparse_and_readable(tmp_path) -> None:
    out = tmp_path / "31B.gguf"
    size = write_sparse(out, base_layout(get_variant("31B"), "target"))
    st = os.stat(out)
    assert st.st_size == size > 57 * 2**30  # BF16 31B: full apparent size (30.7B weights x 2 bytes)
    assert st.st_blocks * 512 < 64 * 2**20  # header only on disk
    info = read_gguf(out, tokens=False)
    assert info.arch == keys.ARCH_TARGET
    assert len(info.token_bytes) == 262144
    assert info.metadata[keys.ROLE] == "target"


def test_quant_types_come_from_llamas_quantizer() -> None:
    """Q4_K_M's mix (llama.cpp's rules, not a table of ours): Q6_K for the tied embedding, Q4_K for most."""
    layout = layout_for("E2B", "target", "Q4_K_M")
    types = {t.name: t.type for t in layout.tensors}
    assert types["token_embd.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["per_layer_model_proj.weight"] == "BF16"  # never quantized by llama.cpp


def test_skeleton_cli(tmp_path) -> None:
    out = tmp_path / "d.gguf"
    runner = CliRunner()
    r = runner.invoke(main, ["skeleton", "E2B", "--role", "drafter", "--quant", "Q8_0", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = read_gguf(out, tokens=False)
    assert info.arch == keys.ARCH_DRAFTER
    assert {t.type for t in info.tensors} <= {"Q8_0", "F32"}
    r = runner.invoke(main, ["skeleton", "E2B", "--role", "drafter", "-o", str(out)])
    assert r.exit_code == 2 and "exists" in r.output  # never overwritten without --force
    r = runner.invoke(main, ["skeleton", "E9B", "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "unknown model variant" in r.output
    r = runner.invoke(main, ["skeleton", "E2B", "--quant", "Q9_X", "-o", str(tmp_path / "y.gguf")])
    assert r.exit_code == 2 and "Q9_X" in r.output
    assert not (tmp_path / "y.gguf").exists()
