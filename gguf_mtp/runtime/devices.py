"""Several devices: llama.cpp RPC servers, the device list and tensor_split of a model, and what happens when an
RPC host is down or dies.

llama-cpp-python 0.3.36 dropped its ``rpc_servers`` parameter, so RPC servers are added the way llama-server adds
them (common/arg.cpp ``add_rpc_devices``): ``ggml_backend_rpc_add_server`` through the RPC registry's proc address,
then ``ggml_backend_register``. Each server's devices are named ``RPC<n>`` in the order they were added, with the
endpoint as description; ``device_handles`` also accepts ``RPC<n>[host:port]`` / ``RPC[host:port]`` (matched by
description), so a plan can name a server's device before the process has numbered it.

Failure, bounded: before llama.cpp connects (its connect and handshake have no timeout and abort the process on
failure) each host is reached with a Python socket under a timeout, and the handshake runs in a thread that is
given the same time. During generation a dead server makes llama.cpp abort (``GGML_ABORT``: "Remote RPC server
crashed"); ggml's abort callback then prints one ``error:`` line naming the host (the one that no longer accepts
connections) and exits with ``RPC_EXIT_CODE`` instead of a core dump. A server that hangs with its socket open
(stopped, swapping, a dead link without a reset) would block llama.cpp's reads for ever (its sockets have no
timeout): a watchdog thread watches llama.cpp's RPC threads (Linux ``/proc``), and one that sits in the same read
or write on a server's socket for ``STALL_S`` seconds ends the run the same way, naming that server.

ggml's symbols are taken through libllama's handle: the wheel ships ``libggml*.so`` and ``libggml*.so.0`` as
separate files, and loading the unversioned name maps a second copy, with its own device registry and abort
callback, that llama.cpp never uses.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import platform
import re
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from ..llama_ext import ggml_fn

RPC_TIMEOUT_S = 5.0  # connect + handshake per server
RPC_EXIT_CODE = 3  # the process' exit status when an RPC server dies or stalls mid-run
STALL_S = 120.0  # one read/write on a server's socket longer than this ends the run (a long prefill on a slow host
# is one compute round trip: this must exceed it)
REMEDY = "start it with: gguf-mtp rpc-server --host HOST --port PORT (on that machine)"

_added: dict[str, list[str]] = {}  # endpoint -> the device names its registry got (added once per process)
_lock = threading.Lock()


class RpcError(GgufMtpError):
    """An RPC server is unreachable, refuses, or is not an rpc-server of this runtime."""


def is_loopback(host: str) -> bool:
    """Does an address stay on this machine? (servers bind there unless told otherwise: no authentication)"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: only "localhost" is known to stay on this machine
        return False


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RpcError(f"RPC server: expected HOST:PORT, got {endpoint!r}")
    return host.strip("[]"), int(port)


