"""inspect, check: what GGUF files hold, and whether a target, drafter and projector run together
(gguf_mtp/inspect.py, check.py)."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from .common import emit, human_size, print_table


def _print_inspections(results: list[Any]) -> None:
    for ins in results:
        _print_inspection(ins)


def _print_inspection(ins: Any) -> None:
    rows = [["file", ins.path], ["size", human_size(ins.file_bytes)], ["architecture", ins.arch], ["role", ins.role],
            ["file type", ins.file_type or "-"], ["GGUF version", ins.gguf_version], ["metadata keys", ins.n_kv],
            ["tensors", ins.n_tensors], ["parameters", f"{ins.n_params:,}"],
            ["tensor data", f"{human_size(ins.tensor_bytes)} ({ins.bits_per_weight:.2f} bits/weight)"],
            ["vocabulary", ins.n_vocab if ins.n_vocab is not None else "-"]]
    print_table(os.path.basename(ins.path), ["", "value"], rows)
    if ins.metadata:
        print_table("key metadata", ["key", "value"], [[k, _short(v)] for k, v in ins.metadata.items()])
    print_table("bytes by type", ["type", "tensors", "parameters", "bytes"],
                [[s.type, s.tensors, f"{s.params:,}", human_size(s.bytes)] for s in ins.by_type])
    print_table("per layer", ["layer", "tensors", "parameters", "bytes"],
                [[s.layer, s.tensors, f"{s.params:,}", human_size(s.bytes)] for s in ins.layers])
    print_table("provenance (gguf_mtp.*)", ["key", "value"],
                [[k, _short(v)] for k, v in ins.provenance.items()] or [["(none)", "not written by gguf-mtp"]])
    if ins.tensors is not None:
        print_table("tensors", ["name", "type", "shape", "bytes", "offset"],
                    [[t["name"], t["type"], "x".join(map(str, t["shape"])), human_size(t["bytes"]), t["offset"]]
                     for t in ins.tensors])


def _short(v: Any, limit: int = 80) -> str:
    s = json.dumps(v) if isinstance(v, list) else str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


@click.command("inspect")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per file.")
def inspect_cmd(files, tensors, as_json) -> None:
    """Show what GGUF files hold: role, key metadata, parameters, bytes by type and per layer, provenance.

    Reads headers only (memory-mapped), so it is fast on any size of file.
    """
    from ..inspect import inspect_gguf

    emit([inspect_gguf(f, tensors=tensors) for f in files], as_json, _print_inspections)


@click.command("check")
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
    from ..check import check_files

    report = check_files(target, drafter, mmproj, runtime_centroids)
    emit(report, as_json, lambda report: _print_check(report, target, drafter, mmproj))
    if not report.compatible:
        ctx.exit(1)


def _print_check(report: Any, target: str, drafter: str, mmproj: str | None) -> None:
    if report.compatible:
        click.echo(f"compatible: {target} + {drafter}" + (f" + {mmproj}" if mmproj else ""))
    else:
        for p in report.problems:
            click.echo(str(p))
