"""generate: the speculative loop on llama-cpp-python (gguf_mtp/runtime/loop.py)."""

from __future__ import annotations

import click

from ..errors import GgufMtpError
from .common import decode_options, draft_settings, emit, log_to_stderr, runtime_options, runtime_settings


@click.command("generate")
@click.option("--target", required=True, type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("-p", "--prompt", help="Prompt text (rendered as one user turn unless --raw).")
@click.option("--prompt-tokens", metavar="IDS", help="Prompt as comma-separated token ids (no template).")
@click.option("-n", "--max-tokens", default=128, show_default=True, type=click.IntRange(min=0),
              help="Tokens to generate.")
@decode_options
@click.option("--no-drafter", is_flag=True, help="Target alone (for comparison).")
@click.option("--allow-no-drafter", is_flag=True, help="Go on without the drafter if it cannot be loaded.")
@click.option("--raw", is_flag=True, help="Send the prompt text as is, without the chat template.")
@click.option("--json-schema", "json_schema", type=click.Path(dir_okay=False, exists=True),
              help="Constrain the output to JSON matching this JSON-schema file (MTP stays on).")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens", "text", "stats"} as JSON.')
@click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log on stderr.")
def generate_cmd(target, drafter, prompt, prompt_tokens, max_tokens, temp, top_k, top_p, min_p, seed, accept,
                 draft_max, adaptive, draft_cap, no_drafter, allow_no_drafter, raw, json_schema, as_json, verbose,
                 **runtime) -> None:
    """Generate from TARGET with speculative decoding by the MTP DRAFTER.

    \b
    Examples:
      gguf-mtp generate --target t.gguf --drafter d.gguf -p "Why is the sky blue?" -n 200
      gguf-mtp generate --target t.gguf --drafter d.gguf --prompt-tokens 2,105,9 --draft-max 3 --json
      gguf-mtp generate --target t.gguf --drafter d.gguf -p "A user record" --json-schema user.schema.json
    """
    import codecs

    from ..runtime.chat_template import user_prompt
    from ..runtime.engine import Engine
    from ..runtime.grammar import json_schema_grammar
    from ..runtime.loop import make_chooser, speculative_generate
    from ..runtime.sampling import SamplingParams
    from ..runtime.stats import Stats

    if (prompt is None) == (prompt_tokens is None):
        raise GgufMtpError("give exactly one of -p/--prompt and --prompt-tokens")
    grammar = None
    if json_schema is not None:
        with open(json_schema, encoding="utf-8") as f:
            try:
                grammar = json_schema_grammar(f.read())
            except GgufMtpError as e:
                raise GgufMtpError(f"--json-schema {json_schema}: {e}") from None
    draft = draft_settings(draft_max, adaptive, draft_cap)
    settings = runtime_settings(**runtime, draft=draft)
    with log_to_stderr(verbose), Engine.load(target, None if no_drafter else drafter, settings,
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
                                      chooser=make_chooser(eng), stats=stats, grammar=grammar):
            out += r.tokens
            if not as_json:
                click.echo(decoder.decode(b"".join(eng.piece(t) for t in r.tokens)), nl=False)

        def finish(_: dict) -> None:  # the text streamed above: its last bytes, then the stats on stderr
            click.echo(decoder.decode(b"", final=True))
            s = stats
            cut = f", drafts cut by the grammar {s.grammar_cut}" if grammar is not None else ""
            click.echo(f"{s.tokens} tokens, {s.tokens_per_second:.1f} tok/s, {s.rounds} rounds, drafts kept "
                       f"{s.accepted}/{s.proposed} ({100 * s.acceptance_rate:.0f}%), {s.mean_accepted_length:.2f} "
                       f"tokens/round{cut}, stop: {s.stop_reason}", err=True)

        emit({"tokens": out, "text": eng.detokenize(out), "prompt_tokens": len(tokens),
              "drafter": str(eng.drafter_path) if eng.has_drafter else None,
              "drafter_problem": eng.drafter_problem, "stats": stats.to_dict()}, as_json, finish)
