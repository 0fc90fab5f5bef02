"""convert: Hugging Face checkpoint -> GGUF (gguf_mtp/export)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import GgufMtpError
from .common import emit, err_console, human_size


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


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--outtype", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default="auto", show_default=True,
              help="Tensor type (auto: the checkpoint's dtype). Norms and 1-D tensors stay F32.")
@click.option("--target", metavar="TARGET", help="Drafters and --mmproj: the target (GGUF, directory or cached repo "
              "id) to pair-check against before writing.")
@click.option("--centroids", is_flag=True, help="Drafters: keep the centroid head (only our patched llama.cpp loads it).")
@click.option("--mmproj", is_flag=True, help="Write the projector (clip: vision, and audio where the checkpoint has "
              "it) of a multimodal target instead of its text model.")
@click.option("--no-audio", "no_audio", is_flag=True, help="--mmproj: leave the audio part out (a vision-only "
              "projector).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_cmd(src: str, output: str, outtype: str, target: str | None, centroids: bool, mmproj: bool,
                no_audio: bool, force: bool, as_json: bool) -> None:
    """Convert a Hugging Face Gemma 4 checkpoint (target, MTP drafter or, with --mmproj, the vision and audio
    projector) to GGUF.

    SRC is a checkpoint directory or a repo id already in the local Hugging Face cache (HF_HOME /
    HF_HUB_CACHE; nothing is downloaded). What SRC is comes from its config.json.

    \b
    gguf-mtp convert google/gemma-4-E2B-it -o gemma-4-E2B-it-BF16.gguf
    gguf-mtp convert google/gemma-4-E2B-it --mmproj -o mmproj-gemma-4-E2B-it-F16.gguf --outtype f16
    gguf-mtp convert google/gemma-4-12B-it --mmproj --no-audio -o mmproj-gemma-4-12B-it-vision-F16.gguf
    gguf-mtp convert ./gemma-4-E2B-it-assistant -o mtp-E2B-F16.gguf --outtype f16 --target gemma-4-E2B-it-BF16.gguf
    """
    from ..export import convert

    if mmproj and centroids:
        raise GgufMtpError("--centroids belongs to drafters; --mmproj writes a projector")
    if no_audio and not mmproj:
        raise GgufMtpError("--no-audio belongs to --mmproj (a target or drafter GGUF has no audio part)")
    with _convert_progress(not as_json) as bar:
        if mmproj:
            from ..export.projector import convert_projector

            res = convert_projector(src, output, outtype=outtype, target=target, audio=not no_audio,
                                    force=force, progress=bar)
        else:
            res = convert(src, output, outtype=outtype, target=target, centroids=centroids, force=force, progress=bar)
    emit(res, as_json, _print_converted)


def _print_converted(res: Any) -> None:
    traits = f", {', '.join(res.features)}" if res.features else ""
    click.echo(f"wrote {res.output}: {res.arch} {res.role} ({res.kind}{traits}), {res.n_tensors} tensors, "
               f"{human_size(res.n_bytes)}, {res.outtype}")
    for why, n in res.ignored.items():
        click.echo(f"note: left out {n} checkpoint tensor(s): {why}", err=True)
    if res.paired_with:
        click.echo(f"pair check passed against {res.paired_with}", err=True)
