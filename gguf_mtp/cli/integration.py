"""modelfile, serve-cmd: Ollama Modelfiles and llama-server command lines from one plan (gguf_mtp/ollama.py,
render.py)."""

from __future__ import annotations

import os
from typing import Any

import click

from ..errors import GgufMtpError
from .common import emit

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
    from ..settings import RuntimeSettings, load_plan_settings

    if plan_file is not None and vram is not None:
        raise GgufMtpError("give --plan FILE or --vram SIZE, not both")
    if vram is not None:
        from ..planning.search import plan_for_files, shortfall_message

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
    from ..pairing import facts_from_gguf

    return (facts_from_gguf(target), facts_from_gguf(drafter) if drafter else None,
            facts_from_gguf(mmproj) if mmproj else None)


def _draft_choice(settings: Any, target_facts: Any) -> tuple[int | None, str]:
    """The draft length to use when the settings are adaptive, and where the length comes from."""
    from .. import render

    if settings.draft_max is not None:
        return None, "fixed by the plan or --draft-max"
    n_layers = len(target_facts.layer_layout) or None
    rec = render.recommended_draft_length(target_facts.hidden_size, n_layers)
    if rec is not None:
        return rec, "the registry's recommendation for this target"
    return None, "llama-server's default (no registry variant has this target's shape)"


@click.command("modelfile")
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
    from .. import ollama, render
    from ..fsutil import atomic_output, check_output_path

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


@click.command("serve-cmd")
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

    from .. import render
    from ..pairing import require_compatible

    settings = _set_settings(plan_file, vram, ctx, n_gpu_layers, draft_max, need_ctx=False,
                             files=(target, drafter, mmproj))
    tf, df, pf = _set_facts(target, drafter, mmproj)
    require_compatible(tf, df, pf)
    draft_default, source = _draft_choice(settings, tf)
    fixed = plan_file is not None or vram is not None
    argv = ["llama-server", *render.server_args(settings, target, drafter, mmproj, port, fixed, draft_default,
                                                 gpu_buffer)]
    why = render.FIT_OFF_REASON if fixed else render.FIT_ON_REASON

    def show(doc: dict) -> None:  # the command line on stdout, why it looks so on stderr
        click.echo(doc["command"])
        click.echo(f"# {why}", err=True)
        if plan_file is None and ctx is None:
            click.echo(f"# -c {settings.n_ctx}: gguf-mtp's default context (pass --ctx N or --plan FILE)", err=True)
        if drafter:
            click.echo(f"# --spec-draft-n-max {render.draft_length(settings, draft_default)}: {source}", err=True)
        else:
            click.echo("# no --drafter: the server runs without MTP", err=True)

    emit({"command": shlex.join(argv), "argv": argv, "fit_off": fixed, "why": why,
          "draft_length": render.draft_length(settings, draft_default) if drafter else None,
          "draft_length_source": source if drafter else None, "settings": settings.to_dict()}, as_json, show)
