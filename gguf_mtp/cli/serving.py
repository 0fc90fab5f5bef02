"""serve: an OpenAI-compatible HTTP server over the batched MTP scheduler (gguf_mtp/serve/)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from ..errors import GgufMtpError
from .common import decode_options, draft_settings, err_console, log_to_stderr, runtime_options, runtime_settings

DEFAULT_PARALLEL = 4  # slots without a plan (llama-server also defaults to 4)


def _say(line: str) -> None:
    """One unwrapped line on stderr (scripts read the address from it)."""
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


@click.command("serve")
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Projector GGUF (clip), for images and audio.")
@click.option("--parallel", "-np", type=click.IntRange(1, 256),
              help=f"Sequences decoded together (slots); each gets --ctx / N positions. Default: the plan's "
                   f"(plan --parallel N), else {DEFAULT_PARALLEL}.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free).")
@click.option("--api-key", envvar="GGUF_MTP_API_KEY", help="Require 'Authorization: Bearer KEY' "
              "(or set GGUF_MTP_API_KEY, which keeps the key out of the process list).")
@click.option("--model-name", help="The model id clients name (default: the target file's stem).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait for a slot; more get 503 with Retry-After.")
@click.option("--grace", default=10.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Seconds running requests get to finish after SIGTERM.")
@click.option("--think", is_flag=True, help="Gemma 4 thinking mode unless a request says otherwise.")
@decode_options
@click.option("--allow-no-drafter", is_flag=True, help="Go on without the drafter if it cannot be loaded.")
@runtime_options
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log and every request on stderr.")
def serve_http_cmd(target, drafter, mmproj, parallel, host, port, api_key, model_name, max_queue, grace, think, temp,
                   top_k, top_p, min_p, seed, accept, draft_max, adaptive, draft_cap, allow_no_drafter, verbose,
                   **runtime) -> None:
    """Serve TARGET (+ MTP DRAFTER, + projector for images and audio) over an OpenAI-compatible HTTP API.

    Endpoints: GET /v1/models, POST /v1/chat/completions (streamed or not), POST /v1/completions, GET /health,
    GET /metrics (Prometheus). --parallel N requests are decoded together, drafted and verified in one batch;
    more wait in a queue of --max-queue. The sampling flags are the defaults for fields a request leaves out;
    a request may set "draft": {"max": K} / "adaptive" / "off". Binds 127.0.0.1 unless --host says otherwise.
    SIGTERM (or Ctrl-C) lets running requests finish for --grace seconds, then exits.

    \b
    Examples:
      gguf-mtp serve --target t.gguf --drafter d.gguf --plan plan.json --parallel 4
      GGUF_MTP_API_KEY=secret gguf-mtp serve --target t.gguf --drafter d.gguf --host 0.0.0.0 --port 8080
    """
    from ..runtime.sampling import SamplingParams
    from ..serve import EngineThread, ServeConfig, create_app
    from ..runtime.devices import is_loopback
    from ..serve.server import bind, make_server, quiet_sigterm

    draft = draft_settings(draft_max, adaptive, draft_cap)
    settings = runtime_settings(**runtime, draft=draft)
    # the plan sized the KV pool and batches for its n_parallel: take it unless told otherwise
    parallel = parallel or (settings.n_parallel if runtime.get("plan_file") else DEFAULT_PARALLEL)
    settings = settings.replace(n_parallel=parallel)
    for what, path in (("target", target), ("drafter", drafter), ("projector", mmproj)):
        if path is not None and not Path(path).is_file():
            raise GgufMtpError(f"{what} {path} does not exist")
    if not is_loopback(host):
        exposed = "" if api_key else "; without --api-key anyone who can reach it can use it"
        _say(f"warning: --host {host} is reachable from other machines{exposed}")
    config = ServeConfig(model=model_name or Path(target).stem, api_key=api_key, think=think,
                         sampling=SamplingParams(temp, top_k, top_p, min_p, seed), accept=accept,
                         draft=settings.draft_max if settings.draft_max is not None else "adaptive", grace=grace)
    sock = bind(host, port)  # before the weights load: a taken port is the first error, not the last
    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        from ..runtime.batch_engine import BatchEngine
        from ..runtime.scheduler import Scheduler

        stack.enter_context(log_to_stderr(verbose))
        engine = stack.enter_context(BatchEngine.load(target, drafter, settings, n_seq=parallel,
                                                      allow_no_drafter=allow_no_drafter, mmproj=mmproj))
        scheduler = Scheduler(engine, max_queue=max_queue)
        engine_thread = EngineThread(scheduler, engine.projector)
        stack.enter_context(scheduler)  # started here; stopped (again: a no-op) before the engine is freed
        app = create_app(engine_thread, config)

        def ready(bound_host: str, bound_port: int) -> None:
            what = "MTP drafter" if engine.has_drafter else "no drafter"
            _say(f"serving {config.model} ({what}, {parallel} slots of {engine.slot_ctx} positions) on "
                 f"http://{bound_host}:{bound_port}/v1")

        server = make_server(app, app.state.serve, verbose=verbose, on_ready=ready)
        with quiet_sigterm():
            server.run(sockets=[sock])
