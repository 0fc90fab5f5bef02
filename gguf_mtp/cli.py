"""The ``gguf-mtp`` command line: parsing and printing only; the work is in the library modules.

Conventions (docs/contracts.md): ``-o`` names outputs, ``--force`` overwrites, ``--json`` prints machine
output, ``--mmproj PATH`` names a projector file (except ``convert SRC --mmproj``), quant names are
spelled as llama.cpp spells them (Q4_K_M). Errors print one line to stderr and exit non-zero; set
GGUF_MTP_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import GgufMtpError

console = Console()
err_console = Console(stderr=True)


class Group(click.Group):
    """Turns our errors (and a few common ones) into one ``error:`` line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GgufMtpError as e:
            if os.environ.get("GGUF_MTP_DEBUG"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except OSError as e:  # a file we cannot read or write (disk full, permissions, I/O error): one line too
            if os.environ.get("GGUF_MTP_DEBUG"):
                raise
            click.echo(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(v) for v in r))
    console.print(table)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gguf-mtp")
def main() -> None:
    """Gemma 4 + MTP drafters on llama.cpp: export, quantize, plan, run."""


# Commands are added below as their modules land (no placeholders).


# --- modelfile / serve-cmd: Ollama Modelfiles and llama-server command lines from one plan ---------------

_SAMPLING_PARAMETERS = (  # CLI option -> Ollama PARAMETER (same name with dashes)
    ("temperature", float), ("top_k", int), ("top_p", float), ("min_p", float), ("repeat_penalty", float),
    ("repeat_last_n", int), ("presence_penalty", float), ("frequency_penalty", float), ("seed", int),
    ("num_predict", int),
)


def _set_options(f: Any) -> Any:
    """--target/--drafter/--mmproj and the settings flags, shared by modelfile and serve-cmd."""
    options = [
        click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4)."),
        click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant)."),
        click.option("--mmproj", type=click.Path(dir_okay=False), help="Vision projector GGUF (clip)."),
        click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="Plan JSON (gguf-mtp plan --json)."),
        click.option("--vram", help="Plan for this VRAM budget, e.g. 24GiB (instead of --plan)."),
        click.option("--ctx", type=click.IntRange(min=1), help="Context length (overrides the plan's)."),
        click.option("--n-gpu-layers", type=click.IntRange(min=-1), help="Target layers on the GPU (-1 all)."),
        click.option("--draft-max", type=click.IntRange(min=0), help="Draft length (default: plan, else registry)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _sampling_options(f: Any) -> Any:
    for name, kind in reversed(_SAMPLING_PARAMETERS):
        f = click.option("--" + name.replace("_", "-"), name, type=kind, help=f"PARAMETER {name}.")(f)
    return f


def _set_settings(plan_file: str | None, vram: str | None, ctx: int | None, n_gpu_layers: int | None,
                  draft_max: int | None, need_ctx: bool, files: tuple[str, str | None, str | None]) -> Any:
    """RuntimeSettings from --plan or --vram (the planner), then --ctx/--n-gpu-layers/--draft-max on top."""
    from .settings import RuntimeSettings, load_plan_settings

    if plan_file is not None and vram is not None:
        raise GgufMtpError("give --plan FILE or --vram SIZE, not both")
    if vram is not None:
        from .plan import plan_for_files, shortfall_message

        p = plan_for_files(*files, vram=vram, n_ctx=ctx)
        if not p.fits:
            raise GgufMtpError(shortfall_message(p))
        base = p.settings
    elif plan_file is None and ctx is None and need_ctx:
        raise GgufMtpError("give --plan FILE, --vram SIZE, or --ctx N (with optional --n-gpu-layers)")
    else:
        base = load_plan_settings(plan_file) if plan_file else RuntimeSettings()
    return base.replace(n_ctx=ctx, n_gpu_layers=n_gpu_layers, draft_max=draft_max)


def _set_facts(target: str, drafter: str | None, mmproj: str | None) -> tuple[Any, Any, Any]:
    from .pairing import facts_from_gguf

    return (facts_from_gguf(target), facts_from_gguf(drafter) if drafter else None,
            facts_from_gguf(mmproj) if mmproj else None)


def _draft_choice(settings: Any, target_facts: Any) -> tuple[int | None, str]:
    """The draft length to use when the settings are adaptive, and where the length comes from."""
    from . import render

    if settings.draft_max is not None:
        return None, "fixed by the plan or --draft-max"
    n_layers = len(target_facts.layer_layout) or None
    rec = render.recommended_draft_length(target_facts.hidden_size, n_layers)
    if rec is not None:
        return rec, "the registry's recommendation for this target"
    return None, "llama-server's default (no registry variant has this target's shape)"


@main.command("modelfile")
@_set_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the Modelfile here (default: stdout).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--create", "create_name", metavar="NAME", help="Run `ollama create NAME -f Modelfile` afterwards.")
@click.option("--template", is_flag=True, help="Add Gemma 4's chat TEMPLATE (Ollama without the gemma4 renderer).")
@click.option("--system", help="SYSTEM prompt.")
@click.option("-p", "--parameter", "parameters", multiple=True, metavar="NAME=VALUE", help="Any other PARAMETER.")
@_sampling_options
def modelfile_cmd(target: str, drafter: str | None, mmproj: str | None, plan_file: str | None, vram: str | None,
                  ctx: int | None, n_gpu_layers: int | None, draft_max: int | None, output: str | None, force: bool,
                  create_name: str | None, template: bool, system: str | None, parameters: tuple[str, ...],
                  **sampling: Any) -> None:
    """Write an Ollama Modelfile: FROM target (+ projector), DRAFT drafter, the plan's PARAMETERs.

    \b
    gguf-mtp modelfile --target gemma-4-31B-it-Q4_K_M.gguf --drafter mtp-31B-Q8_0.gguf \\
        --mmproj mmproj-31B-F16.gguf --plan plan.json -o Modelfile --create gemma4-mtp
    """
    from . import ollama, render
    from .fsutil import atomic_output, check_output_path

    settings = _set_settings(plan_file, vram, ctx, n_gpu_layers, draft_max, need_ctx=True,
                             files=(target, drafter, mmproj))
    extra: dict[str, Any] = {k: v for k, v in sampling.items() if v is not None}
    for item in parameters:
        name, sep, value = item.partition("=")
        problem = ollama.value_problem(name, value) if sep else f"--parameter: expected NAME=VALUE, got {item!r}"
        if problem:
            raise GgufMtpError(problem)
        extra[name] = [*extra.get("stop", []), value] if name == "stop" else value
    out = output or ("Modelfile" if create_name else None)
    if out:
        check_output_path(out, force)
    ollama.check_paths(target, drafter, mmproj)
    tf, df, pf = _set_facts(target, drafter, mmproj)
    ollama.check_set_for_ollama(tf, df, pf)
    draft_default, source = _draft_choice(settings, tf)
    k = render.draft_length(settings, draft_default)
    header = [f"draft_num_predict {k}: {source}"] if drafter else ["no DRAFT: Ollama runs this model without MTP"]
    base_dir = os.path.dirname(os.path.abspath(out)) if out else None  # stdout: absolute paths
    mf = ollama.build_modelfile(settings, target, drafter, mmproj, base_dir=base_dir, n_layers=len(tf.layer_layout)
                                or None, draft_default=draft_default, sampling=extra, system=system,
                                template=template, header=header)
    text = ollama.render_modelfile(mf)
    if out:
        with atomic_output(out, force) as tmp:
            tmp.write_text(text, encoding="utf-8")
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text, nl=False)
    for note in ollama.unexpressible_notes(settings):
        click.echo(f"note: not expressible in a Modelfile: {note}", err=True)
    if not drafter:
        click.echo("note: no --drafter: the Modelfile has no DRAFT line, so Ollama runs without MTP", err=True)
    if create_name:
        argv, rc = ollama.run_create(create_name, out)
        if rc is None:
            click.echo("ollama is not on PATH; create the model with:", err=True)
            click.echo(ollama.shell_line(argv))
        elif rc != 0:
            raise GgufMtpError(f"`{ollama.shell_line(argv)}` failed (exit {rc})")


