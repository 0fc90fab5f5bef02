#!/usr/bin/env bash
# The planner against a real CUDA device, and MTP's speed on it: plans compared with llama.cpp's per-device accounting and with the
# device's own free-memory readings, on full-size sparse skeletons (their data reads as zeros).
#
#   bench/gpu_check.sh build   # CUDA build of llama-cpp-python 0.3.36's llama.cpp into .work/gpu-check (~6-9 min)
#   bench/gpu_check.sh check   # the comparisons (~3-5 min); prints one table, exits 1 if an item is off
#   bench/gpu_check.sh speed   # tokens/s with and without MTP, all layers on the GPU (~2 min): the speed pair
#                              # (tools/make_speed_pair.py) through `gguf-mtp bench --json`, into $WORK/speed.json
#   bench/gpu_check.sh         # all three
#
# Sized for one H100/H200-class GPU (sm_90) and 15 minutes in all. Offline-safe: the llama.cpp sources come from
# the llama-cpp-python sdist already on this machine ($SDIST, .work/sdist/, ~/.cache/gguf-mtp/sdist/ or
# .work/sdist), patched with patches/llama.cpp as tools/build_runtime.py does (centroid head, version symbol);
# the build uses pip (--no-build-isolation) when scikit-build-core is installed, else plain CMake
# with the libraries dropped into a copy of the installed llama_cpp package. Nothing outside .work/gpu-check is
# touched; the CPU build in site-packages stays as it is.
#
# Environment: CUDA_ARCH (default 90), JOBS (default nproc), GPU_CHECK_DIR (default .work/gpu-check), SDIST.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${GPU_CHECK_DIR:-$REPO/.work/gpu-check}"
SITE="$WORK/site"
ARCH="${CUDA_ARCH:-90}"
JOBS="${JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"
mkdir -p "$WORK"

log() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

find_source() {
    # echo a fresh copy of llama-cpp-python's source tree in $WORK/src, with gguf-mtp's llama.cpp patches applied
    # (patches/llama.cpp, as tools/build_runtime.py applies them): the GPU runs the runtime users build
    local cand
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    for cand in "${SDIST:-}" "$REPO"/.work/sdist/llama_cpp_python-0.3.36.tar.gz \
                "$HOME"/.cache/gguf-mtp/sdist/llama_cpp_python-0.3.36.tar.gz \
                "$REPO"/.work/sdist/llama_cpp_python-0.3.36; do
        [ -n "$cand" ] || continue
        if [ -d "$cand/vendor/llama.cpp" ]; then cp -r "$cand" "$WORK/src/llama_cpp_python-0.3.36"; break; fi
        if [ -f "$cand" ]; then tar -xzf "$cand" -C "$WORK/src"; break; fi
    done
    if [ ! -d "$WORK/src/llama_cpp_python-0.3.36/vendor/llama.cpp" ]; then
        log "no llama-cpp-python 0.3.36 source found (set SDIST=/path/to/llama_cpp_python-0.3.36.tar.gz)"
        return 1
    fi
    rm -rf "$WORK/src/llama_cpp_python-0.3.36/vendor/llama.cpp/build"*  # a copied tree's own build dirs
    "$PY" - "$WORK/src/llama_cpp_python-0.3.36" "$REPO/gguf_mtp/runtime_build.py" <<'PY' >&2 || return 1
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("gguf_mtp_runtime_build", sys.argv[2])
rb = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = rb
spec.loader.exec_module(rb)
series, src = rb.load_series(), Path(sys.argv[1])
rb.apply_patches(src / "vendor" / "llama.cpp", series.patches)
rb.set_version(src, series.label)
print(f"[gpu-check] patched {src} -> {series.label}")
PY
    echo "$WORK/src/llama_cpp_python-0.3.36"
}

have_cuda_build() {
    [ -d "$SITE/llama_cpp" ] || return 1
    LD_LIBRARY_PATH="$SITE/llama_cpp/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$SITE:$REPO" "$PY" - <<'PY' >/dev/null 2>&1
import sys
from gguf_mtp.planning.probe import device_memory
sys.exit(0 if any(name.startswith("CUDA") for name in device_memory()) else 1)
PY
}

