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
connections) and exits with ``RPC_EXIT_CODE`` instead of a core dump. A server that hangs without closing its
socket is not detected (llama.cpp reads without a timeout).
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import GgufMtpError
from ..settings import RuntimeSettings
from .bindings import _ggml

RPC_TIMEOUT_S = 5.0  # connect + handshake per server
RPC_EXIT_CODE = 3  # the process' exit status when an RPC server dies mid-run
REMEDY = "start it with: gguf-mtp rpc-server --host HOST --port PORT (on that machine)"

_added: dict[str, list[str]] = {}  # endpoint -> the device names its registry got (added once per process)
_lock = threading.Lock()


class RpcError(GgufMtpError):
    """An RPC server is unreachable, refuses, or is not an rpc-server of this runtime."""


def _fn(lib: str, name: str, restype, argtypes):
    f = getattr(_ggml(lib), name)
    f.restype, f.argtypes = restype, argtypes
    return f


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


# --- adding servers -------------------------------------------------------------------------------
def add_rpc_servers(endpoints: Sequence[str], timeout: float = RPC_TIMEOUT_S) -> list[str]:
    """Register each server's devices with ggml (once per process per endpoint); their names, in order."""
    if not endpoints:
        return []
    get_reg = _fn("ggml", "ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p])
    reg = get_reg(b"RPC")
    if not reg:
        raise RpcError("this llama-cpp-python has no RPC backend (rebuild it: gguf-mtp runtime build --rpc)")
    proc = _fn("ggml-base", "ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p])
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(proc(reg, b"ggml_backend_rpc_add_server"))
    register = _fn("ggml", "ggml_backend_register", None, [ctypes.c_void_p])
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
    count = _fn("ggml", "ggml_backend_dev_count", ctypes.c_size_t, [])
    get = _fn("ggml", "ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t])
    name = _fn("ggml-base", "ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p])
    desc = _fn("ggml-base", "ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p])
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


# --- a server dying mid-run ------------------------------------------------------------------------
_watched: list[str] = []
_abort_cb = None  # the ctypes callback must outlive the process' use of it


def _on_abort(message: bytes | None) -> None:
    try:
        text = (message or b"").decode("utf-8", "replace").strip()
        text = re.sub(r"^\S+:\d+: ", "", text)  # ggml's "file:line: " prefix
        if "RPC" not in text and not any(ep in text for ep in _watched):
            sys.stderr.write(f"llama.cpp aborted: {text}\n")
            return  # ggml calls abort() next
        hosts = [ep for ep in _watched if ep in text] or [ep for ep in _watched if reachable(ep, 1.0)] or _watched
        sys.stdout.flush()
        sys.stderr.write(f"error: RPC server {', '.join(hosts)} stopped answering (llama.cpp: {text}); "
                         f"the run was stopped\n")
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - nothing may cross back into C; exiting is all that is left
        pass
    os._exit(RPC_EXIT_CODE)


def watch_aborts(endpoints: Sequence[str]) -> None:
    """Install ggml's abort callback (once) and remember which endpoints to name."""
    global _abort_cb
    for ep in endpoints:
        if ep.strip() not in _watched:
            _watched.append(ep.strip())
    if _abort_cb is None:
        proto = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
        _abort_cb = proto(_on_abort)
        _fn("ggml-base", "ggml_set_abort_callback", ctypes.c_void_p, [proto])(_abort_cb)