@main.command("serve-cmd")
@_set_options
@click.option("--port", type=click.IntRange(1, 65535), help="llama-server --port.")
@click.option("--gpu-buffer", default="CUDA0", show_default=True, help="Buffer type a GPU tensor override names.")
@click.option("--json", "as_json", is_flag=True, help="Print the argument list and the reasons as JSON.")
def serve_cmd(target: str, drafter: str | None, mmproj: str | None, plan_file: str | None, vram: str | None,
              ctx: int | None, n_gpu_layers: int | None, draft_max: int | None, port: int | None, gpu_buffer: str,
              as_json: bool) -> None:
    """Print the llama-server command line for a target + drafter (+ projector), from a plan.

    \b
    gguf-mtp serve-cmd --target gemma-4-31B-it-Q4_K_M.gguf --drafter mtp-31B-Q8_0.gguf --plan plan.json
    """
    import shlex

    from . import render
    from .pairing import require_compatible

    settings = _set_settings(plan_file, vram, ctx, n_gpu_layers, draft_max, need_ctx=False,
                             files=(target, drafter, mmproj))
    tf, df, pf = _set_facts(target, drafter, mmproj)
    require_compatible(tf, df, pf)
    draft_default, source = _draft_choice(settings, tf)
    fixed = plan_file is not None or vram is not None
    argv = ["llama-server", *render.server_args(settings, target, drafter, mmproj, port, fixed, draft_default,
                                                 gpu_buffer)]
    why = render.FIT_OFF_REASON if fixed else render.FIT_ON_REASON
    if as_json:
        print_json({"command": shlex.join(argv), "argv": argv, "fit_off": fixed, "why": why,
                    "draft_length": render.draft_length(settings, draft_default) if drafter else None,
                    "draft_length_source": source if drafter else None, "settings": settings.to_dict()})
        return
    click.echo(shlex.join(argv))
    click.echo(f"# {why}", err=True)
    if plan_file is None and ctx is None:
        click.echo(f"# -c {settings.n_ctx}: gguf-mtp's default context (pass --ctx N or --plan FILE)", err=True)
    if drafter:
        click.echo(f"# --spec-draft-n-max {render.draft_length(settings, draft_default)}: {source}", err=True)
    else:
        click.echo("# no --drafter: the server runs without MTP", err=True)


