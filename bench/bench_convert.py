"""Conversion speed and peak memory: gguf-mtp's exporter against llama.cpp's convert_hf_to_gguf.py, side by side.

    python bench/bench_convert.py                         # ~0.6 GB and ~1.8 GB synthetic checkpoints, bf16
    python bench/bench_convert.py --sizes 0.6,1.8,3 --outtypes q8_0
    python bench/bench_convert.py --write-docs            # also rewrite the results section of docs/export.md

Builds synthetic multimodal Gemma 4 checkpoints (gguf_mtp.tiny's tables at a larger size: hidden 2048, MLP 8192,
as many layers as the size needs, an E2B-sized vision tower, the tiny tokenizer; sharded bf16 safetensors with an
index), cached under --workdir. Each conversion runs in its own process; wall time and peak RSS (os.wait4's
ru_maxrss of that process) are measured per run, ours and upstream's alternating, each after the checkpoint's
files were read once (a warm page cache for both) and earlier writes were flushed (os.sync). Upstream is the sdist's convert_hf_to_gguf.py
(tests/upstream.py finds it). Memory is also shown above a baseline (the interpreter with the converter's modules
imported, nothing converted) against the largest tensor, the bound streaming should keep.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from docsection import write_section  # noqa: E402

from gguf_mtp.tiny import configs, tokenizer, weights  # noqa: E402

S, F = configs.S, configs.F
DOCS = ROOT / "docs" / "export.md"
SHARD_BYTES = 400 << 20  # small shards so that every size is a multi-file checkpoint
GB = 1e9
BASELINE = "import gguf_mtp.cli, gguf_mtp.export.projector"  # the interpreter and the converter's imports, no work

# --- the synthetic checkpoint: gguf_mtp.tiny's tables, scaled up ------------------------------------------------------
TEXT = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
            global_head_dim=512, sliding_window=512, max_position_embeddings=131_072)
VISION = dict(configs.FAMILIES["tiny-e"].vision, hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
              num_attention_heads=12, num_key_value_heads=12, head_dim=64, position_embedding_size=10 * 1024)


def layer_types(n: int) -> list[str]:
    types = [F if i % 4 == 3 else S for i in range(n)]
    types[-2:] = [S, F]  # llama.cpp's Gemma 4 KV-reuse rule: the target ends sliding, full
    return types


def spec_for(n_layers: int) -> configs.FamilySpec:
    text = {**copy.deepcopy(configs.TEXT_COMMON), **TEXT, "layer_types": layer_types(n_layers),
            "num_hidden_layers": n_layers}
    base = configs.FAMILIES["tiny-e"]
    return replace(base, name=f"bench-{n_layers}", target_text=text, vision=VISION, dtype="bfloat16")


def tensor_specs(spec: configs.FamilySpec) -> list[weights.TensorSpec]:
    return weights.target_specs(spec)


def n_bytes(specs: list[weights.TensorSpec]) -> int:
    return sum(2 * math.prod(s.shape) for s in specs)


def layers_for(size_gb: float) -> int:
    n = 2
    while n_bytes(tensor_specs(spec_for(n + 1))) <= size_gb * GB:
        n += 1
    return n


def _values(spec: weights.TensorSpec, seed: int) -> bytes:
    """One tensor's bf16 bytes (gguf_mtp.tiny's per-name generator and init; one tensor in memory at a time)."""
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    return weights.to_bf16_bytes(np.asarray(weights.INITS[spec.init](rng, spec.shape), dtype=np.float32))


def write_checkpoint(directory: Path, size_gb: float, seed: int = 0) -> Path:
    """A sharded bf16 checkpoint of about ``size_gb``; reused when already complete."""
    n = layers_for(size_gb)
    directory = directory / f"gemma4-bench-{n}L"
    if (directory / "DONE").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    spec = spec_for(n)
    configs.check_layout(spec.target_text, "target")
    (directory / "config.json").write_text(json.dumps(configs.target_config(spec), indent=2))
    (directory / "generation_config.json").write_text(json.dumps(configs.generation_config(spec, "target"), indent=2))
    (directory / "processor_config.json").write_text(json.dumps(configs.processor_config(spec), indent=2))
    tokenizer.write_tokenizer(directory, "json")
    shards, cur, size = [], [], 0
    for s in tensor_specs(spec):
        b = 2 * math.prod(s.shape)
        if cur and size + b > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += b
    shards.append(cur)
    weight_map = {}
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for s in group:
            b = 2 * math.prod(s.shape)
            header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + b]}
            offset += b
            weight_map[s.name] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for s in group:
                f.write(_values(s, seed))
    index = {"metadata": {"total_size": n_bytes(tensor_specs(spec))}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "DONE").write_text("")
    return directory


def largest_tensor(specs: list[weights.TensorSpec], prefix: str = "") -> int:
    return max(2 * math.prod(s.shape) for s in specs if s.name.startswith(prefix))


# --- measuring -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    wall_s: float
    peak_rss: int  # bytes
    rc: int
    tail: str


# A fresh, small launcher spawns each run: Linux carries the parent's peak RSS into a child's ru_maxrss across
# fork + exec, so spawning from this (large) process would inflate every measurement to our own peak.
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - t0, "maxrss_kb": usage.ru_maxrss,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def measure(argv: list[str], env: dict[str, str] | None = None) -> Run:
    """Wall time and peak RSS of one child process (os.wait4 reports that child's own rusage). Dirty pages of
    the previous run are flushed first, so no run pays for another's writeback."""
    os.sync()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: upstream logs a line per tensor and a progress bar
        p = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *argv], stdout=subprocess.PIPE, stderr=log,
                           env=env, text=True)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-2000:]
    if p.returncode != 0:
        return Run(0.0, 0, p.returncode, tail)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    return Run(res["wall_s"], res["maxrss_kb"] * 1024, res["rc"], tail)


