"""CPU facts and the AMX decision (gguf_mtp/cpu.py, llama_ext.extra_bufts_allowed).

The AMX crash (../shared/notes/cpu.md): GCC 12 drops the tile configuration's rows/colsb stores before
``ldtilecfg`` in ggml's ``ggml_tile_config_init``, so the first batched matmul through the AMX buffer type dies.
These tests run on any x86 CPU: the decision logic on faked CPU reports, and the machine code of the patched source
compiled for an AMX CPU (compiling needs no AMX; running would).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gguf_mtp import cpu, llama_ext, runtime_build
from upstream import llama_cpp_dir

MMQ = "ggml/src/ggml-cpu/amx/mmq.cpp"

# objdump -d of GCC 12's ggml_tile_config_init, as measured on the AMX VM (broken) and after the fix (ok)
BROKEN = """
0000000000027f00 <_Z24ggml_backend_amx_mul_matPK19ggml_compute_paramsP11ggml_tensor>:
   2819e:	vpxor  %xmm0,%xmm0,%xmm0
   281a2:	vmovdqa %ymm0,0xc0(%rsp)
   281aa:	movb   $0x1,0xc0(%rsp)
   281b2:	ldtilecfg 0xc0(%rsp)
"""
OK = """
0000000000027f00 <_Z24ggml_backend_amx_mul_matPK19ggml_compute_paramsP11ggml_tensor>:
   27fe4:	vpxor  %xmm0,%xmm0,%xmm0
   27fe8:	vmovdqa64 %zmm0,0xc0(%rsp)
   27ff0:	mov    0x0(%rip),%rax        # 27ff7 <x+0x337>
   27ff7:	vmovdqa 0x0(%rip),%xmm0        # 27fff <x+0x33f>
   27fff:	movb   $0x1,0xc0(%rsp)
   28007:	mov    %rax,0xf0(%rsp)
   2800f:	vmovdqa %xmm0,0xd0(%rsp)
   28018:	ldtilecfg 0xc0(%rsp)
