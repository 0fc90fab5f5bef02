"""``gguf-mtp serve``: an OpenAI-compatible HTTP server over the batched MTP scheduler (runtime/scheduler.py).

- schema.py: request bodies checked into dataclasses; response objects and OpenAI's error object.
- prompts.py: messages and prompts into tokens (chat template, thinking, images from data: URLs, audio from
  input_audio parts).
- text.py: emitted tokens into text (thoughts, stop strings, how each token was produced).
- tools.py: OpenAI tool calling in Gemma 4's format (tools checked, rendered, calls parsed back).
- engine_thread.py: requests to the scheduler's engine thread, events back into asyncio.
- metrics.py: the Prometheus text of ``/metrics``.
- app.py: the Starlette routes; server.py: uvicorn, binding, signals and graceful shutdown.
"""

from .app import ServeConfig, create_app
from .engine_thread import EngineThread

__all__ = ["EngineThread", "ServeConfig", "create_app"]