def warm(directory: Path) -> None:
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def ours_argv(src: Path, out: Path, outtype: str, mmproj: bool = False) -> list[str]:
    code = "import sys; from gguf_mtp.cli import main; sys.argv[0] = 'gguf-mtp'; main()"
    return [sys.executable, "-c", code, "convert", str(src), "-o", str(out), "--outtype", outtype, "--force",
            *(["--mmproj"] if mmproj else [])]


def upstream_argv(script: Path, src: Path, out: Path, outtype: str, mmproj: bool = False) -> list[str]:
    return [sys.executable, str(script), str(src), "--outfile", str(out), "--outtype", outtype,
            *(["--mmproj"] if mmproj else [])]


def check(run: Run, what: str) -> Run:
    if run.rc != 0:
        raise SystemExit(f"{what} failed (exit {run.rc}):\n{run.tail}")
    return run


def bench_one(label: str, src: Path, work: Path, script: Path, env: dict[str, str], outtype: str, mmproj: bool,
              largest: int, baseline: int) -> dict:
    warm(src)
    ours_out, up_out = work / "ours.gguf", work / "upstream.gguf"
    ours = check(measure(ours_argv(src, ours_out, outtype, mmproj)), f"gguf-mtp convert {label}")
    size = ours_out.stat().st_size
    ours_out.unlink()
    up = check(measure(upstream_argv(script, src, up_out, outtype, mmproj), env), f"convert_hf_to_gguf.py {label}")
    up_out.unlink()
    row = {"what": label, "checkpoint_gb": round(sum(f.stat().st_size for f in src.glob("*.safetensors")) / GB, 2),
           "output_gb": round(size / GB, 3), "largest_tensor_mb": round(largest / 1e6, 1),
           "ours_s": round(ours.wall_s, 2), "upstream_s": round(up.wall_s, 2),
           "time_ratio": round(up.wall_s / ours.wall_s, 2),
           "ours_rss_mb": round(ours.peak_rss / 1e6), "upstream_rss_mb": round(up.peak_rss / 1e6),
           "rss_ratio": round(up.peak_rss / ours.peak_rss, 2),
           "ours_above_baseline_mb": round((ours.peak_rss - baseline) / 1e6),
           "ours_above_baseline_x_largest": round((ours.peak_rss - baseline) / largest, 2)}
    print(f"{label:40s} {row['checkpoint_gb']:5.2f} GB  time: ours {ours.wall_s:6.1f} s, upstream {up.wall_s:6.1f} s "
          f"({row['time_ratio']:.2f}x)  peak RSS: ours {row['ours_rss_mb']} MB, upstream {row['upstream_rss_mb']} MB "
          f"({row['rss_ratio']:.2f}x); ours above baseline {row['ours_above_baseline_mb']} MB = "
          f"{row['ours_above_baseline_x_largest']}x the largest tensor", flush=True)
    return row


