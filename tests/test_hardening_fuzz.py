"""Fuzzed readers: GGUF headers (inspect / check / plan), safetensors headers and offsets, config and tokenizer files.

The CI run is a few hundred inputs per target; the long run is by hand:
``GGUF_MTP_FUZZ_EXAMPLES=10000 pytest -m fuzz tests/test_hardening_fuzz.py`` or ``python tools/fuzz.py``
(counts and peaks in docs/hardening.md). The rules (tests/fuzz_targets.py): only GgufMtpError, < 1 s, traced
memory bounded by the input's size. Inputs that once broke a reader are kept under tests/corpus/ and replayed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft

pytestmark = pytest.mark.fuzz
CORPUS = Path(__file__).parent / "corpus"
_FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=not ft.EXAMPLES)


def fuzz(default: int) -> settings:
    """CI: ``default`` inputs, the same ones every run; GGUF_MTP_FUZZ_EXAMPLES=N: N fresh random ones."""
    return settings(_FUZZ, max_examples=ft.examples(default))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def gguf_seeds(tmp_path_factory) -> list[bytes]:
    return ft.gguf_seeds(tmp_path_factory.mktemp("gguf-seeds"))


@pytest.fixture(scope="module")
def config_seeds(tiny_root) -> list[dict[str, bytes]]:
    return ft.config_seeds(tiny_root)


@pytest.fixture(scope="module", autouse=True)
def report():
    """With GGUF_MTP_FUZZ_REPORT=FILE, write what each target saw (tools/fuzz.py reads it)."""
    yield
    path = os.environ.get("GGUF_MTP_FUZZ_REPORT")
    if path:
        out = {name: {**s.__dict__, "refused": dict(s.refused.most_common(12))} for name, s in ft.STATS.items()}
        Path(path).write_text(json.dumps(out, indent=2) + "\n")


def test_seeds_are_read(gguf_seeds, workdir, config_seeds):
    """The seeds themselves pass: mutations start from files every reader accepts."""
    for data in gguf_seeds[:1]:
        ft.run_gguf(data, workdir)
    (workdir / "st").mkdir(exist_ok=True)
    for data in ft.safetensors_seeds():
        ft.run_safetensors(data, workdir / "st")
    for files in config_seeds:
        ft.run_config(files, workdir)
    assert ft.STATS["gguf"].accepted and ft.STATS["safetensors"].accepted == 2
    assert ft.STATS["config"].accepted == len(config_seeds)


# --- GGUF: the reader behind inspect, check, plan, quantize, generate ------------------------------------
def test_gguf_mutations(gguf_seeds, workdir):
    @fuzz(200)
    @given(data=st.data())
    def run(data):
        ft.run_gguf(data.draw(ft.mutated(gguf_seeds)), workdir)

    run()


def test_gguf_structured(workdir):
    @fuzz(150)
    @given(blob=ft.structured_gguf())
    def run(blob):
        ft.run_gguf(blob, workdir)

    run()


def test_gguf_hostile_metadata(workdir):
    """Files that read cleanly but hold hostile values: what inspect, pairing and the planner do with them."""
    @fuzz(200)
    @given(blob=ft.honest_gguf())
    def run(blob):
        ft.run_gguf(blob, workdir)

    run()


# --- safetensors: header length, JSON, dtypes, shapes, offsets -----------------------------------------------
def test_safetensors_mutations(tmp_path):
    seeds = ft.safetensors_seeds()

    @fuzz(200)
    @given(data=st.data())
    def run(data):
        ft.run_safetensors(data.draw(ft.mutated(seeds)), tmp_path)

    run()


def test_safetensors_structured(tmp_path):
    @fuzz(150)
    @given(blob=ft.structured_safetensors())
    def run(blob):
        ft.run_safetensors(blob, tmp_path)

    run()


def test_safetensors_shapes(tmp_path):
    @fuzz(100)
    @given(blob=ft.honest_safetensors())
    def run(blob):
        ft.run_safetensors(blob, tmp_path)

    run()


# --- config.json, tokenizer.json / tokenizer.model, tokenizer_config.json ------------------------------------
def test_config_and_tokenizer(config_seeds, tmp_path):
    @fuzz(200)
    @given(data=st.data())
    def run(data):
        ft.run_config(data.draw(ft.config_input(config_seeds)), tmp_path)

    run()


# --- the corpus: inputs that found bugs, replayed on every run -------------------------------------------------
def _corpus(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*")) if (CORPUS / kind).is_dir() else []


@pytest.mark.parametrize("path", _corpus("gguf"), ids=lambda p: p.name)
def test_corpus_gguf(path, workdir):
    ft.run_gguf(path.read_bytes(), workdir)


@pytest.mark.parametrize("path", _corpus("safetensors"), ids=lambda p: p.name)
def test_corpus_safetensors(path, tmp_path):
    ft.run_safetensors(path.read_bytes(), tmp_path)


@pytest.mark.parametrize("path", [p for p in _corpus("config") if p.is_dir()], ids=lambda p: p.name)
def test_corpus_config(path, tmp_path, tiny_root):
    """A config case is a directory: ``seed`` names the tiny checkpoint it starts from (family/role),
    ``patch.json`` holds JSON edits per file ([path, value] sets, [path] deletes), other files replace the
    seed's, and ``NAME.deleted`` removes one."""
    seed = tiny_root / (path / "seed").read_text().strip()
    files = {f: (seed / f).read_bytes() for f in ft.CONFIG_FILES if (seed / f).is_file()}
    patch = json.loads((path / "patch.json").read_text()) if (path / "patch.json").is_file() else {}
    for name, ops in patch.items():
        files[name] = json.dumps(_apply(json.loads(files[name]), ops)).encode()
    for f in path.iterdir():
        if f.name.endswith(".deleted"):
            files.pop(f.name[: -len(".deleted")], None)
        elif f.name not in ("seed", "patch.json"):
            files[f.name] = f.read_bytes()
    ft.run_config(files, tmp_path)


def _apply(doc, ops):
    for op in ops:
        path = op[0]
        if not path:
            doc = op[1]
            continue
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            if len(op) == 1:
                del parent[path[-1]]
            elif isinstance(parent, list) and path[-1] == len(parent):
                parent.append(op[1])
            else:
                parent[path[-1]] = op[1]
        except (KeyError, IndexError, TypeError):
            pass  # the seed changed since the case was recorded: keep what applies
    return doc