"""


def test_cpu_flags_from_cpuinfo():
    info = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_int8 amx_bf16\n\nprocessor\t: 1\nflags\t: fpu\n"
    flags = cpu.cpu_flags(info)
    assert flags == {"fpu", "avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}
    assert cpu.reports_amx(flags) and not cpu.reports_amx({"amx_tile"})
    assert cpu.kernel_flags(flags) == ["avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"]
    assert cpu.cpu_flags("no flags line") == frozenset()


def test_tile_config_check_reads_machine_code():
    assert cpu.tile_config_checks(BROKEN) == [False]
    assert cpu.tile_config_checks(OK) == [True]
    assert cpu.tile_config_checks(OK + BROKEN) == [True, False]  # each ldtilecfg judged in its own function
    # stores to another base register, or only the zeroing, do not count
    assert cpu.tile_config_checks(OK.replace("0xf0(%rsp)", "0xf0(%rbp)")) == [False]
    assert cpu.tile_config_checks("") == []


def test_system_info_is_parsed():
    text = "CPU : SSE3 = 1 | AVX = 1 | AVX512 = 0 | AMX_INT8 = 1 | REPACK = 1 | "
    assert cpu.parse_system_info(text) == {"SSE3": True, "AVX": True, "AVX512": False, "AMX_INT8": True,
                                           "REPACK": True}


AMX_FLAGS = {"avx512f", "amx_tile", "amx_int8"}


@pytest.mark.parametrize("flags, permission, library, patched, usable, safe", [
    (set(), None, "absent", False, False, True),  # no AMX: nothing to decide
    (AMX_FLAGS, True, "absent", False, False, True),  # AMX CPU, build without AMX kernels (portable, other CPU)
    (AMX_FLAGS, True, "broken", False, False, False),  # the crash: stock GCC 12 native build
    (AMX_FLAGS, True, "broken", True, True, True),  # ours is patched (the check would not say broken, but patched wins)
    (AMX_FLAGS, True, "ok", False, True, True),  # a compiler that kept the stores
    (AMX_FLAGS, True, "unknown", False, False, False),  # no objdump to read it: do not bet the process on it
    (AMX_FLAGS, True, "unknown", True, True, True),
    (AMX_FLAGS, False, "broken", False, False, True),  # OS refused tile state: ggml offers no AMX buffer type
])
def test_amx_decision_on_faked_cpu_reports(monkeypatch, tmp_path, flags, permission, library, patched, usable, safe):
    monkeypatch.setattr(cpu, "request_tile_permission", lambda: permission)
    monkeypatch.setattr(cpu, "library_tile_config", lambda path: library)
    status = cpu.amx_status(tmp_path / "libggml-cpu.so", patched, flags)
    assert (status.usable, status.extra_bufts_safe) == (usable, safe), status
    assert status.to_dict()["extra_bufts_safe"] == safe


def test_unsafe_build_loads_without_extra_buffer_types_and_says_so_once(monkeypatch, capsys):
    broken = cpu.AmxStatus(True, True, "broken", False)
    monkeypatch.setattr(llama_ext, "cpu_amx", lambda: broken)
    llama_ext.extra_bufts_allowed.cache_clear()
    try:
        assert llama_ext.model_params(0).use_extra_bufts is False
        assert llama_ext.model_params(0).use_extra_bufts is False
        err = capsys.readouterr().err
        assert err.count("AMX kernels are miscompiled") == 1 and "gguf-mtp runtime build" in err
    finally:
        llama_ext.extra_bufts_allowed.cache_clear()
    # the settings' --no-repack is honoured on a safe build too
    assert llama_ext.model_params(0, repack=False).use_extra_bufts is False


def test_this_process_decision_matches_this_machine():
    status = llama_ext.cpu_amx()
    assert status.cpu_reports_amx == cpu.reports_amx(cpu.cpu_flags())
    assert status.patched == (runtime_build.AMX_TILE_CONFIG in runtime_build.loaded_patches())
    assert status.extra_bufts_safe, "the loaded runtime would crash on this CPU's AMX path"
    assert llama_ext.model_params(0).use_extra_bufts is True


def test_installed_cpu_backend_keeps_the_tile_configuration():
    """The library this process loads: AMX code either absent (not an AMX build) or correctly configured."""
    lib = runtime_build.cpu_library()
    assert lib is not None and lib.is_file()
    state = cpu.library_tile_config(lib)
    assert state in ("absent", "ok", "unknown")
    if state == "unknown":
        assert cpu.objdump() is None


def test_load_record_names_the_buffer_types(tiny_q, monkeypatch, tmp_path):
    from fixtures.runtime import TEST_SETTINGS
    from gguf_mtp.runtime.engine import Engine

    monkeypatch.setenv("GGUF_MTP_CACHE", str(tmp_path))
    with Engine.load(*tiny_q, TEST_SETTINGS) as eng:
        assert set(eng.buffers) == {str(p) for p in tiny_q}
        assert all(b and all(re.fullmatch(r"[A-Za-z0-9_]+", x) for x in b) for b in eng.buffers.values())
    record = runtime_build.read_load_record()
    assert record["models"] == eng.buffers


# --- the patch, in machine code -------------------------------------------------------------------------

def _compile_mmq(lcpp: Path, source: Path, out: Path) -> str:
    """mmq.cpp as a native build compiles it on a Sapphire Rapids CPU (-march=native there), disassembled."""
    src_dir = lcpp / "ggml" / "src"
    cmd = ["g++", "-std=c++17", "-O3", "-DNDEBUG", "-fPIC", "-fopenmp", "-DGGML_USE_OPENMP",
           "-march=sapphirerapids", f"-I{lcpp / 'ggml' / 'include'}", f"-I{src_dir}",
           f"-I{src_dir / 'ggml-cpu'}", f"-I{src_dir / 'ggml-cpu' / 'amx'}", "-c", str(source), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return cpu.disassemble(out)


def _gcc_major() -> int:
    out = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    return int(out.split(".")[0]) if out[:1].isdigit() else 0


@pytest.mark.skipif(shutil.which("g++") is None or cpu.objdump() is None, reason="needs g++ and objdump")
def test_patched_amx_source_keeps_the_tile_configuration_stores(tmp_path):
    """Our series applied to the sdist's mmq.cpp, compiled for an AMX CPU: every ldtilecfg is preceded by the
    colsb and rows stores. On GCC 12 the unpatched file drops them (the crash), so there the check has teeth."""
    lcpp = llama_cpp_dir()
    tree = tmp_path / "llama.cpp"
    series = runtime_build.load_series()
    for rel in {MMQ} | {f for p in series.patches for f in runtime_build.touched_files(p)}:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lcpp / rel, tree / rel)
    runtime_build.apply_patches(tree, series.patches)
    patched = tmp_path / "mmq-patched.cpp"
    shutil.copyfile(tree / MMQ, patched)
    checks = cpu.tile_config_checks(_compile_mmq(lcpp, patched, tmp_path / "patched.o"))
    assert checks and all(checks), checks
    if _gcc_major() == 12:
        stock = cpu.tile_config_checks(_compile_mmq(lcpp, lcpp / MMQ, tmp_path / "stock.o"))
        assert stock and not any(stock), "GCC 12 kept the stores in the stock file: the check would prove nothing"
