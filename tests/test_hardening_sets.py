"""Mismatched sets, every command alike: each row breaks one field of a target / drafter / projector set, and
``check``, ``generate``, ``chat``, ``plan`` and ``modelfile`` all refuse it naming that field (pairing.check_set is
the one validator; the files are metadata-only GGUFs, refused before any weights would load)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from fixtures.quant import MISMATCHES, write_role

from gguf_mtp.cli import main

# every field but centroid_support (a runtime capability, not a broken file)
BROKEN = {f: row for f, row in MISMATCHES.items() if f != "centroid_support"}


def command_lines(t: str, d: str, p: str) -> dict[str, list[str]]:
    """Each command, given the whole set (the projector where the command takes one)."""
    return {
        "check": ["check", t, d, "--mmproj", p, "--no-runtime-centroids"],
        "generate": ["generate", "--target", t, "--drafter", d, "-p", "hi", "-n", "4"],
        "chat": ["chat", "--target", t, "--drafter", d, "--mmproj", p, "-n", "4"],
        "plan": ["plan", "--target", t, "--drafter", d, "--mmproj", p],
        "modelfile": ["modelfile", "--target", t, "--drafter", d, "--mmproj", p, "--ctx", "4096"],
    }


# (field, command) for every command the broken file reaches: generate takes no --mmproj, so no projector row
CASES = [(field, command) for field, (role, _, _) in BROKEN.items()
         for command, argv in command_lines("t", "d", "p").items() if role != "projector" or "p" in argv]


@pytest.fixture
def make_set(tmp_path):
    def build(field: str | None) -> tuple[str, str, str]:
        role, kv, extra = BROKEN[field] if field else (None, {}, {})
        paths = []
        for r in ("target", "drafter", "projector"):
            mine = r == role
            paths.append(str(write_role(tmp_path / f"{r}.gguf", r, kv=kv if mine else {}, **(extra if mine else {}))))
        return tuple(paths)

    return build


@pytest.mark.parametrize("field, command", CASES)
def test_every_command_names_the_broken_field(make_set, field, command):
    t, d, p = make_set(field)
    r = CliRunner().invoke(main, command_lines(t, d, p)[command], input="")
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    text = r.output if command == "check" else r.stderr
    assert f"{field}: " in text, text
    if command != "check":  # one error line naming every problem, nothing on stdout
        assert r.stderr.startswith("error: incompatible set") and r.stderr.count("\n") == 1 and not r.stdout


def test_the_unbroken_set_passes_the_pair_check(make_set):
    """The rows' baseline is a working set: check accepts it (the other commands would go on to load weights)."""
    t, d, p = make_set(None)
    r = CliRunner().invoke(main, command_lines(t, d, p)["check"])
    assert r.exit_code == 0 and r.output.startswith("compatible"), r.output
    r = CliRunner().invoke(main, command_lines(t, d, p)["modelfile"])
    assert r.exit_code == 0 and "DRAFT" in r.output, r.output
