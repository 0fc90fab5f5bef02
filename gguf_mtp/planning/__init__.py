"""Fit a Gemma 4 target + MTP drafter + vision projector into a VRAM budget, before or after download.

Module map (each imports only those above it):

- ``memory``: sizes, and llama.cpp's memory arithmetic as pure functions -- tensor bytes, KV-cache cells and bytes
  (the one KV formula), compute buffers, output buffers.
- ``layout``: a registry variant's files as layouts (tensors, metadata, no data), made by the exporter's own tables
  and metadata writers through one adapter (a Variant -> the exporter's hyper-parameters); quantized layouts by
  llama.cpp's per-tensor mix (``gguf_mtp.quantmix``). Also the registry's parameter counts.
- ``placement``: what llama.cpp allocates for a file set and runtime settings, per device and component
  (``ModelFile`` from a GGUF or a layout, weight placement, ``breakdown``).
- ``search``: ``plan()`` -- the placement, KV type and largest context that fit a budget; file sets of a variant;
  what a plan prints.
- ``skeleton``: layouts written as full-size sparse GGUFs (``gguf-mtp skeleton``), for llama.cpp to load without
  weights.
- ``probe``: llama.cpp's own no_alloc accounting of a file set -- the yardstick the planner is tested against, never
  called by it.
"""
