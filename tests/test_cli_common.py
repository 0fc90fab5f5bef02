"""The helpers every command shares (gguf_mtp/cli/common.py): the draft-length flags and --json vs tables."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from gguf_mtp.cli.common import draft_settings, emit, runtime_settings
from gguf_mtp.errors import GgufMtpError

NO_RUNTIME_FLAGS = dict(plan_file=None, ctx=None, n_gpu_layers=None, override_tensor=(), n_cpu_moe=None,
                        drafter_cpu=None, batch_size=None, ubatch_size=None, cache_type_k=None, cache_type_v=None,
                        flash_attn=None, swa_full=None, repack=None, threads=None)


@pytest.mark.parametrize("plan_k", [None, 5])  # the plan's own draft length: adaptive, or a fixed K
@pytest.mark.parametrize("flags, expect", [
    # (--draft-max, --adaptive, --draft-cap) -> (draft_max, draft_cap) with "plan" for the plan's value
    ((None, False, None), ("plan", 8)),
    ((3, False, None), (3, 8)),
    ((0, False, None), (0, 8)),
    ((None, True, None), (None, 8)),
    ((None, False, 4), (None, 4)),
    ((None, True, 2), (None, 2)),
])
def test_draft_settings(tmp_path, plan_k, flags, expect):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"runtime": {"draft_max": plan_k}}))
    s = runtime_settings(**{**NO_RUNTIME_FLAGS, "plan_file": str(plan)}, draft=draft_settings(*flags))
    assert (s.draft_max, s.draft_cap) == (plan_k if expect[0] == "plan" else expect[0], expect[1])


@pytest.mark.parametrize("flags", [(3, True, None), (3, False, 4), (0, True, 2)])
def test_draft_settings_conflict(flags):
    with pytest.raises(GgufMtpError, match=r"^--draft-max fixes the draft length; drop --adaptive/--draft-cap$"):
        draft_settings(*flags)


@dataclass
class _Result:
    n: int

    def to_dict(self) -> dict:
        return {"n": self.n}


@pytest.mark.parametrize("result, printed", [
    (_Result(1), {"n": 1}),
    ([_Result(1), _Result(2)], [{"n": 1}, {"n": 2}]),
    ({"path": "x", "size": 3}, {"path": "x", "size": 3}),
])
def test_emit(capsys, result, printed):
    shown = []
    emit(result, True, shown.append)
    assert capsys.readouterr().out == json.dumps(printed, indent=2) + "\n" and shown == []
    emit(result, False, shown.append)
    assert capsys.readouterr().out == "" and shown == [result]  # human mode gets the result itself
