"""plan, skeleton: fit a set of GGUFs into a VRAM budget; full-size GGUFs without weights (gguf_mtp/planning/)."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from ..errors import GgufMtpError
from ..settings import MAX_PARALLEL
from .common import emit, human_size, print_json, print_table


@click.command("plan")
@click.option("--target", type=click.Path(dir_okay=False), help="Target GGUF (gemma4).")
@click.option("--drafter", type=click.Path(dir_okay=False), help="MTP drafter GGUF (gemma4-assistant).")
@click.option("--mmproj", type=click.Path(dir_okay=False), help="Vision projector GGUF (clip).")
@click.option("--variant", metavar="NAME",
              help="Plan a registry variant before download (E2B, E4B, 12B, 26B-A4B, 31B).")
@click.option("--quant", metavar="TYPE", help="--variant: target quant (default: the registry's recommendation).")
@click.option("--drafter-quant", metavar="TYPE", help="--variant: drafter quant (default: the registry's).")
@click.option("--no-drafter", is_flag=True, help="--variant: plan the target without its MTP drafter.")
@click.option("--vision", is_flag=True,
              help="--variant: include the projector (F16): its vision and audio parts (the 12B: its embedders).")
@click.option("--vram", default="24GiB", show_default=True,
              help="GPU memory budget (24GiB, 24GB, 16000MiB); several GPUs: 24GiB,12GiB (CUDA0, CUDA1); 0 with "
                   "--rpc: no local GPU, every layer on the rpc-servers.")
@click.option("--gpu", "gpus", multiple=True, metavar="SIZE",
              help="A local GPU's memory, once per GPU in CUDA order (instead of --vram): a layer split across them.")
@click.option("--rpc", "rpcs", multiple=True, metavar="HOST:PORT=SIZE",
              help="An rpc-server and its device's memory (repeatable); its layers come first in the split.")
@click.option("--margin", default="1GiB", show_default=True, help="Kept free on the GPU (CUDA context, fragmentation).")
@click.option("--ram", help="Host RAM budget for what stays on the CPU (default: not checked).")
@click.option("--ctx", type=click.IntRange(min=256),
              help="Fixed context length (default: the largest that fits); with --parallel, the pool all share.")
@click.option("--max-ctx", is_flag=True, help="The largest context that fits (the default without --ctx).")
@click.option("--parallel", "-np", "parallel", type=click.IntRange(1, MAX_PARALLEL), default=1, show_default=True,
              help="Sequences decoded together (gguf-mtp serve slots, llama-server -np): they share one KV pool, "
                   "each gets the context / N.")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0", "q4_0"]), help="KV cache type (default: chosen).")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--image-tokens", type=click.IntRange(min=1), default=1120, show_default=True,
              help="Largest image (soft tokens) the projector's compute buffer is sized for.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the plan JSON here.")
@click.option("--force", is_flag=True, help="Overwrite --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_cmd(target, drafter, mmproj, variant, quant, drafter_quant, no_drafter, vision, vram, gpus, rpcs, margin, ram,
             ctx, max_ctx, parallel, kv_type, flash_attn, image_tokens, output, force, as_json) -> None:
    """Fit a Gemma 4 target + MTP drafter + vision projector into a VRAM budget.

    Chooses n_gpu_layers, which tensors go to the CPU (MoE experts first), projector and drafter placement,
    the KV cache type and the largest context that fits -- or says what does not fit and by how much. The
    JSON plan's `runtime` member is what `generate` / `chat` / `serve --plan` read. With --parallel N the
    context is a pool shared by N sequences (the KV cache, batches and compute buffers sized for N at once),
    and each sequence gets the pool / N (`slot_ctx` in the JSON); `generate` and `chat` run one sequence and
    give it the whole pool.

    \b
    gguf-mtp plan --variant 31B --quant Q4_K_M --drafter-quant Q8_0 --vision --vram 24GiB
    gguf-mtp plan --variant 12B --quant Q4_K_M --vision --vram 16GiB
    gguf-mtp plan --target t.gguf --drafter d.gguf --mmproj m.gguf --ctx 32768 -o plan.json
    gguf-mtp plan --variant 26B-A4B --quant Q4_K_M --parallel 4 --vram 24GiB -o serve-plan.json
    gguf-mtp plan --variant 31B --vision --gpu 24GiB --gpu 12GiB
    gguf-mtp plan --variant 31B --vision --vram 24GiB --rpc 192.168.1.20:50052=24GiB
    """
    from .. import fsutil
    from ..planning import search as planner
    from ..settings import RuntimeSettings

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
    devices = _devices(planner, vram, gpus, rpcs)
    if devices:
        vram = str(devices[-1].vram)
    req = planner.Request(files, planner.parse_size(vram), planner.parse_size(margin),
                          planner.parse_size(ram) if ram else None, n_ctx=ctx, max_ctx=max_ctx, kv_type=kv_type,
                          flash_attn=flash_attn, image_tokens=image_tokens, base=RuntimeSettings(n_parallel=parallel),
                          devices=devices)
    if req.vram <= req.margin:
        raise GgufMtpError(f"--vram ({vram}) must be larger than --margin ({margin})")
    p = planner.plan(req)
    doc = p.to_dict()
    if not p.fits:
        if as_json:  # the plan that does not fit goes out too, before the error line
            print_json(doc)
        raise GgufMtpError(planner.shortfall_message(p))
    if output:
        with fsutil.atomic_output(output, force) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    emit(doc, as_json, lambda doc: _print_plan(doc, p.settings, files, planner.table_rows(p), output))


def _devices(planner: Any, vram: str, gpus: tuple[str, ...], rpcs: tuple[str, ...]) -> tuple:
    """--gpu / --vram A,B / --rpc HOST:PORT=SIZE as the plan's devices; () for one GPU (the plan as before)."""
    if gpus and "," in vram:
        raise GgufMtpError("give the GPUs as --gpu SIZE (repeated) or --vram A,B, not both")
    sizes = [planner.parse_size(g) for g in gpus] if gpus else [planner.parse_size(v) for v in vram.split(",")]
    if sizes == [0] and not gpus:
        sizes = []  # --vram 0: no local GPU (a client whose devices are all rpc-servers)
    remote = []
    for r in rpcs:
        endpoint, _, size = r.rpartition("=")
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not size:
            raise GgufMtpError(f"--rpc: expected HOST:PORT=SIZE (192.168.1.20:50052=24GiB), got {r!r}")
        remote.append((endpoint, planner.parse_size(size)))
    if not remote and len(sizes) < 2:
        return ()  # one local GPU: the plan as before
    return planner.devices_from(sizes, remote)