# --- quantize, quantize-pair, inspect, check (gguf_mtp/quantize.py, inspect.py, check.py) -------------------
def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _quant_progress(enabled: bool):
    """A rich progress bar on stderr fed by llama.cpp's per-tensor log lines (only on a terminal)."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not enabled or not err_console.is_terminal:
        return contextlib.nullcontext(None)

    class _Bar:
        def __init__(self) -> None:
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              console=err_console, transient=True)
            self.tasks: dict[str, Any] = {}

        def __enter__(self):
            self.p.__enter__()
            return self

        def __exit__(self, *exc):
            return self.p.__exit__(*exc)

        def __call__(self, role: str, done: int, total: int, name: str) -> None:
            if role not in self.tasks:
                self.tasks[role] = self.p.add_task(role, total=total)
            self.p.update(self.tasks[role], completed=done, description=f"{role} {name}")

    return _Bar()


def _print_quant_result(res: Any, label: str = "") -> None:
    where = "dry run (nothing written)" if res.dry_run else f"wrote {res.dst}"
    click.echo(f"{label}{where}: {_size(res.src_file_bytes)} -> {'~' if res.dry_run else ''}"
               f"{_size(res.dst_file_bytes)} as {res.qtype}, {res.bits_per_weight:.2f} bits/weight, "
               f"{len(res.tensors)} tensors in {res.seconds:.2f} s")
    print_table(f"{label}tensors by type", ["type", "tensors", "bytes"],
                [[t, d["tensors"], _size(d["bytes"])] for t, d in res.by_type().items()])
    if res.kept:
        click.echo(f"{label}kept at source type (drafter rule): {', '.join(res.kept)}")


def _preset_help() -> str:
    from .quanttypes import PRESETS

    return "TYPE is a llama.cpp preset: " + ", ".join(PRESETS)


@main.command("quantize", epilog=_preset_help())
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.argument("qtype", metavar="TYPE")
@click.option("--output-tensor-type", metavar="TYPE", help="ggml type for output.weight (e.g. q8_0).")
@click.option("--token-embedding-type", metavar="TYPE", help="ggml type for token_embd.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="PATTERN=TYPE",
              help="Type for tensors whose name matches the regex PATTERN (repeatable; first match wins).")
@click.option("--imatrix", type=click.Path(dir_okay=False), help="Importance matrix GGUF from llama-imatrix.")
@click.option("--threads", type=int, help="Quantizer threads (default: all cores).")
@click.option("--allow-requantize", is_flag=True, help="Allow quantizing tensors that are already quantized.")
@click.option("--dry-run", is_flag=True, help="Compute sizes only; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite DST.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quantize_cmd(src, dst, qtype, output_tensor_type, token_embedding_type, tensor_types, imatrix, threads,
                 allow_requantize, dry_run, force, as_json) -> None:
    """Quantize SRC to DST with llama.cpp's quantizer (llama-quantize's presets and rules).

    Example: gguf-mtp quantize gemma-4-31b-f16.gguf gemma-4-31b-Q4_K_M.gguf Q4_K_M
    """
    from .quantize import quantize

    with _quant_progress(not as_json) as bar:
        res = quantize(src, dst, qtype, output_tensor_type=output_tensor_type,
                       token_embedding_type=token_embedding_type, tensor_types=tensor_types, imatrix=imatrix,
                       threads=threads, dry_run=dry_run, force=force, allow_requantize=allow_requantize,
                       progress=(lambda d, n, name: bar("quantize", d, n, name)) if bar else None)
    if as_json:
        print_json(res.to_dict())
    else:
        _print_quant_result(res)


@main.command("quantize-pair", epilog=_preset_help())
@click.argument("target", type=click.Path(dir_okay=False))
@click.argument("drafter", type=click.Path(dir_okay=False))
@click.argument("qtype", metavar="TYPE")
@click.option("-o", "--out-dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--drafter-type", default="Q8_0", show_default=True, metavar="TYPE", help="Preset for the drafter.")
@click.option("--imatrix", type=click.Path(dir_okay=False), help="Importance matrix GGUF (target only).")
@click.option("--threads", type=int)
@click.option("--allow-requantize", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Compute sizes only; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True)
def quantize_pair_cmd(target, drafter, qtype, out_dir, drafter_type, imatrix, threads, allow_requantize, dry_run,
                      force, as_json) -> None:
    """Quantize a target (as TYPE) and its MTP drafter (as --drafter-type) into a directory, both or neither.

    Output names replace a type tag in the input name: gemma-4-e4b-f16.gguf -> gemma-4-e4b-Q4_K_M.gguf.
    """
    from .quantize import quantize_pair

    with _quant_progress(not as_json) as bar:
        res = quantize_pair(target, drafter, qtype, out_dir, drafter_type=drafter_type, imatrix=imatrix,
                            threads=threads, dry_run=dry_run, force=force, allow_requantize=allow_requantize,
                            progress=bar)
    if as_json:
        print_json(res.to_dict())
    else:
        _print_quant_result(res.target, "target: ")
        _print_quant_result(res.drafter, "drafter: ")


def _print_inspection(ins: Any) -> None:
    rows = [["file", ins.path], ["size", _size(ins.file_bytes)], ["architecture", ins.arch], ["role", ins.role],
            ["file type", ins.file_type or "-"], ["GGUF version", ins.gguf_version], ["metadata keys", ins.n_kv],
            ["tensors", ins.n_tensors], ["parameters", f"{ins.n_params:,}"],
            ["tensor data", f"{_size(ins.tensor_bytes)} ({ins.bits_per_weight:.2f} bits/weight)"],
            ["vocabulary", ins.n_vocab if ins.n_vocab is not None else "-"]]
    print_table(os.path.basename(ins.path), ["", "value"], rows)
    if ins.metadata:
        print_table("key metadata", ["key", "value"], [[k, _short(v)] for k, v in ins.metadata.items()])
    print_table("bytes by type", ["type", "tensors", "parameters", "bytes"],
                [[s.type, s.tensors, f"{s.params:,}", _size(s.bytes)] for s in ins.by_type])
    print_table("per layer", ["layer", "tensors", "parameters", "bytes"],
                [[s.layer, s.tensors, f"{s.params:,}", _size(s.bytes)] for s in ins.layers])
    print_table("provenance (gguf_mtp.*)", ["key", "value"],
                [[k, _short(v)] for k, v in ins.provenance.items()] or [["(none)", "not written by gguf-mtp"]])
    if ins.tensors is not None:
        print_table("tensors", ["name", "type", "shape", "bytes", "offset"],
                    [[t["name"], t["type"], "x".join(map(str, t["shape"])), _size(t["bytes"]), t["offset"]]
                     for t in ins.tensors])


def _short(v: Any, limit: int = 80) -> str:
    s = json.dumps(v) if isinstance(v, list) else str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


@main.command("inspect")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per file.")
def inspect_cmd(files, tensors, as_json) -> None:
    """Show what GGUF files hold: role, key metadata, parameters, bytes by type and per layer, provenance.

    Reads headers only (memory-mapped), so it is fast on any size of file.
    """
    from .inspect import inspect_gguf

    results = [inspect_gguf(f, tensors=tensors) for f in files]
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    for r in results:
        _print_inspection(r)


@main.command("check")
@click.argument("target", type=click.Path(dir_okay=False))
@click.argument("drafter", type=click.Path(dir_okay=False))
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Vision projector file to check as well.")
@click.option("--runtime-centroids/--no-runtime-centroids", default=None,
              help="Whether the runtime has our centroid-head patch (default: auto-detect).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check_cmd(ctx, target, drafter, mmproj, runtime_centroids, as_json) -> None:
    """Check that TARGET, DRAFTER (and --mmproj) can run together. Exit 0 if so, 1 if not.

    Prints one line per problem, "field: message" (field names are stable; see docs/contracts.md).
    """
    from .check import check_files

    report = check_files(target, drafter, mmproj, runtime_centroids)
    if as_json:
        print_json(report.to_dict())
    elif report.compatible:
        click.echo(f"compatible: {target} + {drafter}" + (f" + {mmproj}" if mmproj else ""))
    else:
        for p in report.problems:
            click.echo(str(p))
    if not report.compatible:
        ctx.exit(1)


# --- generate: the speculative loop on llama-cpp-python -------------------------------------------------------

import contextlib  # noqa: E402

from .settings import KV_TYPES as _KV_TYPES  # noqa: E402  (light: no llama.cpp import)


def _runtime_options(f: Any) -> Any:
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
        click.option("--cache-type-k", type=click.Choice(_KV_TYPES), help="K cache type."),
        click.option("--cache-type-v", type=click.Choice(_KV_TYPES),
                     help="V cache type (quantized needs flash attention)."),
        click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), help="Flash attention."),
        click.option("--swa-full/--no-swa-full", default=None, help="Full-size sliding-window cache."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _runtime_settings(plan_file: str | None, ctx: int | None, n_gpu_layers: int | None, override_tensor: tuple,
                      n_cpu_moe: int | None, drafter_cpu: bool | None, batch_size: int | None,
                      ubatch_size: int | None, cache_type_k: str | None, cache_type_v: str | None,
                      flash_attn: str | None, swa_full: bool | None, threads: int | None) -> Any:
    from .settings import RuntimeSettings, load_plan_settings

    base = load_plan_settings(plan_file) if plan_file else RuntimeSettings()
    overrides = None
    if override_tensor:
        overrides = list(base.tensor_overrides)
        for item in ",".join(override_tensor).split(","):
            pattern, sep, device = item.rpartition("=")
            if not sep or not pattern:
                raise GgufMtpError(f"--override-tensor: expected PATTERN=CPU|GPU, got {item!r}")
            overrides.append((pattern, device.upper()))
    return base.replace(n_ctx=ctx, n_gpu_layers=n_gpu_layers, tensor_overrides=overrides, n_cpu_moe=n_cpu_moe,
                        drafter_on_gpu=None if drafter_cpu is None else not drafter_cpu, n_batch=batch_size,
                        n_ubatch=ubatch_size, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                        flash_attn=flash_attn, swa_full=swa_full, threads=threads)


@contextlib.contextmanager
def _log_to_stderr(verbose: bool) -> Any:
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


def _decode_options(f: Any) -> Any:
    """Sampling and draft-length flags, shared by generate and chat."""
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


@main.command("generate")
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("-p", "--prompt", help="Prompt text (rendered as one user turn unless --raw).")
@click.option("--prompt-tokens", metavar="IDS", help="Prompt as comma-separated token ids (no template).")
@click.option("-n", "--max-tokens", default=128, show_default=True, type=click.IntRange(min=0),
              help="Tokens to generate.")
@_decode_options
@click.option("--no-drafter", is_flag=True, help="Target alone (for comparison).")
@click.option("--allow-no-drafter", is_flag=True, help="Go on without the drafter if it cannot be loaded.")
@click.option("--raw", is_flag=True, help="Send the prompt text as is, without the chat template.")
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens", "text", "stats"} as JSON.')
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log on stderr.")
def generate_cmd(target, drafter, prompt, prompt_tokens, max_tokens, temp, top_k, top_p, min_p, seed, accept,
                 draft_max, adaptive, draft_cap, no_drafter, allow_no_drafter, raw, as_json, verbose,
                 **runtime) -> None:
    """Generate from TARGET with speculative decoding by the MTP DRAFTER.

    \b
    Examples:
      gguf-mtp generate --target t.gguf --drafter d.gguf -p "Why is the sky blue?" -n 200
      gguf-mtp generate --target t.gguf --drafter d.gguf --prompt-tokens 2,105,9 --draft-max 3 --json
    """
    import codecs
    import dataclasses

    from .runtime.chat_template import user_prompt
    from .runtime.engine import Engine
    from .runtime.loop import make_chooser, speculative_generate
    from .runtime.sampling import SamplingParams
    from .runtime.stats import Stats

    if (prompt is None) == (prompt_tokens is None):
        raise GgufMtpError("give exactly one of -p/--prompt and --prompt-tokens")
    if draft_max is not None and (adaptive or draft_cap is not None):
        raise GgufMtpError("--draft-max fixes the draft length; drop --adaptive/--draft-cap")
    settings = _runtime_settings(**runtime)
    if draft_max is not None:
        settings = settings.replace(draft_max=draft_max)
    elif adaptive or draft_cap is not None:
        settings = dataclasses.replace(settings, draft_max=None, draft_cap=draft_cap or settings.draft_cap)
    with _log_to_stderr(verbose), Engine.load(target, None if no_drafter else drafter, settings,
                                              allow_no_drafter=allow_no_drafter) as eng:
        if prompt_tokens is not None:
            try:
                tokens = [int(t) for t in prompt_tokens.replace(" ", "").split(",") if t]
            except ValueError:
                raise GgufMtpError(f"--prompt-tokens: expected comma-separated integers, "
                                   f"got {prompt_tokens!r}") from None
            bad = [t for t in tokens if not 0 <= t < eng.n_vocab]
            if bad or not tokens:
                raise GgufMtpError(f"--prompt-tokens: expected ids in 0..{eng.n_vocab - 1}, got {bad or 'none'}")
        else:
            tokens = eng.tokenize(prompt) if raw else user_prompt(eng, prompt)
        sampling = SamplingParams(temp, top_k, top_p, min_p, seed)
        stats = Stats()
        out: list[int] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for r in speculative_generate(eng, tokens, max_tokens=max_tokens, sampling=sampling, accept=accept,
                                      chooser=make_chooser(eng), stats=stats):
            out += r.tokens
            if not as_json:
                click.echo(decoder.decode(b"".join(eng.piece(t) for t in r.tokens)), nl=False)
        if as_json:
            print_json({"tokens": out, "text": eng.detokenize(out), "prompt_tokens": len(tokens),
                        "drafter": str(eng.drafter_path) if eng.has_drafter else None,
                        "drafter_problem": eng.drafter_problem, "stats": stats.to_dict()})
            return
        click.echo(decoder.decode(b"", final=True))
        s = stats
        click.echo(f"{s.tokens} tokens, {s.tokens_per_second:.1f} tok/s, {s.rounds} rounds, drafts kept "
                   f"{s.accepted}/{s.proposed} ({100 * s.acceptance_rate:.0f}%), {s.mean_accepted_length:.2f} "
                   f"tokens/round, stop: {s.stop_reason}", err=True)


# --- runtime: our patched llama-cpp-python -----------------------------------------------------------
@main.group("runtime")
def runtime_group() -> None:
    """The llama-cpp-python runtime: build ours from patches/llama.cpp, or show what is loaded."""


@runtime_group.command("build")
@click.option("--cuda", is_flag=True, help="Build the CUDA backend (-DGGML_CUDA=on).")
@click.option("--cuda-arch", metavar="ARCHS", help="CMAKE_CUDA_ARCHITECTURES, e.g. 86 or '86;89' (default: CMake's).")
@click.option("--jobs", "-j", type=click.IntRange(1), help="Parallel compile jobs (default: all cores).")
@click.option("--force", is_flag=True, help="Rebuild even if a wheel of this patch series is cached.")
@click.option("--no-install", is_flag=True, help="Only build (and cache) the wheel.")
@click.option("--sdist", type=click.Path(exists=True, dir_okay=False), help="Use this llama-cpp-python 0.3.36 sdist "
              "archive instead of downloading it.")
def runtime_build_cmd(cuda: bool, cuda_arch: str | None, jobs: int | None, force: bool, no_install: bool,
                      sdist: str | None) -> None:
    """Build llama-cpp-python 0.3.36 with our llama.cpp patches and install it as 0.3.36+gguf_mtp.N.

    The sdist is downloaded once; the build directory and the wheels live in the cache ($GGUF_MTP_CACHE, default
    ~/.cache/gguf-mtp), so a changed patch recompiles only what it touches and an unchanged series reinstalls the
    cached wheel. Before gguf-mtp is installed, python3 tools/build_runtime.py does the same.

    \b
    Examples:
      gguf-mtp runtime build --jobs 4
      gguf-mtp runtime build --cuda --cuda-arch 86
    """
    from pathlib import Path

    from .runtime_build import build_runtime

    r = build_runtime(cuda=cuda, cuda_arch=cuda_arch, jobs=jobs, force=force, install=not no_install,
                      sdist=Path(sdist) if sdist else None)
    how = f"built ({r.files_changed} source files changed)" if r.built else "taken from the cache"
    click.echo(f"llama-cpp-python {r.version} [{r.variant}] {how}: {r.wheel}")
    click.echo("installed" if r.installed else "not installed (--no-install)")


@runtime_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def runtime_info_cmd(as_json: bool) -> None:
    """Which llama-cpp-python is loaded, its backends and devices, and which of our patches it carries."""
    from .runtime_build import runtime_info

    info = runtime_info()
    if as_json:
        print_json(info.to_dict())
        return
    if not info.installed:
        raise GgufMtpError("llama-cpp-python is not installed (python3 tools/build_runtime.py build)")
    rows = [["llama-cpp-python", info.llama_cpp_python], ["library", info.library],
            ["backends", ", ".join(info.backends) or "unknown"], ["GPU offload", "yes" if info.gpu_offload else "no"],
            ["gguf-mtp patches", ", ".join(info.patches) if info.patched else "none (stock build)"],
            ["centroid-head drafters", "yes" if info.centroid_head else "no"]]
    if info.expected_series is not None:
        rows.append(["this checkout's series", f"gguf_mtp.{info.expected_series}: {', '.join(info.expected_patches)}"
                     + ("" if info.up_to_date else " (not the loaded one: gguf-mtp runtime build)")])
    rows += [[f"device {i}", f"{d['name']} ({d['type']}, {d['backend']}): {d['description']}"]
             for i, d in enumerate(info.devices)]
    print_table("runtime", ["", "value"], rows)


# --- convert: Hugging Face checkpoint -> GGUF (gguf_mtp/export) --------------------------------------------------
def _convert_progress(enabled: bool):
    """A rich bar on stderr (tensors and bytes) fed by the exporter's progress callback; terminal only."""
    import contextlib

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    if not enabled or not err_console.is_terminal:
        return contextlib.nullcontext(None)

    class _Bar:
        def __enter__(self):
            self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                              console=err_console, transient=True)
            self.p.__enter__()
            self.task = self.p.add_task("converting", total=None)
            return self

        def __exit__(self, *exc):
            return self.p.__exit__(*exc)

        def __call__(self, ev: Any) -> None:
            self.p.update(self.task, total=ev.bytes_total, completed=ev.bytes_done,
                          description=f"tensor {min(ev.done + 1, ev.total)}/{ev.total} {ev.tensor}")

    return _Bar()


