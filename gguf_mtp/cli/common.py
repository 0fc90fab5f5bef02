"""What several ``gguf-mtp`` commands share: the error-handling group, printing, sizes, and the runtime, decoding
and logging options of the commands that load models (generate, chat, bench)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..errors import GgufMtpError
from ..settings import KV_TYPES  # light: no llama.cpp import

console = Console()
err_console = Console(stderr=True)


class Group(click.Group):
    """Turns our errors (and a few common ones) into one ``error:`` line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GgufMtpError, OSError) as e:  # OSError: a file we cannot read or write (disk full, permissions)
            if os.environ.get("GGUF_MTP_DEBUG"):
                raise
            click.echo(f"error: {error_message(e)}", err=True)
            ctx.exit(exit_code(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def error_message(e: GgufMtpError | OSError) -> str:
    """The one line that tells the user what went wrong (an OSError names its file)."""
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    return str(e)


def exit_code(e: GgufMtpError | OSError) -> int:
    """The exit status for ``e``: the error's own, 2 for an OSError."""
    return e.exit_code if isinstance(e, GgufMtpError) else 2


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def emit(result: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """A command's result on stdout: with --json as JSON (a result's ``to_dict()``, a list item by item), else
    ``human(result)`` prints it as tables and lines; the one place that chooses."""
    if not as_json:
        human(result)
    elif isinstance(result, list):
        print_json([r.to_dict() if hasattr(r, "to_dict") else r for r in result])
    else:
        print_json(result.to_dict() if hasattr(result, "to_dict") else result)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(v) for v in r))
    console.print(table)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def runtime_options(f: Any) -> Any:
    """Placement and context flags (llama-server's names); each overrides the --plan value it names."""
    options = [
        click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="Plan JSON (gguf-mtp plan --json)."),
        click.option("--ctx", type=click.IntRange(min=1), help="Context length (n_ctx)."),
        click.option("--n-gpu-layers", type=click.IntRange(min=-1), help="Target layers on the GPU (-1 all, 0 none)."),
        click.option("-ot", "--override-tensor", "override_tensor", multiple=True, metavar="PATTERN=CPU|GPU",
                     help="Place tensors matching a regex (repeatable; comma-separated lists too)."),
        click.option("--n-cpu-moe", type=click.IntRange(min=0), help="MoE experts of the first N layers on the CPU."),
        click.option("--drafter-cpu", is_flag=True, default=None, help="Keep the drafter on the CPU."),
        click.option("--batch-size", type=click.IntRange(min=1), help="n_batch."),
        click.option("--ubatch-size", type=click.IntRange(min=1), help="n_ubatch."),
        click.option("--cache-type-k", type=click.Choice(KV_TYPES), help="K cache type."),
        click.option("--cache-type-v", type=click.Choice(KV_TYPES),
                     help="V cache type (quantized needs flash attention)."),
        click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), help="Flash attention."),
        click.option("--swa-full/--no-swa-full", default=None, help="Full-size sliding-window cache."),
        click.option("--repack/--no-repack", default=None,
                     help="Repack CPU weights for the CPU's fast kernels (AMX, AVX-512); on by default."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads."),
        click.option("--rpc", "rpc", metavar="HOST:PORT,...", help="llama.cpp rpc-servers to add as devices "
                     "(gguf-mtp rpc-server; not in a runtime built with --no-rpc). Unauthenticated: trusted hosts only."),
        click.option("-dev", "--device", "device", metavar="DEV,...", help="Devices in split order (llama.cpp "
                     "names: CPU first if any, then CUDA0, RPC0 or RPC[HOST:PORT], ...)."),
        click.option("-ts", "--tensor-split", "tensor_split", metavar="P,...", help="Share of the layers per "
                     "--device, e.g. 1,2,2."),
        click.option("-devd", "--device-draft", "device_draft", metavar="DEV", help="The drafter's device "
                     "(default: the device of the target's last layers)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def runtime_settings(plan_file: str | None, ctx: int | None, n_gpu_layers: int | None, override_tensor: tuple,
                     n_cpu_moe: int | None, drafter_cpu: bool | None, batch_size: int | None,
                     ubatch_size: int | None, cache_type_k: str | None, cache_type_v: str | None,
                     flash_attn: str | None, swa_full: bool | None, repack: bool | None, threads: int | None,
                     rpc: str | None = None, device: str | None = None, tensor_split: str | None = None,
                     device_draft: str | None = None, draft: dict[str, Any] | None = None) -> Any:
    """RuntimeSettings from --plan (or the defaults), the runtime flags on top, then ``draft``
    (:func:`draft_settings`)."""
    from ..settings import RuntimeSettings, load_plan_settings

    base = load_plan_settings(plan_file) if plan_file else RuntimeSettings()
    overrides = None
    if override_tensor:
        overrides = list(base.tensor_overrides)
        for item in ",".join(override_tensor).split(","):
            pattern, sep, device = item.rpartition("=")
            if not sep or not pattern:
                raise GgufMtpError(f"--override-tensor: expected PATTERN=CPU|GPU, got {item!r}")
            overrides.append((pattern, device.upper()))
    settings = base.replace(n_ctx=ctx, n_gpu_layers=n_gpu_layers, tensor_overrides=overrides, n_cpu_moe=n_cpu_moe,
                            drafter_on_gpu=None if drafter_cpu is None else not drafter_cpu, n_batch=batch_size,
                            n_ubatch=ubatch_size, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                            flash_attn=flash_attn, swa_full=swa_full, repack=repack, threads=threads,
                            rpc=_csv(rpc), devices=_csv(device), tensor_split=_floats("--tensor-split", tensor_split),
                            drafter_device=device_draft)
    return dataclasses.replace(settings, **draft) if draft else settings


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _floats(flag: str, value: str | None) -> list[float] | None:
    try:
        return [float(v) for v in _csv(value)] if value else None
    except ValueError:
        raise GgufMtpError(f"{flag}: expected numbers like 1,2,2, got {value!r}") from None


def draft_settings(draft_max: int | None, adaptive: bool, draft_cap: int | None) -> dict[str, Any]:
    """The RuntimeSettings fields the draft-length flags of :func:`decode_options` set, for ``runtime_settings``'s
    ``draft``: --draft-max K always drafts K tokens; --adaptive / --draft-cap choose the length each round (over a
    plan's fixed K); none of them: the plan's or the default. Checked on its own, before anything is read."""
    if draft_max is not None and (adaptive or draft_cap is not None):
        raise GgufMtpError("--draft-max fixes the draft length; drop --adaptive/--draft-cap")
    if draft_max is not None:
        return {"draft_max": draft_max}
    if adaptive or draft_cap is not None:
        return {"draft_max": None, **({"draft_cap": draft_cap} if draft_cap is not None else {})}
    return {}


@contextlib.contextmanager
def log_to_stderr(verbose: bool) -> Any:
    """Our warnings as ``warning: ...`` lines while the command runs; with -v also llama.cpp's own log."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if verbose else "warning: %(message)s"))
    pkg = logging.getLogger("gguf_mtp")
    old_level, old_propagate = pkg.level, pkg.propagate
    pkg.addHandler(handler)
    pkg.setLevel(logging.DEBUG if verbose else logging.WARNING)
    pkg.propagate = False
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        pkg.propagate = old_propagate


def decode_options(f: Any) -> Any:
    """Sampling and draft-length flags, shared by generate and chat (the draft length: :func:`draft_settings`)."""
    options = [
        click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
                     help="Temperature (0: greedy)."),
        click.option("--top-k", default=0, type=click.IntRange(min=0), help="Top-k (0: off)."),
        click.option("--top-p", default=1.0, type=click.FloatRange(0.0, 1.0, min_open=True), help="Top-p (1: off)."),
        click.option("--min-p", default=0.0, type=click.FloatRange(0.0, 1.0), help="Min-p (0: off)."),
        click.option("--seed", type=int, help="Sampling seed."),
        click.option("--accept", type=click.Choice(["exact", "rejection"]), default="exact", show_default=True,
                     help="Draft acceptance: exact match (llama.cpp) or speculative rejection sampling."),
        click.option("--draft-max", type=click.IntRange(min=0), help="Always draft K tokens."),
        click.option("--adaptive", is_flag=True, help="Choose the draft length each round (the default without a plan)."),
        click.option("--draft-cap", type=click.IntRange(min=1), help="Upper bound for --adaptive."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f
