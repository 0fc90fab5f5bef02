"""The projector export (``convert SRC --mmproj``): the vision tower's layout, values, types, pairing, refusals, and
evidence that llama.cpp's libmtmd loads it and computes transformers' image embeddings; the upstream cross-check
(convert_hf_to_gguf.py --mmproj, vision + audio, tiny-e and tiny-unified) is at the end. The audio part and the
12B's embedders: test_projector_audio.py. Measured numbers: docs/export.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fixtures.projector import PROJECTOR_FAMILIES
from test_export import copy_checkpoint, edit_json, gguf, no_leftovers, rewrite_weights
from test_unified_media import png, random_image
from upstream import converter_tree, read_gguf, run_converter

from gguf_mtp import pairing
from gguf_mtp.cli import main
from gguf_mtp.export.audio import AUDIO
from gguf_mtp.export.projector import GLOBAL, LAYER, NO_AUDIO
from gguf_mtp.export.safetensors import SafetensorsReader

FAMILY = "tiny-e"
VISION = {"hidden": 32, "layers": 2, "patch": 16, "pool": 3, "text_hidden": 64}
AUDIO_LAYERS = 2  # tiny-e's conformer


def source(export_src: Path) -> Path:
    return export_src / FAMILY / "target"


def hf_tensor(reader: SafetensorsReader, name: str) -> np.ndarray:
    return np.asarray(reader.raw(name), dtype=np.float32)


def table_names(global_rows, layer_rows, layers: int) -> list[tuple[str, str]]:
    """(HF, GGUF) names of every non-optional row of a part, all conditions on (tiny-e clips and standardizes)."""
    pairs = [("model." + r.hf, r.gguf) for r in global_rows]
    pairs += [("model." + r.hf.format(bid=b), r.gguf.format(bid=b)) for b in range(layers) for r in layer_rows
              if not r.optional]
    return pairs


def expected_names(layers: int = VISION["layers"]) -> list[tuple[str, str]]:
    """(HF, GGUF) names of every tensor tiny-e's vision tower implies."""
    return table_names(GLOBAL, LAYER, layers)


def audio_names() -> list[tuple[str, str]]:
    """(HF, GGUF) names of every tensor tiny-e's conformer implies (clipped linears on)."""
    return table_names(AUDIO.global_rows, AUDIO.layer_rows, AUDIO_LAYERS)


# --- layout and values -------------------------------------------------------------------------------------------
def test_keys_follow_clip_cpp(projectors):
    kv, tensors = gguf(projectors.get())
    assert kv["general.architecture"] == "clip" and kv["general.type"] == "mmproj"
    assert kv["clip.has_vision_encoder"] is True and kv["clip.vision.projector_type"] == "gemma4v"
    assert kv["clip.use_gelu"] is True  # gelu_pytorch_tanh; without it clip.cpp runs gelu_quick
    assert kv["clip.vision.projection_dim"] == VISION["text_hidden"]
    assert kv["clip.vision.embedding_length"] == VISION["hidden"]
    assert kv["clip.vision.block_count"] == VISION["layers"]
    assert kv["clip.vision.patch_size"] == VISION["patch"]
    assert kv["clip.vision.image_mean"] == [0.0, 0.0, 0.0] and kv["clip.vision.image_std"] == [1.0, 1.0, 1.0]
    assert "clip.vision.projector.scale_factor" not in kv  # pooling 3 is clip.cpp's default
    assert kv["gguf_mtp.role"] == "projector" and kv["gguf_mtp.source"] == "target"
    assert not any(k.startswith("gemma4.") or k.startswith("tokenizer.") for k in kv)
    assert sorted(tensors) == sorted(g for _, g in expected_names() + audio_names())


def test_every_tensor_equals_its_source(projectors, export_src):
    """Values as stored; the patch embedding permuted to (E, 3, p, p); 0-d clamp bounds as {1}."""
    _, tensors = gguf(projectors.get("f32"))
    reader = SafetensorsReader.from_directory(source(export_src))
    p = VISION["patch"]
    for hf, name in expected_names():
        want = hf_tensor(reader, hf)
        if name == "v.patch_embd.weight":
            want = want.reshape(-1, p, p, 3).transpose(0, 3, 1, 2)
        got = np.asarray(tensors[name].data).reshape(tuple(int(d) for d in reversed(tensors[name].shape)))
        assert got.shape == (want.shape or (1,)), name
        np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=name)
    assert tuple(int(d) for d in tensors["v.patch_embd.weight"].shape) == (p, p, 3, VISION["hidden"])
    assert tuple(int(d) for d in tensors["v.blk.0.attn_q.input_min"].shape) == (1,)
    reader.close()