@main.command("convert")
@click.argument("src")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--outtype", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default="auto", show_default=True,
              help="Tensor type (auto: the checkpoint's dtype). Norms and 1-D tensors stay F32.")
@click.option("--target", metavar="TARGET", help="Drafters and --mmproj: the target (GGUF, directory or cached repo "
              "id) to pair-check against before writing.")
@click.option("--centroids", is_flag=True, help="Drafters: keep the centroid head (only our patched llama.cpp loads it).")
@click.option("--mmproj", is_flag=True, help="Write the vision projector (clip, gemma4v) of a multimodal target "
              "instead of its text model.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_cmd(src: str, output: str, outtype: str, target: str | None, centroids: bool, mmproj: bool, force: bool,
                as_json: bool) -> None:
    """Convert a Hugging Face Gemma 4 checkpoint (target, MTP drafter or, with --mmproj, the vision projector)
    to GGUF.

    SRC is a checkpoint directory or a repo id already in the local Hugging Face cache (HF_HOME /
    HF_HUB_CACHE; nothing is downloaded). What SRC is comes from its config.json.

    \b
    gguf-mtp convert google/gemma-4-E2B-it -o gemma-4-E2B-it-BF16.gguf
    gguf-mtp convert google/gemma-4-E2B-it --mmproj -o mmproj-gemma-4-E2B-it-F16.gguf --outtype f16
    gguf-mtp convert ./gemma-4-E2B-it-assistant -o mtp-E2B-F16.gguf --outtype f16 --target gemma-4-E2B-it-BF16.gguf
    """
    from .export import convert

    if mmproj and centroids:
        raise GgufMtpError("--centroids belongs to drafters; --mmproj writes a projector")
    with _convert_progress(not as_json) as bar:
        if mmproj:
            from .export.projector import convert_projector

            res = convert_projector(src, output, outtype=outtype, target=target, force=force, progress=bar)
        else:
            res = convert(src, output, outtype=outtype, target=target, centroids=centroids, force=force, progress=bar)
    if as_json:
        print_json(res.to_dict())
        return
    traits = f", {', '.join(res.features)}" if res.features else ""
    click.echo(f"wrote {res.output}: {res.arch} {res.role} ({res.kind}{traits}), {res.n_tensors} tensors, "
               f"{_size(res.n_bytes)}, {res.outtype}")
    for why, n in res.ignored.items():
        click.echo(f"note: left out {n} checkpoint tensor(s): {why}", err=True)
    if res.paired_with:
        click.echo(f"pair check passed against {res.paired_with}", err=True)


