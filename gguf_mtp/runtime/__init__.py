"""gguf-mtp's runtime: target + MTP drafter on llama-cpp-python's low-level bindings.

Modules: ``bindings`` (ctypes glue llama-cpp-python lacks), ``engine`` (load, contexts, KV bookkeeping),
``drafters`` (MTP and oracle drafters), ``sampling`` (samplers, exact and rejection acceptance), ``adaptive``
(draft length per round), ``loop`` (the speculative loop), ``stats``, ``chat_template``, ``chat`` (multi-turn
sessions), ``multimodal`` (images through the vision projector, libmtmd).
Importing this package does not load llama.cpp; the modules that need it do.
"""

from __future__ import annotations


def centroid_support() -> bool:
    """Whether the installed llama.cpp loads centroid-head drafters (our patched runtime build)."""
    from ..runtime_build import supports_centroid_head

    return supports_centroid_head()