def reachable(endpoint: str, timeout: float = RPC_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the endpoint opens within ``timeout``, else why not."""
    try:
        with socket.create_connection(split_endpoint(endpoint), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return e.strerror or str(e)


def launch_local_server(threads: int = 1, stderr=None, timeout: float = 30.0):
    """A ``gguf-mtp rpc-server`` child on a free loopback port, listening when this returns: (process, endpoint).
    For tests and benches (a real host runs the command itself). ``stderr``: a file for its log (default: dropped;
    never a pipe nobody drains: a full one blocks the server)."""
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gguf_mtp", "rpc-server", "--port", str(port), "--threads",
                             str(threads)], stdout=subprocess.DEVNULL, stderr=stderr or subprocess.DEVNULL)
    endpoint, deadline = f"127.0.0.1:{port}", time.monotonic() + timeout
    while reachable(endpoint, 1.0) is not None:
        exited = proc.poll() is not None
        if exited or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RpcError(f"rpc-server on {endpoint} " + (f"exited ({proc.returncode})" if exited else
                                                           f"did not listen within {timeout:g} s"))
        time.sleep(0.2)
    return proc, endpoint


# --- adding servers -------------------------------------------------------------------------------
def add_rpc_servers(endpoints: Sequence[str], timeout: float = RPC_TIMEOUT_S) -> list[str]:
    """Register each server's devices with ggml (once per process per endpoint); their names, in order."""
    if not endpoints:
        return []
    get_reg = ggml_fn("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    reg = get_reg(b"RPC")
    if not reg:
        raise RpcError("this llama-cpp-python has no RPC backend (rebuild it without --no-rpc: gguf-mtp runtime build)")
    proc = ggml_fn("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p])
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(proc(reg, b"ggml_backend_rpc_add_server"))
    register = ggml_fn("ggml_backend_register", None, [ctypes.c_void_p])
    watch_aborts(endpoints)
    names = []
    with _lock:
        for ep in endpoints:
            ep = ep.strip()
            if ep not in _added:
                _added[ep] = _add_one(ep, add, register, timeout)
            names += _added[ep]
    return names


def _add_one(endpoint: str, add, register, timeout: float) -> list[str]:
    why = reachable(endpoint, timeout)
    if why:
        raise RpcError(f"RPC server {endpoint}: cannot connect ({why}); {REMEDY}")
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(add(endpoint.encode()) or 0), daemon=True,
                              name=f"rpc-connect {endpoint}")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RpcError(f"RPC server {endpoint}: connected, but no RPC handshake within {timeout:g} s (is it a "
                       "gguf-mtp rpc-server of this runtime version?)")
    if not result or not result[0]:
        raise RpcError(f"RPC server {endpoint}: reports no devices (or a protocol version this runtime does not "
                       "speak)")
    before = set(_device_names())
    register(result[0])
    return [n for n in _device_names() if n not in before]


# --- devices --------------------------------------------------------------------------------------
def _devices() -> list[tuple[int, str, str]]:
    count = ggml_fn("ggml_backend_dev_count", ctypes.c_size_t, [])
    get = ggml_fn("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
    name = ggml_fn("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
    desc = ggml_fn("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p])
    out = []
    for i in range(count()):
        d = get(i)
        out.append((d, (name(d) or b"").decode(), (desc(d) or b"").decode()))
    return out


def _device_names() -> list[str]:
    return [n for _, n, _ in _devices()]


_RPC_REF = re.compile(r"RPC(\d*)\[(.+)\]")


def device_handles(names: Sequence[str]) -> list[int]:
    """ggml device handles for llama.cpp device names ("CUDA0", "RPC1", "RPC1[host:port]", "RPC[host:port]")."""
    devs = _devices()
    handles = []
    for want in names:
        found = [d for d, n, _ in devs if n == want]
        ref = _RPC_REF.fullmatch(want)
        if not found and ref:  # RPC<n>[ep]: the n-th device of that server counts as the same (plans name both)
            of_server = [(d, n) for d, n, desc in devs if desc == ref.group(2)]
            found = [d for d, n in of_server if n == f"RPC{ref.group(1)}"] or [d for d, _ in of_server[:1]]
        if not found:
            have = ", ".join(f"{n} ({desc})" for _, n, desc in devs)
            raise GgufMtpError(f"device {want!r}: llama.cpp has no such device (it has {have}; RPC devices appear "
                               "once --rpc adds their server)")
        handles.append(found[0])
    return handles


@dataclass
class Placement:
    """The device fields of one model's ``llama_model_params``; keeps the C arrays alive until the load."""

    n_gpu_layers: int
    devices: list[int] = field(default_factory=list)
    tensor_split: list[float] = field(default_factory=list)

    def apply(self, mp) -> None:
        mp.n_gpu_layers = self.n_gpu_layers
        if self.devices:
            self._devs = (ctypes.c_void_p * (len(self.devices) + 1))(*self.devices, None)
            mp.devices = ctypes.cast(self._devs, ctypes.c_void_p).value
        if self.tensor_split:
            self._split = (ctypes.c_float * 128)(*self.tensor_split)  # llama.cpp reads llama_max_devices() floats
            mp.tensor_split = self._split


def target_placement(s: RuntimeSettings, n_layer: int) -> Placement:
    """The target over ``s.devices`` (llama.cpp's layer split). A leading "CPU" entry is not a llama.cpp device:
    its share of tensor_split becomes the first layers kept on the CPU (fewer n_gpu_layers, when those are 'all')."""
    if not s.devices:  # llama.cpp's own device choice (RPC servers first, then GPUs), split as given
        return Placement(s.n_gpu_layers, [], list(s.tensor_split))
    names, split = list(s.devices), list(s.tensor_split) or [0.0] * len(s.devices)
    n_gpu = s.n_gpu_layers
    if "CPU" in names:
        if names.index("CPU") != 0 or names.count("CPU") > 1:
            raise GgufMtpError(f"devices: CPU must come first (llama.cpp keeps the first layers on the CPU), got "
                               f"{', '.join(names)}")
        total = sum(split)
        cpu_share = split[0] / total if total else 1.0 / len(names)
        names, split = names[1:], split[1:]
        if n_gpu < 0:
            n_gpu = n_layer + 1 - round(cpu_share * (n_layer + 1))
    return Placement(n_gpu if names else 0, device_handles(names), split if any(split) else [])


def drafter_placement(s: RuntimeSettings) -> Placement | None:
    """The drafter on one device: ``drafter_device``, else the device of the target's last layers (it reads their
    KV); None: as before (drafter_on_gpu). Its model still lists every target device (a one-hot tensor_split):
    the drafter context's scheduler needs a backend for each device that holds target KV it reads."""
    where = s.drafter_device or s.output_device
    if where is None:
        return None
    names = [n for n in s.devices if n != "CPU"] or ([where] if where != "CPU" else [])
    if where == "CPU":
        return Placement(0, device_handles(names))
    if where not in names:
        names.append(where)
    return Placement(-1, device_handles(names), [1.0 if n == where else 0.0 for n in names])


# --- a server dying or stalling mid-run ------------------------------------------------------------
_watched: list[str] = []
_abort_cb = None  # the ctypes callback must outlive the process' use of it
_watchdog: threading.Thread | None = None

# read, write, sendto, recvfrom, sendmsg, recvmsg: the calls whose first argument is the socket llama.cpp's RPC
# dispatcher thread waits on (by machine: Linux syscall numbers differ per architecture)
_IO_SYSCALLS = {"x86_64": {0, 1, 44, 45, 46, 47}, "aarch64": {63, 64, 206, 207, 211, 212}}


def stop_run(hosts: Sequence[str], what: str) -> None:
    """The one error line for a lost server, then exit: llama.cpp cannot continue a graph a server never
    finished, and its threads may hold locks, so nothing else (no output, no cleanup in C) runs after this."""
    try:
        sys.stdout.flush()
        sys.stderr.write(f"error: RPC server {', '.join(hosts)} {what}; the run was stopped\n")
        sys.stderr.flush()
    finally:
        os._exit(RPC_EXIT_CODE)


def _on_abort(message: bytes | None) -> None:
    try:
        text = (message or b"").decode("utf-8", "replace").strip()
        text = re.sub(r"^\S+:\d+: ", "", text)  # ggml's "file:line: " prefix
        if "RPC" not in text and not any(ep in text for ep in _watched):
            sys.stderr.write(f"llama.cpp aborted: {text}\n")
            return  # ggml calls abort() next
        hosts = [ep for ep in _watched if ep in text] or [ep for ep in _watched if reachable(ep, 1.0)] or _watched
        stop_run(hosts, f"stopped answering (llama.cpp: {text})")
    except BaseException:  # noqa: BLE001 - nothing may cross back into C; exiting is all that is left
        os._exit(RPC_EXIT_CODE)


def watch_aborts(endpoints: Sequence[str]) -> None:
    """Install ggml's abort callback and the stall watchdog (once each); remember which endpoints to name."""
    global _abort_cb, _watchdog
    for ep in endpoints:
        if ep.strip() not in _watched:
            _watched.append(ep.strip())
    if _abort_cb is None:
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        _abort_cb = proto(_on_abort)
        ggml_fn("ggml_set_abort_callback", ctypes.c_void_p, [proto])(_abort_cb)
    if _watchdog is None and platform.machine() in _IO_SYSCALLS and os.path.isdir("/proc/self/task"):
        _watchdog = threading.Thread(target=_watch_stalls, daemon=True, name="rpc-watchdog")
        _watchdog.start()


def _addresses(endpoint: str) -> set[tuple[str, int]]:
    host, port = split_endpoint(endpoint)
    try:
        return {(ai[4][0], port) for ai in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except OSError:
        return set()


def _hex_address(field_: str) -> tuple[str, int]:
    """/proc/net/tcp{,6}'s "0100007F:C350": the address in 32-bit words of host byte order (little-endian)."""
    addr, port = field_.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[7:]
    return ip, int(port, 16)


def rpc_sockets(endpoints: Sequence[str]) -> dict[str, str]:
    """{socket inode: endpoint} for this process' established TCP connections to the endpoints (Linux)."""
    want = {a: ep for ep in endpoints for a in _addresses(ep)}
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "01":  # ESTABLISHED
                ep = want.get(_hex_address(f[2]))
                if ep:
                    found[f[9]] = ep
    return found


def _blocked_on(tid: str, inodes: dict[str, str], io: set[int]) -> tuple[str, str] | None:
    """(endpoint, a fingerprint of the wait) when thread ``tid`` sits in a read/write on a server's socket."""
    try:
        call = open(f"/proc/self/task/{tid}/syscall").read().split()
        if not call or not call[0].isdigit() or int(call[0]) not in io:
            return None
        inode = os.readlink(f"/proc/self/fd/{int(call[1], 16)}")
        switches = [ln for ln in open(f"/proc/self/task/{tid}/status") if ln.startswith("voluntary_ctxt")]
    except (OSError, ValueError, IndexError):
        return None
    ep = inodes.get(inode.removeprefix("socket:[").rstrip("]"))
    # the same call, the same stack pointer and no context switch since: one wait, not many short round trips
    return (ep, " ".join(call) + "".join(switches)) if ep else None


def stalled(since: dict[str, tuple[str, float]], now: float, inodes: dict[str, str], io: set[int],
            limit: float) -> list[str]:
    """One watchdog step: update ``since`` ({tid: (fingerprint, first seen)}); the endpoints waited on > limit."""
    late = []
    for tid in os.listdir("/proc/self/task"):
        hit = _blocked_on(tid, inodes, io)
        if hit is None:
            since.pop(tid, None)
            continue
        ep, mark = hit
        if since.get(tid, ("", 0.0))[0] != mark:
            since[tid] = (mark, now)
        elif now - since[tid][1] > limit and ep not in late:
            late.append(ep)
    return late


def _watch_stalls() -> None:
    io = _IO_SYSCALLS[platform.machine()]
    since: dict[str, tuple[str, float]] = {}
    inodes: dict[str, str] = {}
    while True:
        limit = STALL_S  # read each time: tests and callers may shorten it
        time.sleep(min(1.0, limit / 5))
        try:
            inodes = rpc_sockets(list(_watched)) or inodes
            late = stalled(since, time.monotonic(), inodes, io, limit)
        except Exception:  # noqa: BLE001 - a watchdog that dies would leave a hang undetected; try again
            continue
        if late:
            stop_run(late, f"did not answer for {limit:g} s (connected, but stalled)")
