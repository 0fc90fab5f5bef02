"""The projector's audio part (tiny-e's conformer, gemma4a) and the 12B's embedders (tiny-unified, gemma4uv +
gemma4ua): values with upstream's transforms, types, the planner's tensor list, refusals, and libmtmd loading each
file with the media it should support. The key-for-key / tensor-for-tensor upstream comparison of both families is
test_export_projector.py::test_projector_equals_upstream.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.unified import UNIFIED
from gguf import GGMLQuantizationType as Q
from test_export import copy_checkpoint, edit_json, gguf, no_leftovers, rewrite_weights
from test_export_projector import audio_names, media_embeddings

from gguf_mtp.cli import main
from gguf_mtp.export.projector import describe_projector, expected_projector_tensors, ProjectorHparams
from gguf_mtp.export.safetensors import SafetensorsReader

EMBEDDER = {"width": 48, "patch": 16, "pool": 3, "positions": 1120, "frame": 640, "text_hidden": 64}


def target(export_src: Path, family: str) -> Path:
    return export_src / family / "target"


def data(t) -> np.ndarray:
    """A GGUF tensor's values in numpy order (F32/F16 files only)."""
    return np.asarray(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def softplus(x: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(x.astype(np.float64)))


# --- tiny-e: the conformer ----------------------------------------------------------------------------------------
def test_audio_keys_follow_clip_cpp(projectors):
    kv, _ = gguf(projectors.get())
    assert kv["clip.has_audio_encoder"] is True and kv["clip.audio.projector_type"] == "gemma4a"
    assert kv["clip.audio.projection_dim"] == 64 and kv["clip.audio.embedding_length"] == 32
    assert kv["clip.audio.feed_forward_length"] == 128 and kv["clip.audio.block_count"] == 2
    assert kv["clip.audio.attention.head_count"] == 2 and kv["clip.audio.num_mel_bins"] == 128
    assert kv["clip.vision.projector_type"] == "gemma4v"  # one file, both parts


def test_every_audio_tensor_equals_its_source_transformed(projectors, export_src):
    """As stored, except: softplus of the per-dimension query scale, the depthwise kernel's unit axis dropped,
    0-d clamp bounds as {1}."""
    _, tensors = gguf(projectors.get("f32"))
    reader = SafetensorsReader.from_directory(target(export_src, "tiny-e"))
    for hf, name in audio_names():
        want = np.asarray(reader.raw(hf), dtype=np.float32)
        if name.endswith("per_dim_scale.weight"):
            got = data(tensors[name])
            np.testing.assert_allclose(got, softplus(want), rtol=1e-7, err_msg=name)
            assert not np.allclose(got, want)
            continue
        if name.endswith("conv_dw.weight"):
            assert want.shape[1] == 1
            want = want[:, 0, :]
        got = data(tensors[name])
        np.testing.assert_array_equal(got, want.reshape(got.shape) if want.shape == () else want, err_msg=name)
    reader.close()


@pytest.mark.parametrize("outtype, weights, small", [("f32", "F32", "F32"), ("f16", "F16", "F16"),
                                                     ("bf16", "BF16", "BF16"), ("q8_0", "Q8_0", "F16")])
def test_audio_types_follow_upstream_rules(projectors, outtype, weights, small):
    types = {n: t.tensor_type.name for n, t in gguf(projectors.get(outtype))[1].items()}
    for name in ("a.conv1d.0.weight", "a.conv1d.1.weight", "a.input_projection.weight", "a.blk.0.conv_dw.weight",
                 "a.blk.1.per_dim_scale.weight", "a.pre_encode.out.bias", "a.blk.0.attn_q.input_max"):
        assert types[name] == "F32", name  # convolutions forced, 1-D and clamp tensors always
    assert types["a.blk.0.attn_q.weight"] == types["a.blk.1.ffn_down.weight"] == weights  # rows of 32 and 128
    assert types["mm.a.input_projection.weight"] == small  # rows of 48: no Q8_0 block fits, F16 as upstream


# --- tiny-unified: the 12B's embedders ------------------------------------------------------------------------------
def test_unified_keys_follow_clip_cpp(projectors):
    kv, tensors = gguf(projectors.get(family=UNIFIED))
    assert kv["clip.vision.projector_type"] == "gemma4uv" and kv["clip.audio.projector_type"] == "gemma4ua"
    assert kv["clip.vision.embedding_length"] == EMBEDDER["width"] and kv["clip.vision.patch_size"] == 16
    assert kv["clip.audio.embedding_length"] == EMBEDDER["frame"]
    for part in ("vision", "audio"):
        assert kv[f"clip.{part}.projection_dim"] == EMBEDDER["text_hidden"]
        assert kv[f"clip.{part}.block_count"] == kv[f"clip.{part}.feed_forward_length"] == 0
    assert "clip.use_gelu" not in kv and "clip.vision.projector.scale_factor" not in kv
    assert sorted(tensors) == sorted([
        "v.patch_norm.1.weight", "v.patch_norm.1.bias", "v.patch_embd.weight", "v.patch_embd.bias",
        "v.patch_norm.2.weight", "v.patch_norm.2.bias", "v.position_embd.weight", "v.patch_norm.3.weight",
        "v.patch_norm.3.bias", "mm.input_projection.weight", "mm.a.input_projection.weight"])


def test_unified_tensors_are_upstreams_permutations(projectors, export_src):
    """Per-pixel weights reordered from (row, col, channel) to clip.cpp's im2col order (channel, row, col); the
    position table axis-first; everything else as stored."""
    _, t = gguf(projectors.get("f32", UNIFIED))
    r = SafetensorsReader.from_directory(target(export_src, UNIFIED))
    hf = lambda n: np.asarray(r.raw("model." + n), dtype=np.float32)  # noqa: E731
    p = EMBEDDER["patch"] * EMBEDDER["pool"]
    i = np.arange(3 * p * p)
    ch, row, col = i // (p * p), (i % (p * p)) // p, i % p
    hwc = row * p * 3 + col * 3 + ch  # the checkpoint's index of the im2col position i
    np.testing.assert_array_equal(data(t["v.patch_embd.weight"]), hf("vision_embedder.patch_dense.weight")[:, hwc])
    for kind in ("weight", "bias"):
        np.testing.assert_array_equal(data(t[f"v.patch_norm.1.{kind}"]), hf(f"vision_embedder.patch_ln1.{kind}")[hwc])
        np.testing.assert_array_equal(data(t[f"v.patch_norm.3.{kind}"]), hf(f"vision_embedder.pos_norm.{kind}"))
    pos = hf("vision_embedder.pos_embedding")
    assert pos.shape == (EMBEDDER["positions"], 2, EMBEDDER["width"])
    np.testing.assert_array_equal(data(t["v.position_embd.weight"]), pos.transpose(1, 0, 2))
    np.testing.assert_array_equal(data(t["mm.a.input_projection.weight"]),
                                  hf("embed_audio.embedding_projection.weight"))
    r.close()


@pytest.mark.parametrize("outtype, patch, proj, audio", [("f32", "F32", "F32", "F32"), ("f16", "F16", "F16", "F16"),
                                                         ("bf16", "F32", "BF16", "BF16"),
                                                         ("q8_0", "F32", "F16", "Q8_0")])
def test_unified_types_follow_upstream_rules(projectors, outtype, patch, proj, audio):
    types = {n: t.tensor_type.name for n, t in gguf(projectors.get(outtype, UNIFIED))[1].items()}
    assert types["v.patch_embd.weight"] == patch and types["v.position_embd.weight"] == "F32"
    assert types["mm.input_projection.weight"] == proj  # rows of 48
    assert types["mm.a.input_projection.weight"] == audio  # rows of 640
    assert all(types[n] == "F32" for n in types if ".patch_norm." in n or n.endswith(".bias"))


# --- the planner's tensor list is what a conversion writes ------------------------------------------------------
@pytest.mark.parametrize("audio", [True, False], ids=["audio", "no-audio"])
@pytest.mark.parametrize("family", ["tiny-e", UNIFIED])
def test_expected_tensors_are_what_is_written(projectors, export_src, family, audio):
    hp = describe_projector(target(export_src, family), audio).hparams
    want = [(e.name, tuple(reversed(e.shape)), e.type.name) for e in expected_projector_tensors(hp, Q.F16)
            if not (e.row.optional and e.name.endswith("out_scale.weight"))]  # tiny-e has no layer scalars
    _, tensors = gguf(projectors.get("f16", family, audio))
    got = [(n, tuple(int(d) for d in t.shape), t.tensor_type.name) for n, t in tensors.items()]
    assert got == want
    audio_only = expected_projector_tensors(ProjectorHparams(audio=hp.audio), Q.F16) if audio else []
    assert {e.name for e in audio_only} == {n for n in tensors if n.startswith(("a.", "mm.a."))}


# --- refusals ----------------------------------------------------------------------------------------------------------
def _audio(edit):
    return lambda c: edit(c["audio_config"])


def _vision(edit):
    return lambda c: edit(c["vision_config"])


BAD = {
    # name: (family, edit config.json, edit weights, message)
    "chunk size": ("tiny-e", _audio(lambda a: a.update(attention_chunk_size=8)), None,
                   "attention_chunk_size: llama.cpp's gemma4a audio encoder runs only 12, got 8"),
    "activation": ("tiny-e", _audio(lambda a: a.update(hidden_act="gelu")), None,
                   "hidden_act: llama.cpp's gemma4a audio encoder runs only 'silu'"),
    "channels": ("tiny-e", _audio(lambda a: a.update(subsampling_conv_channels=[128])), None,
                 "subsampling_conv_channels: expected two positive integers"),
    "mel bins": ("tiny-e", _audio(lambda a: a.update(input_feat_size=64)), None,
                 r"input_proj_linear.weight has shape \[32, 256\], but audio_config implies \[32, 128\]"),
    "audio weights without audio_config": ("tiny-e", lambda c: c.update(audio_config=None), None,
                                           "unexpected tensor model.audio_tower."),
    "unexpected audio tensor": ("tiny-e", None, lambda t, d: t.update({"model.audio_tower.layers.0.mystery":
                                                                       np.zeros(4, np.float32)}),
                                "unexpected tensor model.audio_tower.layers.0.mystery"),
    "missing audio tensor": ("tiny-e", None,
                             lambda t, d: t.pop("model.audio_tower.layers.1.self_attn.per_dim_scale"),
                             "model.audio_tower.layers.1.self_attn.per_dim_scale is missing"),
    "frame size": (UNIFIED, _audio(lambda a: a.update(audio_embed_dim=320)), None,
                   "audio_embed_dim: llama.cpp's gemma4ua embedder reads 640-sample frames only, got 320"),
    "projection width": (UNIFIED, _vision(lambda v: v.update(output_proj_dims=64)), None,
                         r"output_proj_dims \(64\) must equal mm_embed_dim \(48\)"),
    "pooling disagrees": (UNIFIED, _vision(lambda v: v.update(pooling_kernel_size=2)), None,
                          r"patch_ln1.weight has shape \[6912\], but vision_config implies \[3072\]"),
    "conformer in a unified checkpoint": (UNIFIED, None, lambda t, d: t.update(
        {"model.audio_tower.output_proj.bias": np.zeros(4, np.float32)}), "unexpected tensor model.audio_tower."),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_audio_or_embedder_is_one_error_line_and_no_file(case, export_src, tmp_path):
    family, cfg_edit, weight_edit, message = BAD[case]
    src = copy_checkpoint(target(export_src, family), tmp_path / "src")
    if cfg_edit is not None:
        edit_json(src / "config.json", cfg_edit)
    if weight_edit is not None:
        rewrite_weights(src, weight_edit)
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "--mmproj", "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and no_leftovers(tmp_path)


def test_no_audio_skips_a_bad_audio_config(export_src, tmp_path):
    """--no-audio does not read the audio section: a conformer llama.cpp cannot run still gets its vision file."""
    src = copy_checkpoint(target(export_src, "tiny-e"), tmp_path / "src")
    edit_json(src / "config.json", _audio(lambda a: a.update(attention_chunk_size=8)))
    res = CliRunner().invoke(main, ["convert", str(src), "--mmproj", "--no-audio", "-o", str(tmp_path / "v.gguf")])
    assert res.exit_code == 0, res.output


# --- libmtmd loads each file and embeds audio ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_engine(engines, unified_engines):
    """family -> its target (the exporter's default export) as a runtime engine, without its drafter."""
    pools = {"tiny-e": engines, UNIFIED: unified_engines}
    return lambda family: pools[family].get(family, drafter=False)


def wav(pcm: np.ndarray, rate: int = 16000) -> bytes:
    """``pcm`` as a float WAV at the projectors' own rate: read back sample for sample, nothing resampled."""
    sf = pytest.importorskip("soundfile")
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def one_second(seed: int = 0) -> np.ndarray:
    t = np.arange(16000) / 16000
    noise = np.random.default_rng(seed).standard_normal(16000) * 0.05
    return (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)


@pytest.mark.parametrize("audio", [True, False], ids=["audio", "no-audio"])
@pytest.mark.parametrize("family", ["tiny-e", UNIFIED])
def test_libmtmd_loads_the_projector_with_the_media_it_holds(projectors, target_engine, family, audio):
    from gguf_mtp.runtime.multimodal import Projector

    with Projector.load(projectors.get("f32", family, audio), target_engine(family)) as proj:
        assert proj.vision and proj.audio == audio
        if not audio:
            return
        assert proj.sample_rate == 16000
        embd = media_embeddings(proj, proj.audio_from_bytes(wav(one_second()), "one-second.wav"))
    # one second: 25 soft tokens either way (conformer: 10 ms mel hops / 4; embedder: 640-sample frames)
    assert embd.shape == (25, EMBEDDER["text_hidden"]) and np.isfinite(embd).all() and np.abs(embd).max() > 0
