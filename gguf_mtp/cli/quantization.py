"""quantize, quantize-pair: llama.cpp's quantizer on one GGUF or a target + drafter pair (gguf_mtp/quantize.py)."""

from __future__ import annotations

from typing import Any

import click

from .common import emit, err_console, human_size, print_table


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
    click.echo(f"{label}{where}: {human_size(res.src_file_bytes)} -> {'~' if res.dry_run else ''}"
               f"{human_size(res.dst_file_bytes)} as {res.qtype}, {res.bits_per_weight:.2f} bits/weight, "
               f"{len(res.tensors)} tensors in {res.seconds:.2f} s")
    print_table(f"{label}tensors by type", ["type", "tensors", "bytes"],
                [[t, d["tensors"], human_size(d["bytes"])] for t, d in res.by_type().items()])
    if res.kept:
        click.echo(f"{label}kept at source type (drafter rule): {', '.join(res.kept)}")


def _print_quant_pair(res: Any) -> None:
    _print_quant_result(res.target, "target: ")
    _print_quant_result(res.drafter, "drafter: ")


def _preset_help() -> str:
    from ..quanttypes import PRESETS

    return "TYPE is a llama.cpp preset: " + ", ".join(PRESETS)


@click.command("quantize", epilog=_preset_help())
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
    from ..quantize import quantize

    with _quant_progress(not as_json) as bar:
        res = quantize(src, dst, qtype, output_tensor_type=output_tensor_type,
                       token_embedding_type=token_embedding_type, tensor_types=tensor_types, imatrix=imatrix,
                       threads=threads, dry_run=dry_run, force=force, allow_requantize=allow_requantize,
                       progress=(lambda d, n, name: bar("quantize", d, n, name)) if bar else None)
    emit(res, as_json, _print_quant_result)


@click.command("quantize-pair", epilog=_preset_help())
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
    from ..quantize import quantize_pair

    with _quant_progress(not as_json) as bar:
        res = quantize_pair(target, drafter, qtype, out_dir, drafter_type=drafter_type, imatrix=imatrix,
                            threads=threads, dry_run=dry_run, force=force, allow_requantize=allow_requantize,
                            progress=bar)
    emit(res, as_json, _print_quant_pair)