# --- plan, skeleton (gguf_mtp/plan.py, skeleton.py) --------------------------------------------------------
@main.command("plan")
@click.option("--target", type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Vision projector GGUF (clip).")
@click.option("--variant", metavar="NAME", help="Plan a registry variant before download (E2B, E4B, 26B-A4B, 31B).")
@click.option("--quant", metavar="TYPE", help="--variant: target quant (default: the registry's recommendation).")
@click.option("--drafter-quant", metavar="TYPE", help="--variant: drafter quant (default: the registry's).")
@click.option("--no-drafter", is_flag=True, help="--variant: plan the target without its MTP drafter.")
@click.option("--vision", is_flag=True, help="--variant: include the vision projector (F16).")
@click.option("--vram", default="24GiB", show_default=True, help="GPU memory budget (24GiB, 24GB, 16000MiB).")
@click.option("--margin", default="1GiB", show_default=True, help="Kept free on the GPU (CUDA context, fragmentation).")
@click.option("--ram", help="Host RAM budget for what stays on the CPU (default: not checked).")
@click.option("--ctx", type=click.IntRange(min=256), help="Fixed context length (default: the largest that fits).")
@click.option("--max-ctx", is_flag=True, help="The largest context that fits (the default without --ctx).")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), help="KV cache type (default: chosen).")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--image-tokens", type=click.IntRange(min=1), default=1120, show_default=True,
              help="Largest image (soft tokens) the projector's compute buffer is sized for.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the plan JSON here.")
