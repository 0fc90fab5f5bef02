"""demo, bench: the shipped trained pair end to end, then the speed pair; side-by-side speed (demo.py, bench.py)."""

from __future__ import annotations

from typing import Any

import click

from .common import emit, log_to_stderr, print_table, runtime_options, runtime_settings


@click.command("demo")
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
    -> an Ollama Modelfile and the llama-server command line. Then the speed pair (a generated ~130M-parameter
    target and a drafter built to agree with it, ~250 MB in WORKDIR/speed-pair): the target alone vs MTP in
    tokens/s. The trained pair shows real acceptance, the speed pair real speed-up. Exit 1 if a step failed.

    \b
    gguf-mtp demo
    gguf-mtp demo --workdir ./demo --json
    """
    from .. import demo

    def show(step: Any) -> None:
        click.echo(f"{step.status:>7}  {step.name}: {step.detail}")

    d = demo.run_demo(workdir, force=force, max_tokens=max_tokens, on_step=None if as_json else show)
    emit(d, as_json, lambda d: _print_demo(d, max_tokens))
    if not d.ok:
        ctx.exit(1)


def _print_demo(d: Any, max_tokens: int) -> None:
    from .. import bench, demo

    if d.bench is not None:
        print_table(f"{demo.TRAINED_LABEL}\n{d.bench.prompts} held-out prompts x {max_tokens} tokens, target "
                    f"{demo.TARGET_QUANT}, drafter {demo.DRAFTER_QUANT}", bench.TABLE_COLUMNS,
                    bench.table_rows(d.bench))
        click.echo(f"{demo.TRAINED_WHAT}.")
    if d.speed is not None:
        print_table(f"{demo.SPEED_LABEL}\n{d.speed.prompts} prompts x {max_tokens} tokens, F16, fastest of "
                    f"{d.speed.repeats}, {demo.SPEED_THREADS} thread(s)", bench.TABLE_COLUMNS,
                    bench.table_rows(d.speed))
        click.echo(f"{demo.SPEED_WHAT}.")
    if d.headline() is not None:
        click.echo(f"Result: {d.headline()}")
    if d.modelfile is not None:
        click.echo(f"Ollama: ollama create gemma4-mtp-demo -f {d.modelfile}")
    if d.llama_server is not None:
        click.echo(f"llama-server: {d.llama_server}")
    click.echo(f"files: {d.workdir}")


@click.command("bench")
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
@runtime_options
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
    from .. import bench

    prompts = bench.read_prompts(prompts_file) if prompts_file else bench.heldout_prompts()
    settings = runtime_settings(**runtime)
    with log_to_stderr(verbose):
        r = bench.run_bench(target, drafter, prompts, max_tokens=max_tokens, ks=range(1, k_max + 1),
                            adaptive=not no_adaptive, oracle=oracle, settings=settings, repeats=repeats,
                            temperature=temp, seed=seed, accept=accept, chat=chat)
    sampling = f"temperature {temp}, {accept} acceptance" if temp > 0 else "greedy"
    emit(r, as_json, lambda r: print_table(f"{r.prompts} prompts x {max_tokens} tokens, {sampling}, fastest of "
                                           f"{repeats}", bench.TABLE_COLUMNS, bench.table_rows(r)))