@pytest.mark.parametrize("outtype, weights, patch", [("f32", "F32", "F32"), ("f16", "F16", "F16"),
                                                     ("bf16", "BF16", "F32"), ("q8_0", "Q8_0", "F32")])
def test_types_follow_upstream_rules(projectors, outtype, weights, patch):
    kv, tensors = gguf(projectors.get(outtype))
    types = {n: t.tensor_type.name for n, t in tensors.items()}
    assert types["v.patch_embd.weight"] == patch  # F16 only in an f16 file (MmprojModel.tensor_force_quant)
    assert types["v.position_embd.weight"] == "F32"
    assert types["mm.input_projection.weight"] == weights and types["v.blk.1.ffn_down.weight"] == weights
    for n, t in types.items():
        if n.endswith(("_norm.weight", "ln1.weight", "ln2.weight")) or not n.endswith(".weight"):
            assert t == "F32", n
    assert projectors.result(outtype).outtype == weights


def test_auto_keeps_the_checkpoint_dtype(projectors):
    assert projectors.result("auto").outtype == "F32"  # tiny-e is an f32 checkpoint


def test_output_does_not_depend_on_where_the_source_lives(projectors, export_src, tmp_path):
    from gguf_mtp.export.projector import convert_projector

    moved = copy_checkpoint(source(export_src), tmp_path / "elsewhere" / "target")
    convert_projector(moved, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == projectors.get().read_bytes()


# --- pairing -----------------------------------------------------------------------------------------------------
def test_projector_pairs_with_its_target(projectors, exports):
    target = pairing.facts_from_gguf(exports.get(FAMILY, "target"))
    projector = pairing.facts_from_gguf(projectors.get())
    assert projector.arch == "clip" and projector.hidden_size == target.hidden_size == VISION["text_hidden"]
    assert pairing.check_set(target, projector=projector) == []
    other = pairing.facts_from_gguf(exports.get("tiny-q", "target"))  # hidden 512
    assert [p.field for p in pairing.check_set(other, projector=projector)] == ["projector_dim"]


def test_target_option_pair_checks_before_writing(export_src, exports, tmp_path):
    out = tmp_path / "p.gguf"
    ok = CliRunner().invoke(main, ["convert", str(source(export_src)), "--mmproj", "-o", str(out),
                                   "--target", str(exports.get(FAMILY, "target"))])
    assert ok.exit_code == 0, ok.output
    assert "pair check passed" in ok.stderr
    bad = CliRunner().invoke(main, ["convert", str(source(export_src)), "--mmproj", "-o", str(tmp_path / "q.gguf"),
                                    "--target", str(exports.get("tiny-q", "target"))])
    assert bad.exit_code == 1
    assert "projector_dim" in bad.stderr and not (tmp_path / "q.gguf").exists() and no_leftovers(tmp_path)


# --- the CLI and its refusals --------------------------------------------------------------------------------------
def test_cli_writes_and_reports(export_src, tmp_path):
    out = tmp_path / "mmproj.gguf"
    res = CliRunner().invoke(main, ["convert", str(source(export_src)), "--mmproj", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["arch"] == "clip" and doc["role"] == "projector"
    assert doc["n_tensors"] == len(expected_names()) + len(audio_names())
    assert doc["features"] == ["vision", "audio", "clipped", "standardize"]
    again = CliRunner().invoke(main, ["convert", str(source(export_src)), "--mmproj", "-o", str(out)])
    assert again.exit_code == 2 and "exists (use --force" in again.stderr
    forced = CliRunner().invoke(main, ["convert", str(source(export_src)), "--mmproj", "-o", str(out), "--force"])
    assert forced.exit_code == 0 and forced.stdout.startswith(f"wrote {out}: clip projector")


def test_no_audio_writes_the_vision_part_alone(projectors, export_src, tmp_path):
    """--no-audio: the vision tensors and keys of the full file, no audio key or tensor, and a note."""
    out = tmp_path / "mmproj.gguf"
    res = CliRunner().invoke(main, ["convert", str(source(export_src)), "--mmproj", "--no-audio", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert f"note: left out {len(audio_names())} checkpoint tensor(s): {NO_AUDIO}" in res.stderr
    kv, tensors = gguf(out)
    full_kv, full = gguf(projectors.get())
    assert sorted(tensors) == sorted(g for _, g in expected_names())
    for name, t in tensors.items():
        assert np.asarray(t.data).tobytes() == np.asarray(full[name].data).tobytes(), name
    assert not any(k.startswith("clip.audio.") for k in kv) and "clip.has_audio_encoder" not in kv
    assert {k: v for k, v in kv.items() if k != "general.size_label"} == \
        {k: v for k, v in full_kv.items() if not k.startswith("clip.audio.") and k not in
         ("clip.has_audio_encoder", "general.size_label")}


def test_no_audio_needs_mmproj(export_src, tmp_path):
    res = CliRunner().invoke(main, ["convert", str(source(export_src)), "--no-audio", "-o", str(tmp_path / "t.gguf")])
    assert res.exit_code == 2 and "--no-audio belongs to --mmproj" in res.stderr


def test_vision_layer_scalars_are_kept_when_present(export_src, tmp_path):
    src = copy_checkpoint(source(export_src), tmp_path / "target")
    scales = {f"model.vision_tower.encoder.layers.{i}.layer_scalar": np.full(1, 0.5 + i, np.float32) for i in range(2)}
    rewrite_weights(src, lambda t, d: t.update(scales))
    res = CliRunner().invoke(main, ["convert", str(src), "--mmproj", "-o", str(tmp_path / "p.gguf")])
    assert res.exit_code == 0, res.output
    _, tensors = gguf(tmp_path / "p.gguf")
    for i in range(2):
        t = tensors[f"v.blk.{i}.out_scale.weight"]
        assert t.tensor_type.name == "F32" and [int(d) for d in t.shape] == [1]
        assert float(np.asarray(t.data)[0]) == 0.5 + i


PROCESSOR = {  # name: (processor_config.json's image_processor, or None for no file) -> (mean, std)
    "not normalized": ({"do_normalize": False, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, [0.0] * 3, [1.0] * 3),
    "normalized": ({"do_normalize": True, "image_mean": [0.5, 0.4, 0.3], "image_std": 0.5}, [0.5, 0.4, 0.3],
                   [0.5] * 3),
    "no processor config": (None, [0.0] * 3, [1.0] * 3),
}


@pytest.mark.parametrize("case", list(PROCESSOR))
def test_image_mean_std_are_what_transformers_applies(case, export_src, tmp_path):
    from gguf_mtp.export.projector import describe_projector

    processor, mean, std = PROCESSOR[case]
    src = copy_checkpoint(source(export_src), tmp_path / "target")
    if processor is None:
        (src / "processor_config.json").unlink()
    else:
        edit_json(src / "processor_config.json", lambda c: c["image_processor"].update(processor))
    meta = describe_projector(src).metadata.plain()
    assert (meta["clip.vision.image_mean"], meta["clip.vision.image_std"]) == (mean, std)


def test_geometry_keys_only_off_clip_cpp_defaults(export_src, tmp_path):
    from gguf_mtp.export.projector import describe_projector

    src = copy_checkpoint(source(export_src), tmp_path / "target")
    edit_json(src / "config.json", lambda c: c["vision_config"].update(num_key_value_heads=1, head_dim=8,
                                                                       pooling_kernel_size=2))
    meta = describe_projector(src).metadata.plain()
    assert meta["clip.vision.attention.head_count_kv"] == 1 and meta["clip.vision.attention.head_dim"] == 8
    assert meta["clip.vision.projector.scale_factor"] == 2


def _vision(edit):
    return lambda c: edit(c["vision_config"])


BAD = {
    # name: (family, role, edit config.json (or (other JSON file, edit)), edit weights, extra args, message)
    "text-only checkpoint": ("tiny-dense", "target", None, None, [], "text-only Gemma 4 checkpoint .* no vision or audio tower"),
    "drafter": ("tiny-e", "drafter", None, None, [], "this is an MTP drafter, with no vision or audio tower"),
    "no vision tower": ("tiny-moe", "target", None, None, [], r"no vision tower \(vision_config is null\)"),
    "audio only": ("tiny-e", "target", lambda c: c.update(vision_config=None), None, [],
                   "no vision tower .* an audio-only projector is not supported"),
    "activation": ("tiny-e", "target", _vision(lambda v: v.update(hidden_activation="silu")), None, [],
                   "hidden_activation: llama.cpp's gemma4v projector runs only gelu_pytorch_tanh, got 'silu'"),
    "rope theta": ("tiny-e", "target", _vision(lambda v: v.update(rope_parameters={"rope_type": "axial",
                                                                                   "rope_theta": 10.0})),
                   None, [], "rope_theta: llama.cpp's gemma4v projector runs only 100.0"),
    "shape disagrees": ("tiny-e", "target", _vision(lambda v: v.update(intermediate_size=48)), None, [],
                        r"mlp.gate_proj.linear.weight has shape \[64, 32\], but vision_config implies \[48, 32\]"),
    "missing tensor": ("tiny-e", "target", None, lambda t, d: t.pop("model.vision_tower.std_scale"), [],
                       "model.vision_tower.std_scale is missing"),
    "unexpected vision tensor": ("tiny-e", "target", None,
                                 lambda t, d: t.update({"model.vision_tower.encoder.layers.0.mystery":
                                                        np.zeros(4, np.float32)}), [],
                                 "unexpected tensor model.vision_tower.encoder.layers.0.mystery"),
    "clamps missing": ("tiny-e", "target", None,
                       lambda t, d: t.pop("model.vision_tower.encoder.layers.1.mlp.up_proj.output_max"), [],
                       "up_proj.output_max is missing"),
    "centroids": ("tiny-e", "target", None, None, ["--centroids"], "--centroids belongs to drafters"),
    "pixel scale": ("tiny-e", "target", ("processor_config.json",
                                         lambda c: c["image_processor"].update(rescale_factor=1 / 127.5)),
                    None, [], "expected do_rescale with rescale_factor 1/255"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_no_file(case, export_src, tmp_path):
    family, role, cfg_edit, weight_edit, extra, message = BAD[case]
    src = copy_checkpoint(export_src / family / role, tmp_path / "src")
    if cfg_edit is not None:
        file, edit = cfg_edit if isinstance(cfg_edit, tuple) else ("config.json", cfg_edit)
        edit_json(src / file, edit)
    if weight_edit is not None:
        rewrite_weights(src, weight_edit)
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(main, ["convert", str(src), "--mmproj", "-o", str(out), *extra])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists() and no_leftovers(tmp_path)


# --- llama.cpp (libmtmd) computes transformers' image embeddings ------------------------------------------------------
IMAGES = ((480, 336), (336, 480), (576, 576))  # (width, height): multiples of patch * pooling = 48, >= 70 tokens


@pytest.fixture(scope="module")
def tiny_e(engines):
    """tiny-e's target (the exporter's default export) as a runtime engine, without its drafter."""
    return engines.get(FAMILY, drafter=False)


def media_embeddings(projector, media) -> np.ndarray:
    """``projector.embeddings`` of one image or clip, freed after."""
    try:
        return projector.embeddings(media)
    finally:
        media.close()


def mtmd_image_embeddings(engine, mmproj: Path, image: np.ndarray) -> np.ndarray:
    """The image's embeddings from libmtmd through the runtime's Projector (``mmproj`` loaded for ``engine``).

    The image goes in as a PNG (lossless), and sides that are multiples of patch * pooling (and >= 70 soft tokens)
    are not resized by the gemma4v preprocessor, so both sides see the same pixels.
    """
    from gguf_mtp.runtime.multimodal import Projector

    with Projector.load(mmproj, engine) as proj:
        return media_embeddings(proj, proj.image_from_bytes(png(image), "noise.png"))


def transformers_image_embeddings(model, image: np.ndarray, patch: int) -> np.ndarray:
    """get_image_features (vision tower + embed_vision) on the image's own pixels, patchified (rescaled by 1/255,
    no resize). Gemma4ImageProcessor hands over the same for 480x336 and 336x480 (exactly its max_soft_tokens = 70
    budget on the tiny checkpoints); 576x576 (144 soft tokens) it would first shrink to 384x384, so that size
    compares the two towers on the same pixels, not on what the processor would produce."""
    import torch

    from gguf_mtp.transformers_reference import image_inputs

    h, w, _ = image.shape
    pixels = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    patches, positions, _ = image_inputs({"patch_size": patch, "pooling_kernel_size": VISION["pool"]}, h, w,
                                         image=pixels)
    with torch.no_grad():
        out = model.model.get_image_features(patches, positions)
    return out.pooler_output[0].float().numpy()


@pytest.fixture(scope="module")
def hf_target(export_src):
    reference = pytest.importorskip("gguf_mtp.transformers_reference",
                                    reason="needs the dev extra (torch, transformers)")
    return reference.load_model(source(export_src))


@pytest.mark.reference
@pytest.mark.parametrize("outtype, max_rel", [("f32", 0.005), ("f16", 0.01)])
@pytest.mark.parametrize("size", IMAGES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llama_cpp_image_embeddings_match_transformers(projectors, tiny_e, hf_target, size, outtype, max_rel):
    image = random_image(*size)
    got = mtmd_image_embeddings(tiny_e, projectors.get(outtype), image)
    want = transformers_image_embeddings(hf_target, image, VISION["patch"])
    assert got.shape == want.shape == (size[0] * size[1] // (48 * 48), VISION["text_hidden"])
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{size[0]}x{size[1]} {outtype}: rel L2 {rel:.3%}, max-abs {np.abs(got - want).max():.4f} "
          f"of {np.abs(want).max():.2f}")
    assert rel < max_rel


# --- the upstream converter (convert_hf_to_gguf.py --mmproj) ---------------------------------------------------------
UPSTREAM_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Ours and upstream's differ only here (docs/export.md says why): keys, and tensors equal to within one ulp.
ALLOWED_KEY_DIFFERENCES = {"general.name", "clip.use_gelu"}
ULP_TENSORS = re.compile(r"a\.blk\.\d+\.per_dim_scale\.weight")  # softplus: ours rounded once from float64


@pytest.fixture(scope="module")
def upstream_projectors(export_src, tmp_path_factory) -> dict[tuple[str, str], Path]:
    lcpp = converter_tree()
    work = tmp_path_factory.mktemp("upstream-mmproj")
    out = {(f, t): work / f"{f}-mmproj-{t}.gguf" for f in PROJECTOR_FAMILIES for t in UPSTREAM_OUTTYPES}
    run_converter(lcpp, [(export_src / f / "target", p, t) for (f, t), p in out.items()], "--mmproj")
    return out


def max_ulp(a: tuple, b: tuple) -> int:
    """The largest distance in float32 ulps between two F32 tensors as read_gguf returns them."""
    x, y = (np.frombuffer(t[2], np.float32).view(np.int32).astype(np.int64) for t in (a, b))
    return int(np.abs(x - y).max())


@pytest.mark.upstream
@pytest.mark.parametrize("outtype", UPSTREAM_OUTTYPES)
@pytest.mark.parametrize("family", PROJECTOR_FAMILIES)
def test_projector_equals_upstream(projectors, upstream_projectors, family, outtype):
    ours_kv, ours_t = read_gguf(projectors.get(outtype, family))
    up_kv, up_t = read_gguf(upstream_projectors[(family, outtype)])
    assert ours_t.keys() == up_t.keys()
    assert any(n.startswith("a.") or n.startswith("mm.a.") for n in ours_t)  # the audio part is compared too
    for name in ours_t:
        if ULP_TENSORS.fullmatch(name):
            assert ours_t[name][:2] == up_t[name][:2] == ("F32", ours_t[name][1])
            assert max_ulp(ours_t[name], up_t[name]) <= 1, name
            continue
        assert ours_t[name] == up_t[name], name  # name, type, shape, bytes
    differing = {k for k in ours_kv.keys() | up_kv.keys() if ours_kv.get(k) != up_kv.get(k)}
    allowed = ALLOWED_KEY_DIFFERENCES | {k for k in ours_kv if k.startswith("gguf_mtp.")}
    assert differing <= allowed, differing - allowed
    assert ours_kv["general.name"][0] == "target" and up_kv["general.name"][0] == "Target"
    assert "clip.use_gelu" not in up_kv


@pytest.mark.upstream
@pytest.mark.reference
def test_use_gelu_is_why_ours_is_closer_to_transformers(projectors, upstream_projectors, tiny_e, hf_target):
    """Upstream's file leaves clip.use_gelu out, so clip.cpp runs gelu_quick instead of gelu_pytorch_tanh."""
    image = random_image(*IMAGES[0])
    want = transformers_image_embeddings(hf_target, image, VISION["patch"])
    rel = {}
    for who, path in (("ours", projectors.get("f32")), ("upstream", upstream_projectors[(FAMILY, "f32")])):
        got = mtmd_image_embeddings(tiny_e, path, image)
        rel[who] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"rel L2 vs transformers: ours {rel['ours']:.3%}, upstream {rel['upstream']:.3%}")
    assert rel["ours"] * 4 < rel["upstream"]