step_build() {
    if have_cuda_build; then log "CUDA build already in $SITE"; return 0; fi
    command -v nvcc >/dev/null 2>&1 || export PATH="/usr/local/cuda/bin:$PATH"
    command -v nvcc >/dev/null || { log "nvcc not found (CUDA toolkit needed)"; return 1; }
    nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader >&2 || true
    local src; src="$(find_source)"
    local cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DGGML_NATIVE=off -DLLAMA_CURL=off"
    rm -rf "$SITE" && mkdir -p "$SITE"
    if "$PY" -c "import scikit_build_core" 2>/dev/null; then
        log "pip build of $src (CMAKE_ARGS=$cmake_args, $JOBS jobs)"
        CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
            "$PY" -m pip install --no-deps --no-build-isolation --no-index --target "$SITE" "$src" >&2
    else
        log "scikit-build-core not installed (offline): plain CMake build of $src/vendor/llama.cpp ($JOBS jobs)"
        local gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
        cmake -S "$src/vendor/llama.cpp" -B "$WORK/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=ON $cmake_args -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
        cmake --build "$WORK/build" --target llama mtmd -j "$JOBS" >&2
        # the pure-Python package from the installed CPU wheel, with the CUDA libraries in its lib/
        local pkg; pkg="$("$PY" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')"
        cp -r "$pkg" "$SITE/llama_cpp"
        rm -f "$SITE"/llama_cpp/lib/*.so*
        find "$WORK/build" -name '*.so*' \( -name 'libllama*' -o -name 'libggml*' -o -name 'libmtmd*' \) \
            -exec cp -P {} "$SITE/llama_cpp/lib/" \;
    fi
    have_cuda_build || { log "the build does not see a CUDA device"; return 1; }
    log "CUDA build ready in $SITE"
}

step_check() {
    have_cuda_build || { log "no CUDA build in $SITE: run '$0 build' first"; return 1; }
    log "comparing plans with the device"
    LD_LIBRARY_PATH="$SITE/llama_cpp/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$SITE:$REPO" \
        GPU_CHECK_DIR="$WORK" "$PY" - <<'PY'
"""Each case: the planner's per-device numbers vs llama.cpp's per-buffer-type accounting (CUDA0 / CUDA_Host /
CPU), and for allocated cases vs the device's free memory before and after."""
import os
import sys
import time
from pathlib import Path

from gguf_mtp.planning import placement, search
from gguf_mtp.planning.layout import layout_for
from gguf_mtp.planning.probe import ContextShape, measure, projector_usage
from gguf_mtp.planning.skeleton import write_sparse
from gguf_mtp.settings import RuntimeSettings

WORK = Path(os.environ["GPU_CHECK_DIR"]) / "skel"
WORK.mkdir(parents=True, exist_ok=True)
LIMIT = {"weights": 0.005, "KV": 0.005, "compute": 0.10, "device": 0.05}
MiB = 2**20
t0 = time.time()


def skel(variant, role, quant=None):
    p = WORK / f"{variant}-{role}-{quant or 'base'}.gguf"
    if not p.exists():
        write_sparse(p, layout_for(variant, role, quant))
    return p


def split(breakdown, kind):
    """llama.cpp buffer types -> GPU (the CUDA device) / CPU (CPU, CUDA_Host pinned memory, CPU_REPACK...)."""
    gpu = sum(v[kind] for k, v in breakdown.items() if k.startswith("CUDA") and "Host" not in k)
    cpu = sum(v[kind] for k, v in breakdown.items() if not (k.startswith("CUDA") and "Host" not in k))
    return gpu, cpu


def planned(b, device, *prefixes):
    return sum(n for (d, c), n in b.items.items() if d == device and c.startswith(prefixes))


rows, bad = [], []


def row(case, item, plan_b, llama_b):
    err = plan_b / llama_b - 1 if llama_b else (0.0 if not plan_b else 1.0)
    key = next((k for k in LIMIT if k in item), "compute")
    off = abs(err) > LIMIT[key] and abs(plan_b - llama_b) > 2 * MiB
    rows.append((case, item, plan_b, llama_b, err, off))
    if off:
        bad.append((case, item))


def check(case, target, drafter, s, *, alloc=False, mmproj=None):
    files = placement.files_from_paths(target, drafter, mmproj)
    b = placement.breakdown(files, s)
    shapes = placement.context_shapes(s, drafter is not None)

    def cshape(role):
        c = shapes[role]
        return ContextShape(n_ctx=c["n_ctx"], n_batch=c["n_batch"], n_ubatch=c["n_ubatch"],
                            n_outputs_max=c["n_outputs_max"], type_k=s.cache_type_k, type_v=s.cache_type_v,
                            flash_attn=s.flash_attn, swa_full=s.swa_full)

    m = measure(target, cshape("target"), drafter, cshape("drafter") if drafter else None,
                n_gpu_layers=s.n_gpu_layers, overrides=s.effective_overrides() or None,
                drafter_n_gpu_layers=-1 if s.drafter_on_gpu else 0, alloc=alloc)
    tm, dm = m.target.breakdown, m.drafter.breakdown if m.drafter else {}
    g, c = split(tm, "model")
    row(case, "target weights GPU", planned(b, "GPU", "target layers", "target output", "target embeddings"), g)
    row(case, "target weights CPU", planned(b, "CPU", "target layers", "target output", "target embeddings",
                                            "target offloaded"), c)
    g, c = split(tm, "context")
    row(case, "KV GPU", planned(b, "GPU", "KV"), g)
    row(case, "KV CPU", planned(b, "CPU", "KV"), c)
    g, c = split(tm, "compute")
    row(case, "target compute GPU", planned(b, "GPU", "target compute"), g)
    row(case, "target compute CPU/host", planned(b, "CPU", "target compute"), c)
    if dm:
        g, c = split(dm, "model")
        row(case, "drafter weights GPU", planned(b, "GPU", "drafter layers", "drafter output"), g)
        row(case, "drafter weights CPU", planned(b, "CPU", "drafter"), c)
        g, c = split(dm, "compute")
        row(case, "drafter compute GPU", planned(b, "GPU", "drafter compute"), g)
    if alloc and m.device_used is not None:
        row(case, "device: planned GPU vs used", planned(b, "GPU", "target", "drafter", "KV"), m.device_used)
    if mmproj is not None:
        u = projector_usage(mmproj, s.flash_attn)
        g = sum(v for k, v in u.items() if k.startswith("CUDA"))
        pb = placement.breakdown(files, s, image_tokens=256)
        row(case, "projector GPU (256-token image)", planned(pb, "GPU", "projector"), g)


# the cases: full offload, partial offload (op offload copies), MoE experts on the CPU, a projector, and the
# planner's own 24 GiB plans loaded for real
cases = []
e2b = (skel("E2B", "target", "Q4_K_M"), skel("E2B", "drafter", "Q8_0"))
b31 = (skel("31B", "target", "Q4_K_M"), skel("31B", "drafter", "Q8_0"))
a26 = (skel("26B-A4B", "target", "Q4_K_M"), skel("26B-A4B", "drafter", "Q8_0"))
check("E2B all-GPU 32k f16 (allocated)", *e2b, RuntimeSettings(n_ctx=32768), alloc=True,
      mmproj=skel("E2B", "mmproj"))
check("31B all-GPU 16k q8_0", *b31, RuntimeSettings(n_ctx=16384, cache_type_k="q8_0", cache_type_v="q8_0",
                                                    flash_attn="on"), mmproj=skel("31B", "mmproj"))
check("31B -ngl 31, 8k f16", *b31, RuntimeSettings(n_ctx=8192, n_gpu_layers=31))
check("26B --n-cpu-moe 12, 32k f16", *a26, RuntimeSettings(n_ctx=32768, n_cpu_moe=12))
for variant, files in (("31B", b31), ("26B-A4B", a26)):
    p = search.plan(search.Request(placement.files_from_paths(*files), 24 * 2**30, 2**30))
    check(f"{variant} 24GiB plan: ctx {p.settings.n_ctx} {p.settings.cache_type_k} (allocated)", *files,
          p.settings, alloc=True)

print(f"\n{'case':44} {'item':32} {'planner MiB':>12} {'llama.cpp MiB':>14} {'error':>8}")
for case, item, pb, lb, err, off in rows:
    print(f"{case[:44]:44} {item:32} {pb / MiB:12.1f} {lb / MiB:14.1f} {err * 100:+7.2f}%{'  <-- over' if off else ''}")
print(f"\n{len(rows)} comparisons in {time.time() - t0:.0f} s; {len(bad)} over the limits {LIMIT}")
sys.exit(1 if bad else 0)
PY
}

step_speed() {
    have_cuda_build || { log "no CUDA build in $SITE: run '$0 build' first"; return 1; }
    local pair="$WORK/speed-pair"
    [ -f "$pair/drafter-F16.gguf" ] || "$PY" "$REPO/tools/make_speed_pair.py" "$pair" >&2
    log "tokens/s: the target alone vs MTP k=1..4 and adaptive, every layer on the GPU"
    LD_LIBRARY_PATH="$SITE/llama_cpp/lib:${LD_LIBRARY_PATH:-}" PYTHONPATH="$SITE:$REPO" \
        "$PY" -m gguf_mtp bench --target "$pair/target-F16.gguf" --drafter "$pair/drafter-F16.gguf" -n 256 \
        --repeats 2 --oracle --n-gpu-layers -1 --ctx 2048 --json > "$WORK/speed.json"
    "$PY" - "$WORK/speed.json" <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
print(f"\n{'mode':18} {'tokens/s':>9} {'vs target':>10} {'acceptance':>11}")
for m in r["modes"]:
    print(f"{m['mode']:18} {m['tokens_per_second']:9.1f} {m['speedup']:9.2f}x {m['acceptance']:11.2f}")
PY
}

case "${1:-all}" in
    build) step_build ;;
    check) step_check ;;
    speed) step_speed ;;
    all) step_build && step_check && step_speed ;;
    *) echo "usage: $0 [build|check|speed|all]" >&2; exit 2 ;;
esac
