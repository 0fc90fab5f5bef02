"""llama.cpp RPC: a tiny pair split over the local CPU and two rpc-servers on loopback decodes exactly like the
target alone on the CPU; a dead or refusing server is one clear error, in bounded time, never a hang.

Needs a runtime with RPC (``gguf-mtp runtime build``, not ``--no-rpc``; skipped otherwise). Everything that adds RPC
devices runs in a child process: ggml's device registry is process-wide (later loads would use the servers), and a
server dying mid-run ends the process that used it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile

import pytest
from click.testing import CliRunner

from gguf_mtp import runtime_build
from gguf_mtp.cli import main
from gguf_mtp.errors import GgufMtpError
from gguf_mtp.runtime import devices
from gguf_mtp.runtime_build import rpc_server_path
from gguf_mtp.settings import RuntimeSettings

needs_rpc = pytest.mark.skipif(rpc_server_path() is None,
                               reason="runtime without rpc-server (built with --no-rpc)")

FAMILY = "tiny-dense"
PROMPT = [2, 105, 9, 17, 33, 4, 88]
COMMON = ["--threads", "1", "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32", "--ctx", "512"]
LOAD_TIMEOUT = 120  # seconds a child may take to load and generate (2 shared cores)
FAIL_TIMEOUT = 30  # seconds an RPC failure may take to become an error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    log = tempfile.TemporaryFile()
    try:
        return devices.launch_local_server(threads=1, stderr=log)
    except devices.RpcError as e:
        log.seek(0)
        raise RuntimeError(f"{e}: {log.read().decode(errors='replace')}") from None


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.fixture()
def servers():
    """Two rpc-servers on loopback (CPU backends, ephemeral ports); always killed at the end."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(2):
            procs.append(start_server())
        yield procs
    finally:
        for proc, _ in procs:
            stop(proc)


