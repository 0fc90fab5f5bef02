"""Golden summaries of the default exports: every key's value and each tensor's name/type/shape/sha256.

Also the projectors (``convert --mmproj``: tiny-e vision + audio, tiny-unified's embedders;
tests/golden/export-{tiny-e,tiny-unified}-projector.json).

An unintended change of layout, names, types, metadata or tensor bytes fails here. After an intended change,
regenerate with ``tools/regen_export_golden.py`` (or ``GGUF_MTP_REGEN_GOLDEN=1 pytest tests/test_export_golden.py``)
and review the diff of tests/golden/export-*.json. Long arrays and strings are kept as length + sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures.projector import PROJECTOR_FAMILIES
from gguf import GGUFReader

GOLDEN = Path(__file__).parent / "golden"
REGEN = bool(os.environ.get("GGUF_MTP_REGEN_GOLDEN"))
CASES = {  # golden name -> (family, role, centroids)
    **{f"{f}-{r}": (f, r, False) for f in ("tiny-e", "tiny-dense", "tiny-moe", "tiny-q", "tiny-unified")
       for r in ("target", "drafter")},
    "tiny-e-drafter-centroids": ("tiny-e", "drafter", True),
}


def _digest(value) -> dict:
    blob = json.dumps(value, ensure_ascii=False).encode()
    return {"len": len(value), "sha256": hashlib.sha256(blob).hexdigest()}


def _value(v):
    if isinstance(v, float):
        return float(np.float32(v))  # the stored f32, spelled the same on every machine
    if isinstance(v, list):
        v = [_value(x) for x in v]
        return _digest(v) if len(v) > 16 else v
    if isinstance(v, str) and len(v) > 200:
        return _digest(v)
    return v


def summarize(path: Path) -> dict:
    r = GGUFReader(path)
    metadata = {k: _value(f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                "sha256": hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest()} for t in r.tensors]
    return {"metadata": metadata, "tensors": tensors}


def check_golden(got: dict, case: str) -> None:
    path = GOLDEN / f"export-{case}.json"
    if REGEN:
        path.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if not path.is_file():
        pytest.fail(f"{path.name} missing: run tools/regen_export_golden.py")
    want = json.loads(path.read_text(encoding="utf-8"))
    assert got["metadata"] == want["metadata"]
    assert [t["name"] for t in got["tensors"]] == [t["name"] for t in want["tensors"]]
    for g, w in zip(got["tensors"], want["tensors"]):
        assert g == w, g["name"]


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_golden(case, exports):
    family, role, centroids = CASES[case]
    check_golden(summarize(exports.get(family, role, centroids=centroids)), case)


@pytest.mark.parametrize("family", PROJECTOR_FAMILIES)
def test_projector_matches_golden(projectors, family):
    check_golden(summarize(projectors.get(family=family)), f"{family}-projector")
