"""Runtime fixes for transformers 5.23.0's Gemma 4 / Gemma 4 assistant code (see README.md here).

``apply()`` patches the classes in place, once per process, and returns the names of the fixes it
applied. It changes nothing for configs the upstream code already handles; it only makes three cases run
that otherwise crash. Used by gguf_mtp/transformers_reference.py, which uses transformers as the reference
implementation.
"""

from __future__ import annotations

import warnings

TESTED_VERSION = "5.23.0"
_S, _F = "sliding_attention", "full_attention"
_applied: list[str] = []


def kv_sharing_modes(config) -> list[str | None]:
    """Per layer: None (own KV), "store" (own KV, published for later readers) or "reuse".

    - an assistant text config (every layer shared) reuses for every layer; upstream raises because no
      layer of its own produces a cache;
    - a target without shared layers (26B/31B) stores the KV of its last layer of each type, so an MTP
      drafter can read it; upstream stores nothing (the drafter then fails with KeyError 'full_attention');
    - otherwise as upstream: the last unshared layer of each type stores, shared layers reuse.
    """
    n, shared = config.num_hidden_layers, config.num_kv_shared_layers or 0
    if shared >= n:
        return ["reuse"] * n
    first_shared = n - shared
    modes: list[str | None] = [None if i < first_shared else "reuse" for i in range(n)]
    producers = config.layer_types[:first_shared]
    if shared and set(producers) != set(config.layer_types):
        raise ValueError("The set of layer types producing a cache is different than the set of layer types using them")
    for kind in set(producers):
        modes[first_shared - 1 - producers[::-1].index(kind)] = "store"
    return modes


def _fix_kv_sharing_modes() -> None:
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedTextConfig

    # the 12B's text config carries its own copy of the same property, with the same two defects
    for cls in (Gemma4TextConfig, Gemma4UnifiedTextConfig):
        cls.kv_sharing_modes = property(kv_sharing_modes)


def _fix_slice_without_ple() -> None:
    """Gemma4TextModel._maybe_slice_kv_shared_inputs indexes per_layer_inputs even when it is None (no PLE).

    That happens in every assistant forward with more than one query position: all its layers are shared,
    so slicing starts at layer 0. Pass an empty stand-in through the upstream code and hand back None.
    """
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

    upstream = Gemma4TextModel._maybe_slice_kv_shared_inputs
    if getattr(upstream, "_gguf_mtp_fix", False):
        return

    def _maybe_slice_kv_shared_inputs(self, hidden_states, per_layer_inputs, *args, **kwargs):
        if per_layer_inputs is not None:
            return upstream(self, hidden_states, per_layer_inputs, *args, **kwargs)
        stand_in = hidden_states.new_empty(*hidden_states.shape[:2], 0, 0)
        hidden_states, _, position_embeddings, masks = upstream(self, hidden_states, stand_in, *args, **kwargs)
        return hidden_states, None, position_embeddings, masks

    _maybe_slice_kv_shared_inputs._gguf_mtp_fix = True
    Gemma4TextModel._maybe_slice_kv_shared_inputs = _maybe_slice_kv_shared_inputs


FIXES = {
    "kv_sharing_modes": _fix_kv_sharing_modes,
    "slice_without_ple": _fix_slice_without_ple,
}


def apply() -> list[str]:
    """Apply every fix (idempotent); warns when transformers is not the version these were written for."""
    import transformers

    if transformers.__version__ != TESTED_VERSION:
        warnings.warn(f"gemma4_fixes was written for transformers {TESTED_VERSION}, "
                      f"found {transformers.__version__}", stacklevel=2)
    for name, fix in FIXES.items():
        if name not in _applied:
            fix()
            _applied.append(name)
    return list(_applied)