@click.option("--force", is_flag=True, help="Overwrite --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(target, drafter, mmproj, variant, quant, drafter_quant, no_drafter, vision, vram, margin, ram, ctx,
             max_ctx, kv_type, flash_attn, image_tokens, output, force, as_json) -> None:
    """Fit a Gemma 4 target + MTP drafter + vision projector into a VRAM budget.

    Chooses n_gpu_layers, which tensors go to the CPU (MoE experts first), projector and drafter placement,
    the KV cache type and the largest context that fits -- or says what does not fit and by how much. The
    JSON plan's `runtime` member is what `generate` / `chat --plan` read.

    \b
    gguf-mtp plan --variant 31B --quant Q4_K_M --drafter-quant Q8_0 --vision --vram 24GiB
    gguf-mtp plan --target t.gguf --drafter d.gguf --mmproj m.gguf --ctx 32768 -o plan.json
    """
    from . import fsutil
    from . import plan as planner

    if bool(target) == bool(variant):
        raise GgufMtpError("give either --target FILE (with --drafter/--mmproj) or --variant NAME")
    if variant and (drafter or mmproj):
        raise GgufMtpError("--drafter/--mmproj name files; with --variant use --drafter-quant / --vision")
    if target and (quant or drafter_quant or vision or no_drafter):
        raise GgufMtpError("--quant/--drafter-quant/--vision/--no-drafter go with --variant, not --target")
    if ctx and max_ctx:
        raise GgufMtpError("give --ctx N or --max-ctx, not both")
    if output:
        fsutil.check_output_path(output, force)
    if variant:
        files = planner.files_from_variant(variant, quant, drafter_quant, drafter=not no_drafter, vision=vision)
    else:
        files = planner.files_from_paths(target, drafter, mmproj)
    req = planner.Request(files, planner.parse_size(vram), planner.parse_size(margin),
                          planner.parse_size(ram) if ram else None, n_ctx=ctx, max_ctx=max_ctx, kv_type=kv_type,
                          flash_attn=flash_attn, image_tokens=image_tokens)
    if req.vram <= req.margin:
        raise GgufMtpError(f"--vram ({vram}) must be larger than --margin ({margin})")
    p = planner.plan(req)
    doc = p.to_dict()
    if as_json:
        print_json(doc)
    if not p.fits:
        raise GgufMtpError(planner.shortfall_message(p))
    if output:
        with fsutil.atomic_output(output, force) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    if as_json:
        return
    s = p.settings
    title = (f"plan: {files.target.source} ({files.target.quant})"
             + (f" + drafter ({files.drafter.quant})" if files.drafter else "")
             + (" + projector" if files.mmproj else ""))
    print_table(title, ["device", "component", "size"], planner.table_rows(p))
    placement = "all layers" if s.n_gpu_layers < 0 else f"{s.n_gpu_layers} of {files.target.n_layer + 1} layers"
    click.echo(f"context {s.n_ctx} tokens, KV cache {s.cache_type_k}, flash attention {s.flash_attn}; GPU: "
               f"{placement}" + (f", MoE experts of {s.n_cpu_moe} layers on the CPU" if s.n_cpu_moe else "")
               + ("" if s.mmproj_on_gpu or not files.mmproj else ", projector on the CPU")
               + ("" if s.drafter_on_gpu or not files.drafter else ", drafter on the CPU"))
    click.echo(f"llama-server: {doc['llama_server']}")
    params = " ".join(f"{k}={v}" for k, v in doc["ollama"]["parameters"].items())
    click.echo(f"Ollama PARAMETERs: {params}")
    for note in doc["ollama"]["not_expressible"]:
        click.echo(f"  # {note}")
    if output:
        click.echo(f"wrote {output}", err=True)


