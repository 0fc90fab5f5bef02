#!/usr/bin/env python3
"""Two llama-cpp-python runtimes side by side on the CPU: Q8_0 prefill and decode tokens/s, before vs after a change.

Made for issue 14's "nothing slower" check of the AMX tile-configuration patch (patches/llama.cpp/0002): build the
series without it and with it (``GGUF_MTP_PATCHES=DIR python3 tools/build_runtime.py build --no-install``), then

    python3 bench/bench_cpu_runtimes.py --before OLD.whl --after NEW.whl [--threads 2] [--repeats 5]

Each wheel is unpacked into --dir and run in its own worker process (PYTHONPATH first, so ``import llama_cpp`` is
that wheel's), alternating before / after for --repeats rounds on the same file: the speed pair's target (hidden 1024,
~130M parameters) quantized to Q8_0, a 512-token prefill in one batch and --decode tokens one at a time, flash
attention off. Prints each side's median tokens/s, the ratios after / before, the buffer types the weights went to
(AMX, CPU_REPACK or plain), and whether the two CPU backends' machine code (.text of libggml-cpu) is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKER = r"""
import json, sys, time
from gguf_mtp.runtime.engine import Engine
from gguf_mtp.settings import RuntimeSettings
import llama_cpp

path, threads, prefill, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = RuntimeSettings(n_ctx=prefill + decode + 16, n_batch=prefill, n_ubatch=prefill, threads=threads, flash_attn="off")
with Engine.load(path, None, s) as eng:
    tokens = [(7 * i + 3) % (eng.n_vocab - 10) + 5 for i in range(prefill)]
    eng.decode(tokens[:32]); eng.truncate(0)  # warm-up
    t0 = time.perf_counter(); eng.decode(tokens); t1 = time.perf_counter()
    eng.truncate(0)
    eng.decode([tokens[0]])
    t2 = time.perf_counter()
    for t in tokens[1:decode + 1]:
        eng.decode([t])
    t3 = time.perf_counter()
    print(json.dumps({"prefill": prefill / (t1 - t0), "decode": decode / (t3 - t2), "version": llama_cpp.__version__,
                      "library": llama_cpp.llama_cpp._lib._name, "buffers": eng.buffers[path]}))
"""


def unpack(wheel: Path, root: Path) -> Path:
    dest = root / wheel.stem
    if not (dest / "llama_cpp").is_dir():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
        for lib in (dest / "llama_cpp" / "lib").glob("*"):
            lib.chmod(0o755)
    return dest


def text_hash(site: Path) -> str:
    """sha256 of the CPU backend's .text section: the machine code, without build ids or version strings."""
    lib = next((site / "llama_cpp" / "lib").glob("libggml-cpu*.so*"))
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.text", str(lib), out.name], check=True)
        return hashlib.sha256(Path(out.name).read_bytes()).hexdigest()[:16]


def run(site: Path, model: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", WORKER, str(model), str(args.threads), str(args.prefill),
                          str(args.decode)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker on {site.name} failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_file(workdir: Path) -> Path:
    from gguf_mtp.quantize import quantize
    from gguf_mtp.tiny.speed_pair import make_speed_pair

    q8 = workdir / "speed-target-Q8_0.gguf"
    if not q8.exists():
        pair = make_speed_pair(workdir / "speed-pair", keep_hf=False, force=True)
        quantize(pair.target, q8, "Q8_0")
    return q8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="the llama-cpp-python wheel before the change")
    ap.add_argument("--after", type=Path, required=True, help="the wheel after it")
    ap.add_argument("--dir", type=Path, default=REPO / ".work" / "bench-cpu-runtimes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = model_file(args.dir)
    sites = {"before": unpack(args.before, args.dir), "after": unpack(args.after, args.dir)}
    results: dict[str, list[dict]] = {k: [] for k in sites}
    for _ in range(args.repeats):
        for side, site in sites.items():
            results[side].append(run(site, model, args))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    print(f"{cpu}; {os.cpu_count()} CPUs; {args.threads} threads; {model.name}; {args.repeats} alternating rounds; "
          f"prefill {args.prefill} tokens in one batch, decode {args.decode} tokens one at a time")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in ("prefill", "decode")} for side, rs in results.items()}
    print(f"{'':8} {'version':24} {'prefill tok/s':>14} {'decode tok/s':>13}  buffers")
    for side, rs in results.items():
        print(f"{side:8} {rs[0]['version']:24} {med[side]['prefill']:14.1f} {med[side]['decode']:13.1f}  "
              f"{', '.join(rs[0]['buffers'])}")
    print(f"after / before: prefill {med['after']['prefill'] / med['before']['prefill']:.3f}x, "
          f"decode {med['after']['decode'] / med['before']['decode']:.3f}x")
    hashes = {side: text_hash(site) for side, site in sites.items()}
    same = hashes["before"] == hashes["after"]
    print(f"CPU backend machine code (.text of libggml-cpu): {'identical' if same else 'different'} "
          f"({hashes['before']} / {hashes['after']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