def gguf_mtp(*args: str, timeout: float = LOAD_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gguf_mtp", *args], capture_output=True, text=True, timeout=timeout)


def generate(target, drafter, *extra: str) -> tuple[list[int], str]:
    args = ["generate", "--target", str(target), "--prompt-tokens", ",".join(map(str, PROMPT)), "-n", "40", "--json",
            "-v", *COMMON, *extra]
    r = gguf_mtp(*args, *(["--drafter", str(drafter)] if drafter else ["--no-drafter"]))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["tokens"], r.stderr


@needs_rpc
def test_split_over_cpu_and_two_rpc_servers_matches_local_target(runtime_ggufs, servers):
    target, drafter = runtime_ggufs[FAMILY]
    local, _ = generate(target, None)
    (_, a), (_, b) = servers
    split, log = generate(target, drafter, "--draft-max", "3", "--rpc", f"{a},{b}", "--device",
                          f"CPU,RPC[{a}],RPC[{b}]", "--tensor-split", "1,1,1")
    assert split == local
    for ep in (a, b):  # the target's weights really went to both servers
        assert any(f"[{ep}]" in ln and "model buffer size" in ln for ln in log.splitlines()), log[-3000:]
    assert "CPU model buffer size" in log or "CPU_Mapped model buffer size" in log


@needs_rpc
def test_a_plan_over_two_rpc_servers_runs_as_planned(runtime_ggufs, servers, tmp_path):
    """plan --vram 0 --rpc A=SIZE --rpc B=SIZE (a client with no GPU of its own): the plan file's devices, split and
    drafter device drive generate --plan, the weights land where the plan put them, and greedy MTP output equals
    the target alone's on the CPU."""
    target, drafter = runtime_ggufs[FAMILY]
    (_, a), (_, b) = servers
    plan = tmp_path / "plan.json"
    r = gguf_mtp("plan", "--target", str(target), "--drafter", str(drafter), "--vram", "0", "--margin", "0",
                 "--rpc", f"{a}=64MiB", "--rpc", f"{b}=64MiB", "--ctx", "512", "-o", str(plan))
    assert r.returncode == 0, r.stderr[-3000:]
    runtime = json.loads(plan.read_text())["runtime"]
    assert runtime["rpc"] == [a, b] and runtime["devices"] == ["RPC0", "RPC1"] and runtime["drafter_device"] == "RPC1"
    local, _ = generate(target, None)
    split, log = generate(target, drafter, "--draft-max", "3", "--plan", str(plan))
    assert split == local
    for ep in (a, b):
        assert any(f"[{ep}]" in ln and "model buffer size" in ln for ln in log.splitlines()), log[-3000:]
    no_gpu = gguf_mtp("plan", "--target", str(target), "--vram", "0")
    assert no_gpu.returncode == 2 and no_gpu.stderr.count("error:") == 1, no_gpu.stderr


@needs_rpc
def test_refused_host_is_one_clear_error(runtime_ggufs):
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = gguf_mtp("generate", "--target", str(runtime_ggufs[FAMILY][0]), "--prompt-tokens", "1,2", "--rpc",
                 f"127.0.0.1:{port}", timeout=FAIL_TIMEOUT)
    assert time.monotonic() - t0 < FAIL_TIMEOUT
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "cannot connect" in errors[0], r.stderr


def run_until_rounds(target, drafter, servers, rounds: int = 3, stall_s: float = 120.0) -> subprocess.Popen:
    """A child generating over CPU + both servers, one printed line per round; returned after ``rounds`` lines."""
    (_, a), (_, b) = servers
    script = textwrap.dedent(f"""
        from gguf_mtp.runtime import devices
        from gguf_mtp.runtime.engine import Engine
        from gguf_mtp.runtime.loop import speculative_generate
        from gguf_mtp.runtime.adaptive import FixedK
        from gguf_mtp.settings import RuntimeSettings
        devices.STALL_S = {stall_s!r}
        s = RuntimeSettings(n_ctx=16384, threads=1, flash_attn="off", rpc=[{a!r}, {b!r}],
                            devices=["CPU", "RPC[{a}]", "RPC[{b}]"], tensor_split=[1, 1, 1])
        eng = Engine.load({str(target)!r}, {str(drafter)!r}, s, k_max=3)
        for r in speculative_generate(eng, {PROMPT!r}, max_tokens=16000, chooser=FixedK(3), ignore_eog=True):
            print("round", len(r.tokens), flush=True)
        print("finished", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + LOAD_TIMEOUT
    seen = 0
    while seen < rounds and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        seen += line.startswith("round")
    if seen < rounds:
        child.kill()
        _, err = child.communicate()
        raise AssertionError(f"no {rounds} rounds: {err[-3000:]}")
    return child


def outcome(child: subprocess.Popen) -> tuple[str, str, float]:
    """The child's rest of stdout, its stderr and how long it took to end (killed after FAIL_TIMEOUT)."""
    t0 = time.monotonic()
    try:
        out, err = child.communicate(timeout=FAIL_TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return out, err, time.monotonic() - t0


def assert_one_error_naming(child, out: str, err: str, host: str, other: str, what: str) -> None:
    assert "finished" not in out
    assert child.returncode == devices.RPC_EXIT_CODE, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and host in errors[0] and other not in errors[0] and what in errors[0], err[-2000:]
    assert "Backtrace" not in err and "#0 " not in err, err[-2000:]  # ours, not llama.cpp's abort report


@needs_rpc
def test_server_killed_mid_generation_stops_the_run(runtime_ggufs, servers):
    """The second server dies after the first rounds: the child names it and exits non-zero, no hang."""
    target, drafter = runtime_ggufs[FAMILY]
    (_, a), (victim, b) = servers
    child = run_until_rounds(target, drafter, servers)
    victim.kill()
    out, err, took = outcome(child)
    assert took < FAIL_TIMEOUT, err[-2000:]
    assert_one_error_naming(child, out, err, b, a, "stopped answering")


@needs_rpc
def test_stalled_server_ends_the_run_after_the_stall_limit(runtime_ggufs, servers):
    """A server that keeps its socket open but stops (SIGSTOP) would block llama.cpp's read for ever: the watchdog
    names it once one read has waited longer than devices.STALL_S (2 s here)."""
    target, drafter = runtime_ggufs[FAMILY]
    (_, a), (victim, b) = servers
    child = run_until_rounds(target, drafter, servers, stall_s=2.0)
    victim.send_signal(signal.SIGSTOP)
    try:
        out, err, took = outcome(child)
    finally:
        victim.send_signal(signal.SIGCONT)
    assert took < FAIL_TIMEOUT, err[-2000:]
    assert_one_error_naming(child, out, err, b, a, "did not answer for 2 s")


def test_watchdog_names_only_a_thread_stuck_in_one_read(monkeypatch):
    """stalled(): a thread in the same read on a server's socket past the limit is reported; one that makes
    progress (another wait each time) or waits on another socket is not."""
    if not os.path.isdir("/proc/self/task") or platform.machine() not in devices._IO_SYSCALLS:
        pytest.skip("Linux /proc and a known syscall table needed")
    left, right = socket.socketpair()
    other, _keep = socket.socketpair()
    inode = os.readlink(f"/proc/self/fd/{left.fileno()}").removeprefix("socket:[").rstrip("]")
    io = devices._IO_SYSCALLS[platform.machine()]
    stuck = threading.Thread(target=left.recv, args=(1,), daemon=True)
    idle = threading.Thread(target=other.recv, args=(1,), daemon=True)
    stuck.start()
    idle.start()
    try:
        time.sleep(0.2)
        since: dict = {}
        assert devices.stalled(since, 0.0, {inode: "h:1"}, io, 5.0) == []
        assert devices.stalled(since, 4.0, {inode: "h:1"}, io, 5.0) == []
        assert devices.stalled(since, 6.0, {inode: "h:1"}, io, 5.0) == ["h:1"]
        assert devices.stalled({}, 6.0, {"0": "h:1"}, io, 5.0) == []  # not a server's socket
        right.send(b"x")  # the read returns: a later wait starts its own clock
        stuck.join(5)
        assert devices.stalled(since, 7.0, {inode: "h:1"}, io, 5.0) == []
    finally:
        _keep.send(b"x")
        for s_ in (left, right, other, _keep):
            s_.close()


def test_proc_net_tcp_addresses():
    assert devices._hex_address("0100007F:C350") == ("127.0.0.1", 50000)
    assert devices._hex_address("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)
    assert devices._hex_address("00000000000000000000000001000000:0050") == ("::1", 80)


PER_DEVICE_EXACT = 0.005  # weights and KV per device: the 0.5%
PER_DEVICE_COMPUTE = 0.10  # compute buffers per device: 10%
SMALL_COMPUTE = 2 * 2**20  # compute buffers below this are compared absolutely (tests/test_plan.py's SMALL)


def compare_devices_in_child(target, drafter, servers, n_gpu_layers: int, **settings) -> list[dict]:
    """probe.compare_devices over CPU + the two servers, in a child (it adds the servers to its process)."""
    (_, a), (_, b) = servers
    s = RuntimeSettings(rpc=[a, b], devices=[f"RPC[{a}]", f"RPC[{b}]"], tensor_split=[1.0, 1.0],
                        n_gpu_layers=n_gpu_layers, drafter_device=f"RPC[{b}]", **settings)
    script = textwrap.dedent(f"""
        import json
        from gguf_mtp.planning.probe import compare_devices
        from gguf_mtp.settings import RuntimeSettings
        s = RuntimeSettings.from_dict(json.loads({json.dumps(s.to_dict())!r}))
        rows = compare_devices({str(target)!r}, {str(drafter) if drafter else None!r}, s)
        print(json.dumps([r.to_dict() for r in rows]))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=LOAD_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@needs_rpc
@pytest.mark.parametrize("family", ["tiny-dense", "tiny-moe"])
def test_plan_per_device_matches_llama_cpp_over_rpc(runtime_ggufs, servers, family):
    """The plan's weights and KV on the CPU and on each rpc-server equal llama.cpp's own per-device allocation
    (no_alloc load over the same devices) within 0.5%; compute buffers within 10%."""
    target, drafter = runtime_ggufs[family]
    rows = compare_devices_in_child(target, drafter, servers, n_gpu_layers=4, n_ctx=512, flash_attn="off")
    (_, a), (_, b) = servers
    print(json.dumps(rows, indent=1))
    on = {r["item"] for r in rows}
    for dev in ("CPU", f"RPC[{a}]", f"RPC[{b}]"):  # every device holds target weights and KV
        assert f"target weights on {dev}" in on and f"target KV cache on {dev}" in on, rows
    assert f"drafter weights on RPC[{b}]" in on
    assert_per_device_agreement(rows)


def assert_per_device_agreement(rows: list[dict]) -> None:
    for r in rows:
        if "compute" in r["item"]:  # tiny graphs: a few input rows dominate, compared absolutely (as test_plan)
            assert abs(r["error"]) <= PER_DEVICE_COMPUTE or abs(r["planner"] - r["llama"]) <= SMALL_COMPUTE, r
        else:
            assert abs(r["error"]) <= PER_DEVICE_EXACT, r


@needs_rpc
def test_full_size_plan_per_device_matches_llama_cpp_over_rpc(skeletons, servers):
    """The same on a full-size 26B-A4B skeleton (sparse file: llama.cpp's no_alloc load reads no weights): 20 of
    its 30 layers split over the two servers, the rest and the drafter's side on the CPU / last server."""
    target = skeletons.get("26B-A4B", "target", "Q4_K_M")
    drafter = skeletons.get("26B-A4B", "drafter", "Q8_0")
    rows = compare_devices_in_child(target, drafter, servers, n_gpu_layers=21, n_ctx=8192)
    print(json.dumps(rows, indent=1))
    big = [r for r in rows if "compute" in r["item"] and r["llama"] > 64 * SMALL_COMPUTE]
    assert big, rows  # the full-size graphs are compared relatively
    assert_per_device_agreement(rows)


def split_args(servers) -> list[str]:
    (_, a), (_, b) = servers
    return ["--rpc", f"{a},{b}", "--device", f"CPU,RPC[{a}],RPC[{b}]", "--tensor-split", "1,1,1"]


@needs_rpc
def test_chat_over_rpc_answers_as_locally(runtime_ggufs, servers):
    """gguf-mtp chat --rpc: the same greedy replies split over CPU + two servers as all on the CPU."""
    target, drafter = runtime_ggufs[FAMILY]
    base = ["chat", "--target", str(target), "--drafter", str(drafter), "-n", "16", "--draft-max", "3", "--temp", "0",
            *COMMON]
    script = "the cat sat\nand then\n/exit\n"
    local = subprocess.run([sys.executable, "-m", "gguf_mtp", *base], input=script, capture_output=True, text=True,
                           timeout=LOAD_TIMEOUT)
    split = subprocess.run([sys.executable, "-m", "gguf_mtp", *base, *split_args(servers)], input=script,
                           capture_output=True, text=True, timeout=LOAD_TIMEOUT)
    assert local.returncode == 0 and split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == local.stdout and split.stdout.strip()


def serve_reply(args: list[str], prompt: str) -> str:
    """Start gguf-mtp serve (port 0), ask one greedy completion, stop it; the reply text."""
    import httpx2

    proc = subprocess.Popen([sys.executable, "-m", "gguf_mtp", "serve", "--port", "0", "--grace", "0",
                             "--model-name", "m", *args],
                            stderr=subprocess.PIPE, text=True)
    try:
        line, deadline = "", time.monotonic() + LOAD_TIMEOUT
        while "serving " not in line:
            assert time.monotonic() < deadline and proc.poll() is None, line
            line = proc.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)[1]
        with httpx2.Client(base_url=url, timeout=LOAD_TIMEOUT) as http:
            r = http.post("/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 16,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


@needs_rpc
def test_serve_over_rpc_answers_as_locally(runtime_ggufs, servers):
    """gguf-mtp serve --rpc: a greedy completion split over CPU + two servers equals the all-local one."""
    target, drafter = runtime_ggufs[FAMILY]
    base = ["--target", str(target), "--drafter", str(drafter), "--draft-max", "3", *COMMON]
    local = serve_reply(base, "the cat sat on the mat")
    split = serve_reply([*base, *split_args(servers)], "the cat sat on the mat")
    assert split == local and local


# --- without the RPC build -------------------------------------------------------------------------

def test_rpc_build_has_its_own_variant_and_cache_key(monkeypatch):
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    assert runtime_build.variant_name(False, None) == "cpu-rpc"  # RPC is in the default build
    assert runtime_build.variant_name(True, "86", portable=True) == "cuda-86-rpc-portable"
    plain, rpc = runtime_build.cmake_args(False, None, rpc=False), runtime_build.cmake_args(False, None)
    assert "-DGGML_RPC=ON" in rpc and "-DGGML_RPC=ON" not in plain
    assert runtime_build.cache_key("s", plain, set(), "c") != runtime_build.cache_key("s", rpc, set(), "c")


def test_add_to_wheel_lists_the_server_in_record(tmp_path):
    wheel = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("x/__init__.py", "")
        zf.writestr("x-1.0.dist-info/RECORD", "x/__init__.py,sha256=abc,0\nx-1.0.dist-info/RECORD,,\n")
    server = tmp_path / "rpc-server"
    server.write_bytes(b"binary")
    for _ in range(2):  # adding twice replaces, never duplicates
        runtime_build.add_to_wheel(wheel, server, "x/lib/rpc-server")
    with zipfile.ZipFile(wheel) as zf:
        record = zf.read("x-1.0.dist-info/RECORD").decode().splitlines()
        assert zf.read("x/lib/rpc-server") == b"binary"
        assert (zf.getinfo("x/lib/rpc-server").external_attr >> 16) & 0o111
        assert zf.namelist().count("x/lib/rpc-server") == 1
    assert [ln.split(",")[0] for ln in record] == ["x/__init__.py", "x/lib/rpc-server", "x-1.0.dist-info/RECORD"]


def test_cpu_share_becomes_layers_kept_on_the_cpu():
    from gguf_mtp.runtime.devices import drafter_placement, target_placement

    p = target_placement(RuntimeSettings(devices=["CPU"], tensor_split=[1.0]), n_layer=7)
    assert (p.n_gpu_layers, p.devices) == (0, [])
    assert drafter_placement(RuntimeSettings(devices=["CPU"], tensor_split=[1.0])).n_gpu_layers == 0
    assert drafter_placement(RuntimeSettings()) is None  # one device: as before
    with pytest.raises(GgufMtpError, match="CPU must come first"):
        target_placement(RuntimeSettings(devices=["RPC0", "CPU"]), n_layer=7)
    with pytest.raises(GgufMtpError, match="no such device"):
        target_placement(RuntimeSettings(devices=["CPU", "RPC[127.0.0.1:1]"]), n_layer=7)


def test_rpc_server_needs_the_rpc_build(monkeypatch):
    monkeypatch.setattr(runtime_build, "rpc_server_path", lambda: None)
    r = CliRunner().invoke(main, ["rpc-server", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "without --no-rpc" in r.output


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                          ("192.168.1.20", True), ("0.0.0.0", True), ("gpu-box", True)])
def test_rpc_server_warns_off_loopback_and_execs_the_runtimes_server(monkeypatch, tmp_path, host, warned):
    """Anything but loopback gets the no-authentication warning; then the process becomes llama.cpp's rpc-server
    (exec: signals reach it) with the address as given. Nothing listens here: exec is replaced."""
    binary = tmp_path / "rpc-server"
    monkeypatch.setattr("gguf_mtp.runtime_build.rpc_server_path", lambda: binary)
    execs = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    r = CliRunner().invoke(main, ["rpc-server", "--host", host, "--port", "50999", "--threads", "2"])
    assert r.exit_code == 0, r.output
    assert ("no authentication" in r.stderr) == warned
    (path, argv, env), = execs
    assert path == binary and argv == [str(binary), "--host", host, "--port", "50999", "--threads", "2"]
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(tmp_path)
