"""``check``: every pairing field refused on a deliberately mismatched pair, through the library and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fixtures.quant import MISMATCHES, write_role
from gguf_mtp import pairing
from gguf_mtp.check import check_files
from gguf_mtp.cli import main

def _set(tmp_path, changed_role=None, kv=None, extra=None):
    paths = {}
    for role in ("target", "drafter", "projector"):
        args = (kv or {}, extra or {}) if role == changed_role else ({}, {})
        paths[role] = write_role(tmp_path / f"{role}.gguf", role, kv=args[0], **args[1])
    return paths


def test_fields_table_covers_every_pairing_field():
    assert set(MISMATCHES) == set(pairing.FIELDS)


def test_compatible_set(tmp_path):
    p = _set(tmp_path)
    report = check_files(p["target"], p["drafter"], p["projector"], runtime_centroids=False)
    assert report.compatible and report.problems == []
    r = CliRunner().invoke(main, ["check", str(p["target"]), str(p["drafter"]), "--mmproj", str(p["projector"])])
    assert r.exit_code == 0 and r.output.startswith("compatible")


@pytest.mark.parametrize("field", MISMATCHES)
def test_each_mismatch_is_named(tmp_path, field):
    role, kv, extra = MISMATCHES[field]
    p = _set(tmp_path, role, kv, extra)
    report = check_files(p["target"], p["drafter"], p["projector"], runtime_centroids=False)
    fields = [x.field for x in report.problems]
    assert fields[0] == field and (field == "arch" or fields == [field]), report.problems  # wrong arch: keys absent too

    r = CliRunner().invoke(main, ["check", str(p["target"]), str(p["drafter"]), "--mmproj", str(p["projector"]),
                                  "--no-runtime-centroids"])
    assert r.exit_code == 1
    assert r.output.splitlines() == [str(x) for x in report.problems]
    assert r.output.startswith(f"{field}: ")

    r = CliRunner().invoke(main, ["check", str(p["target"]), str(p["drafter"]), "--mmproj", str(p["projector"]),
                                  "--no-runtime-centroids", "--json"])
    assert r.exit_code == 1
    data = json.loads(r.output)
    assert data["compatible"] is False
    assert data["problems"][0]["field"] == field and data["problems"][0]["message"]
    assert set(data) >= {"compatible", "problems", "target", "drafter", "projector"}


def test_centroid_drafter_passes_with_the_patched_runtime(tmp_path):
    role, kv, extra = MISMATCHES["centroid_support"]
    p = _set(tmp_path, role, kv, extra)
    assert check_files(p["target"], p["drafter"], runtime_centroids=True).compatible
    r = CliRunner().invoke(main, ["check", str(p["target"]), str(p["drafter"]), "--runtime-centroids"])
    assert r.exit_code == 0, r.output


def test_auto_runtime_centroids_follows_the_installed_runtime(tmp_path):
    """Auto-detection asks the loaded llama.cpp: a stock build refuses a centroid drafter, ours accepts it."""
    from gguf_mtp.runtime import centroid_support

    role, kv, extra = MISMATCHES["centroid_support"]
    p = _set(tmp_path, role, kv, extra)
    report = check_files(p["target"], p["drafter"])
    patched = centroid_support()
    assert report.runtime_centroids is patched
    assert [x.field for x in report.problems] == ([] if patched else ["centroid_support"])


def test_swapped_files_and_bad_file(tmp_path):
    p = _set(tmp_path)
    r = CliRunner().invoke(main, ["check", str(p["drafter"]), str(p["target"])])
    assert r.exit_code == 1 and "arch: target must be gemma4" in r.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 30)
    r = CliRunner().invoke(main, ["check", str(p["target"]), str(bad)])
    assert r.exit_code == 2 and r.output.startswith("error: ") and r.output.count("\n") == 1


FAMILIES = ("tiny-e", "tiny-dense", "tiny-moe", "tiny-q")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_families_pair_and_cross_family_does_not(tiny_ggufs, family):
    t, d = tiny_ggufs[(family, "target")], tiny_ggufs[(family, "drafter")]
    assert check_files(t, d, runtime_centroids=False).compatible
    for other in FAMILIES:
        if other != family:
            report = check_files(t, tiny_ggufs[(other, "drafter")], runtime_centroids=False)
            assert not report.compatible, (family, other)


def test_tiny_e_centroid_drafter_needs_the_patched_runtime(tiny_ggufs, exports):
    t, d = tiny_ggufs[("tiny-e", "target")], exports.get("tiny-e", "drafter", centroids=True)
    assert [p.field for p in check_files(t, d, runtime_centroids=False).problems] == ["centroid_support"]
    assert check_files(t, d, runtime_centroids=True).compatible


def test_full_size_31b_skeleton_pair(skeletons):
    t, d = skeletons.get("31B", "target"), skeletons.get("31B", "drafter")
    report = check_files(t, d, runtime_centroids=False)
    assert report.compatible, report.problems
    assert report.target.n_vocab == report.drafter.n_vocab == 262144
