"""``gguf-mtp check``: can these files run together? Facts from each file, problems from ``pairing.check_set``.

Nothing here decides compatibility; it reads files and reports what the one validator says, so ``check`` never
disagrees with ``generate`` or ``plan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .pairing import ModelFacts, Problem, check_set, facts_from_gguf


@dataclass
class CheckReport:
    target: ModelFacts
    drafter: ModelFacts
    projector: ModelFacts | None
    runtime_centroids: bool
    problems: list[Problem]

    @property
    def compatible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "problems": [{"field": p.field, "message": p.message} for p in self.problems],
            "target": self.target.to_dict(),
            "drafter": self.drafter.to_dict(),
            "projector": self.projector.to_dict() if self.projector else None,
            "runtime_centroids": self.runtime_centroids,
        }


def runtime_has_centroids() -> bool:
    """Whether the runtime this process would use carries our centroid-head patch ("auto").

    Asks ``gguf_mtp.runtime.centroid_support()`` (is our patched llama-cpp-python build loaded?); stock
    llama-cpp-python does not have the patch, so any failure to tell means no.
    """
    try:
        from .runtime import centroid_support

        return bool(centroid_support())
    except Exception:  # noqa: BLE001 - no way to tell is a no
        return False


def check_files(target: str | Path, drafter: str | Path, mmproj: str | Path | None = None,
                runtime_centroids: bool | None = None) -> CheckReport:
    """Read each file's facts (bounded header reads) and list every problem; ``None`` means auto-detect."""
    rc = runtime_has_centroids() if runtime_centroids is None else runtime_centroids
    t, d = facts_from_gguf(target), facts_from_gguf(drafter)
    p = facts_from_gguf(mmproj) if mmproj is not None else None
    return CheckReport(t, d, p, rc, check_set(t, d, p, runtime_centroids=rc))