@main.command("skeleton")
@click.argument("variant")
@click.option("--quant", metavar="TYPE", help="Quant type (llama.cpp's per-tensor mix via its quantizer's dry run).")
@click.option("--role", type=click.Choice(["target", "drafter", "mmproj"]), default="target", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output GGUF.")
@click.option("--force", is_flag=True, help="Overwrite --output.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def skeleton_cmd(variant: str, quant: str | None, role: str, output: str, force: bool, as_json: bool) -> None:
    """Write a full-size GGUF whose data region is a sparse hole (real metadata and tensor layout, no disk used).

    For planning and testing against llama.cpp (no_alloc loads, quantizer dry runs) without the weights.

    \b
    gguf-mtp skeleton 31B --quant Q4_K_M -o /tmp/31B-Q4_K_M.gguf
    gguf-mtp skeleton E2B --role drafter --quant Q8_0 -o /tmp/E2B-mtp.gguf
    """
    from .skeleton import make_skeleton

    path, layout, size = make_skeleton(variant, output, quant, role, force)
    disk = os.stat(path).st_blocks * 512
    if as_json:
        print_json({"path": str(path), "arch": layout.arch, "role": role, "quant": quant, "tensors": len(layout.tensors),
                    "apparent_bytes": size, "disk_bytes": disk, "tensor_bytes": layout.n_bytes})
        return
    click.echo(f"wrote {path}: {layout.arch} {role}{' ' + quant if quant else ''}, {len(layout.tensors)} tensors, "
               f"{_size(size)} apparent, {_size(disk)} on disk")


# --- chat: a multi-turn REPL over the speculative loop (gguf_mtp/runtime/chat.py, multimodal.py) ---------------
CHAT_COMMANDS = "/image PATH (attach to your next message), /reset, /stats, /exit"


def _chat_status(s: Any, seconds: float) -> str:
    rate = s.tokens / seconds if seconds > 0 else 0.0
    drafts = (f"drafts kept {s.accepted}/{s.proposed} ({100 * s.acceptance_rate:.0f}%)" if s.proposed
              else "no drafts")
    return f"{s.tokens} tokens, {rate:.1f} tok/s, {drafts}"


def _chat_summary(reply: Any) -> str:
    s = reply.stats
    image = f", {reply.image_tokens} image tokens encoded" if reply.image_tokens else ""
    return (f"[{_chat_status(s, s.generate_time)}, {s.mean_accepted_length:.2f} tokens/round; prompt "
            f"{reply.prompt_tokens} tokens: {s.prefill_tokens} read, {s.reused_tokens} cached{image}; "
            f"stop: {s.stop_reason}]")


class _ChatView:
    """The reply as it streams. On a terminal: a rich Live region (the reply's last screenful and a live status
    line), replaced by the whole reply when the turn ends; elsewhere plain text as it comes."""

    def __init__(self, session: Any, hide_thoughts: bool) -> None:
        from rich.text import Text

        self.session, self.hide = session, hide_thoughts
        self.live_mode = console.is_terminal
        self.text = Text()
        self.t0: float | None = None
        self.live = None
        self.thinking = False

    def __enter__(self) -> _ChatView:
        if self.live_mode:
            from rich.live import Live

            self.live = Live(self._render(), console=console, transient=True, refresh_per_second=8)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            console.print(self.text, soft_wrap=True)
        elif self.text:
            click.echo("")

    def _render(self) -> Any:
        import time

        from rich.console import Group
        from rich.text import Text

        width, height = console.size
        lines, start = 0, len(self.text.plain)
        for line in reversed(self.text.plain.split("\n")):  # keep the last screenful
            lines += max(1, -(-len(line) // max(1, width)))
            if lines > max(1, height - 2):
                break
            start -= len(line) + 1
        seconds = time.perf_counter() - self.t0 if self.t0 else 0.0
        status = Text(_chat_status(self.session.stats, seconds), style="dim")
        return Group(self.text[max(0, start):], status)

    def piece(self, text: str, thought: bool) -> None:
        import time

        if self.t0 is None:
            self.t0 = time.perf_counter()
        if thought and self.hide:
            return
        if self.thinking and not thought:  # the answer starts on its own line
            text = "\n" + text.lstrip("\n")
        self.thinking = thought
        self.text.append(text, style="dim" if thought else None)
        if self.live is not None:
            self.live.update(self._render())
        else:
            click.echo(text, nl=False)


def _chat_turn(session: Any, text: str, image: Any, hide_thoughts: bool) -> None:
    from .runtime.chat import Notice, Reply, Text

    reply = None
    with _ChatView(session, hide_thoughts) as view:
        events = session.send(text, image)
        try:
            for ev in events:
                if isinstance(ev, Text):
                    view.piece(ev.text, ev.thought)
                elif isinstance(ev, Notice):
                    click.echo(f"note: {ev.message}", err=True)
                elif isinstance(ev, Reply):
                    reply = ev
        except KeyboardInterrupt:
            events.close()  # the partial reply stays in the conversation
            click.echo("\n(interrupted)", err=True)
    if reply is not None:
        err_console.print(_chat_summary(reply), style="dim", markup=False, highlight=False, soft_wrap=True)


def _chat_stats(session: Any) -> None:
    rows, total = [], [0] * 5
    for i, s in enumerate(session.history, 1):
        vals = [s.prefill_tokens, s.reused_tokens, s.tokens, s.proposed, s.accepted]
        total = [a + b for a, b in zip(total, vals)]
        rows.append([i, *vals[:3], f"{s.tokens_per_second:.1f}", *vals[3:5], f"{100 * s.acceptance_rate:.0f}%"])
    rate = f"{100 * total[4] / total[3]:.0f}%" if total[3] else "0%"
    rows.append(["all", *total[:3], "", *total[3:5], rate])
    print_table("chat turns", ["turn", "prefill", "cached", "tokens", "tok/s", "drafted", "kept", "acceptance"],
                rows)


@main.command("chat")
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Vision projector GGUF (clip), for images.")
@click.option("--system", help="System prompt.")
@click.option("--think", is_flag=True, help="Gemma 4 thinking mode (<|think|> in the system turn).")
@click.option("--hide-thoughts", is_flag=True, help="Do not show the thinking part of replies.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), help="An image for the first message "
              "(needs --mmproj; later: /image PATH).")
@click.option("-n", "--max-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Tokens per reply at most.")
@_decode_options
@click.option("--allow-no-drafter", is_flag=True, help="Go on without the drafter if it cannot be loaded.")
@_runtime_options
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log on stderr.")
def chat_cmd(target, drafter, mmproj, system, think, hide_thoughts, image_path, max_tokens, temp, top_k, top_p,
             min_p, seed, accept, draft_max, adaptive, draft_cap, allow_no_drafter, verbose, **runtime) -> None:
    """Chat with TARGET (+ MTP DRAFTER, + vision projector) in a REPL reading stdin line by line.

    The conversation is rendered with the GGUF's chat template each turn and the KV cache is reused, so a turn
    reads only what is new; when the context fills, the oldest turns after the system prompt are dropped.
    Commands: /image PATH (attach to your next message), /reset, /stats, /exit.

    \b
    Examples:
      gguf-mtp chat --target t.gguf --drafter d.gguf --system "Be brief." --think
      gguf-mtp chat --target t.gguf --drafter d.gguf --mmproj m.gguf --image cat.png --plan plan.json
      printf 'hi\\n/stats\\n' | gguf-mtp chat --target t.gguf --drafter d.gguf -n 64
    """
    import dataclasses
    from pathlib import Path

    from .pairing import facts_from_gguf, require_compatible
    from .runtime.chat import ChatSession
    from .runtime.engine import Engine
    from .runtime.multimodal import Projector
    from .runtime.sampling import SamplingParams

    if draft_max is not None and (adaptive or draft_cap is not None):
        raise GgufMtpError("--draft-max fixes the draft length; drop --adaptive/--draft-cap")
    if image_path is not None and mmproj is None:
        raise GgufMtpError("--image needs a vision projector: add --mmproj FILE")
    if image_path is not None and not Path(image_path).is_file():
        raise GgufMtpError(f"image {image_path} does not exist")
    settings = _runtime_settings(**runtime)
    if draft_max is not None:
        settings = settings.replace(draft_max=draft_max)
    elif adaptive or draft_cap is not None:
        settings = dataclasses.replace(settings, draft_max=None, draft_cap=draft_cap or settings.draft_cap)
    if mmproj is not None:  # the whole set, before any weights load
        require_compatible(facts_from_gguf(target), facts_from_gguf(drafter) if drafter else None,
                           facts_from_gguf(mmproj))
    stdin = sys.stdin
    interactive = stdin.isatty()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_log_to_stderr(verbose))
        eng = stack.enter_context(Engine.load(target, drafter, settings, allow_no_drafter=allow_no_drafter))
        proj = stack.enter_context(Projector.load(mmproj, eng)) if mmproj else None
        session = ChatSession(eng, projector=proj, system=system, think=think,
                              sampling=SamplingParams(temp, top_k, top_p, min_p, seed), accept=accept,
                              max_tokens=max_tokens)
        stack.callback(session.close)
        pending = proj.load_image(image_path) if image_path else None
        if interactive:
            what = "MTP drafter" if eng.has_drafter else "no drafter"
            err_console.print(f"[dim]{Path(target).name} ({what}{', vision' if proj else ''}), context "
                              f"{eng.n_ctx}. Commands: {CHAT_COMMANDS}. Ctrl-D quits.[/dim]", highlight=False)
        while True:
            if interactive:
                console.print("[bold]>[/bold] ", end="")
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                break
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/"):
                    cmd, _, arg = text.partition(" ")
                    if cmd in ("/exit", "/quit"):
                        break
                    if cmd == "/reset":
                        session.reset()
                        click.echo("(conversation cleared)", err=True)
                    elif cmd == "/stats":
                        _chat_stats(session)
                    elif cmd == "/image":
                        if proj is None:
                            raise GgufMtpError("/image needs a vision projector: restart with --mmproj FILE")
                        if not arg.strip():
                            raise GgufMtpError("/image: expected a file name")
                        pending = proj.load_image(arg.strip())
                        click.echo(f"(image {pending.source}, {pending.width}x{pending.height}: it goes with your "
                                   f"next message)", err=True)
                    else:
                        raise GgufMtpError(f"unknown command {cmd}; commands: {CHAT_COMMANDS}")
                    continue
                image, pending = pending, None
                _chat_turn(session, text, image, hide_thoughts)
            except GgufMtpError as e:
                if not interactive:
                    raise
                click.echo(f"error: {e}", err=True)


# --- demo, bench: the shipped trained pair end to end; side-by-side speed (gguf_mtp/demo.py, bench.py) ----------
@main.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where the GGUFs, plan.json and the Modelfile go "
              "(default: a new temporary directory, kept).")
@click.option("-n", "--max-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens generated per prompt.")
@click.option("--force", is_flag=True, help="Overwrite what an earlier demo left in --workdir.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
def demo_cmd(ctx, workdir: str | None, max_tokens: int, force: bool, as_json: bool) -> None:
    """Run the whole path on the small trained Gemma 4 pair that ships with gguf-mtp.

    convert -> quantize (target Q8_0, drafter Q8_0) -> check -> plan (24 GiB) -> generate with and without MTP
    -> an Ollama Modelfile and the llama-server command line. Exit 1 if a step failed.

    \b
    gguf-mtp demo
    gguf-mtp demo --workdir ./demo --json
    """
    from . import bench, demo

    def show(step: Any) -> None:
        click.echo(f"{step.status:>7}  {step.name}: {step.detail}")

    d = demo.run_demo(workdir, force=force, max_tokens=max_tokens, on_step=None if as_json else show)
    if as_json:
        print_json(d.to_dict())
    else:
        if d.bench is not None:
            print_table(f"{d.bench.prompts} held-out prompts x {max_tokens} tokens, target {demo.TARGET_QUANT}, "
                        f"drafter {demo.DRAFTER_QUANT}", bench.TABLE_COLUMNS, bench.table_rows(d.bench))
        if d.modelfile is not None:
            click.echo(f"Ollama: ollama create gemma4-mtp-demo -f {d.modelfile}")
        if d.llama_server is not None:
            click.echo(f"llama-server: {d.llama_server}")
        click.echo(f"files: {d.workdir}")
    if not d.ok:
        ctx.exit(1)


@main.command("bench")
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", required=True, type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="Prompts, one per line (\\n escapes "
              "for multi-line prompts); default: 4 excerpts of the trained pair's held-out Python text.")
@click.option("-n", "--max-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Tokens per prompt and mode.")
@click.option("--k-max", default=4, show_default=True, type=click.IntRange(0, 16), help="Fixed draft lengths 1..K.")
@click.option("--no-adaptive", is_flag=True, help="Leave out the adaptive draft length.")
@click.option("--oracle", is_flag=True, help="Add the oracle ceiling: drafts are the target's own greedy output.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Runs per prompt and mode; the fastest counts.")
@click.option("--chat", is_flag=True, help="Send each prompt as a user turn of the chat template (default: raw text).")
@click.option("--temp", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="Temperature (0: greedy).")
@click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")
@click.option("--accept", type=click.Choice(["exact", "rejection"]), default="exact", show_default=True,
              help="Draft acceptance rule.")
@_runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log on stderr.")
def bench_cmd(target, drafter, prompts_file, max_tokens, k_max, no_adaptive, oracle, repeats, chat, temp, seed,
              accept, as_json, verbose, **runtime) -> None:
    """Speed of TARGET alone vs MTP with DRAFTER at k = 1..K and adaptive, side by side in one run.

    Same prompts and token count for every mode (end-of-generation ignored), modes interleaved prompt by
    prompt; tokens/s counts generation after the prompt.

    \b
    gguf-mtp bench --target t.gguf --drafter d.gguf -n 256 --repeats 3
    gguf-mtp bench --target t.gguf --drafter d.gguf --prompts prompts.txt --oracle --json
    """
    from . import bench

    prompts = bench.read_prompts(prompts_file) if prompts_file else bench.heldout_prompts()
    settings = _runtime_settings(**runtime)
    with _log_to_stderr(verbose):
        r = bench.run_bench(target, drafter, prompts, max_tokens=max_tokens, ks=range(1, k_max + 1),
                            adaptive=not no_adaptive, oracle=oracle, settings=settings, repeats=repeats,
                            temperature=temp, seed=seed, accept=accept, chat=chat)
    if as_json:
        print_json(r.to_dict())
        return
    sampling = f"temperature {temp}, {accept} acceptance" if temp > 0 else "greedy"
    print_table(f"{r.prompts} prompts x {max_tokens} tokens, {sampling}, fastest of {repeats}", bench.TABLE_COLUMNS,
                bench.table_rows(r))