def _print_plan(doc: dict, s: Any, files: Any, rows: list[list[Any]], output: str | None) -> None:
    title = (f"plan: {files.target.source} ({files.target.quant})"
             + (f" + drafter ({files.drafter.quant})" if files.drafter else "")
             + (" + projector" if files.mmproj else ""))
    print_table(title, ["device", "component", "size"], rows)
    placement = "all layers" if s.n_gpu_layers < 0 else f"{s.n_gpu_layers} of {files.target.n_layer + 1} layers"
    slots = f" shared by {s.n_parallel} sequences ({s.slot_ctx} each)" if s.n_parallel > 1 else ""
    click.echo(f"context {s.n_ctx} tokens{slots}, KV cache {s.cache_type_k}, flash attention {s.flash_attn}; GPU: "
               f"{placement}" + (f", MoE experts of {s.n_cpu_moe} layers on the CPU" if s.n_cpu_moe else "")
               + ("" if s.mmproj_on_gpu or not files.mmproj else ", projector on the CPU")
               + ("" if s.drafter_on_gpu or not files.drafter else ", drafter on the CPU"))
    if s.devices:
        click.echo(f"devices: {', '.join(s.devices)}; " + "; ".join(doc["steps"]))
    click.echo(f"llama-server: {doc['llama_server']}")
    params = " ".join(f"{k}={v}" for k, v in doc["ollama"]["parameters"].items())
    click.echo(f"Ollama PARAMETERs: {params}")
    for note in doc["ollama"]["not_expressible"]:
        click.echo(f"  # {note}")
    if output:
        click.echo(f"wrote {output}", err=True)


@click.command("skeleton")
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
    gguf-mtp skeleton 12B --quant Q4_K_M -o /tmp/12B-Q4_K_M.gguf
    """
    from ..planning.skeleton import make_skeleton

    path, layout, size = make_skeleton(variant, output, quant, role, force)
    disk = os.stat(path).st_blocks * 512
    emit({"path": str(path), "arch": layout.arch, "role": role, "quant": quant, "tensors": len(layout.tensors),
          "apparent_bytes": size, "disk_bytes": disk, "tensor_bytes": layout.n_bytes}, as_json,
         lambda _: click.echo(f"wrote {path}: {layout.arch} {role}{' ' + quant if quant else ''}, "
                              f"{len(layout.tensors)} tensors, {human_size(size)} apparent, {human_size(disk)} on disk"))