def docs_section(rows: list[dict], baseline: int) -> str:
    lines = [
        f"Regenerated by `python bench/bench_convert.py --write-docs` ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; synthetic multimodal Gemma 4 checkpoints, sharded "
        "bf16 safetensors, warm page cache, os.sync before each run; times include starting the interpreter and its imports, torch for "
        "upstream). time / RSS ratio = upstream / ours (> 1: ours is faster / smaller). "
        f"Baseline = the interpreter with the converter's modules imported and nothing converted "
        f"({baseline / 1e6:.0f} MB).",
        "",
        "| conversion | checkpoint | ours | upstream | time ratio | peak RSS ours | upstream | RSS ratio "
        "| ours above baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['what']} | {r['checkpoint_gb']:.2f} GB | {r['ours_s']:.1f} s | {r['upstream_s']:.1f} s | "
                     f"{r['time_ratio']:.2f}x | {r['ours_rss_mb']} MB | {r['upstream_rss_mb']} MB | "
                     f"{r['rss_ratio']:.2f}x | {r['ours_above_baseline_mb']} MB "
                     f"({r['ours_above_baseline_x_largest']}x the {r['largest_tensor_mb']} MB largest tensor) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.6,1.8", help="checkpoint sizes in GB, vision tower (0.3 GB) included")
    ap.add_argument("--outtypes", default="bf16,f16", help="comma-separated --outtype values (default: bf16,f16)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "bench-convert")
    ap.add_argument("--no-mmproj", action="store_true", help="skip the --mmproj conversion")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the results section of docs/export.md")
    args = ap.parse_args()

    from upstream import sdist_dir

    sdist = sdist_dir()
    if sdist is None:
        raise SystemExit("llama-cpp-python 0.3.36 sdist absent (python3 tools/fetch_sdist.py)")
    lcpp = sdist / "vendor" / "llama.cpp"
    env = {**os.environ, "PYTHONPATH": str(lcpp / "gguf-py")}
    script = lcpp / "convert_hf_to_gguf.py"
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = measure([sys.executable, "-c", BASELINE]).peak_rss

    rows = []
    sizes = [float(s) for s in args.sizes.split(",")]
    outtypes = args.outtypes.split(",")
    for size in sizes:
        t0 = time.perf_counter()
        src = write_checkpoint(args.workdir, size)
        specs = tensor_specs(spec_for(len(json.loads((src / "config.json").read_text())["text_config"]["layer_types"])))
        print(f"checkpoint {src.name}: {n_bytes(specs) / GB:.2f} GB ({time.perf_counter() - t0:.0f} s to build "
              "or find)", flush=True)
        for outtype in outtypes:
            rows.append(bench_one(f"target {src.name}, {outtype}", src, args.workdir, script, env, outtype, False,
                                  largest_tensor(specs, "model.language_model."), base))
        if not args.no_mmproj and size == sizes[-1]:
            for outtype in outtypes:
                rows.append(bench_one(f"--mmproj (E2B-sized tower), {outtype}", src, args.workdir, script, env,
                                      outtype, True, largest_tensor(specs, "model.vision_tower."), base))
    if args.write_docs:
        write_section(DOCS, "bench_convert", docs_section(rows, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
