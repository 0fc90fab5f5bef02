#!/usr/bin/env python3
"""A delaying TCP proxy for the RPC benchmark: network latency on loopback, in user space (no netem here).

    python bench/rpc_latency.py --rtt-ms 5 --upstream 127.0.0.1:50052 --upstream 127.0.0.1:50053

Listens on one loopback port per upstream and prints them as one JSON line ({"listen": ["127.0.0.1:P", ...]}).
Every chunk it reads is written on RTT/2 later, in each direction, in order: each direction has a queue of
(deadline, bytes) filled by a reader and drained by a writer, so a long transfer streams at full speed behind one
fixed delay instead of waiting RTT/2 per chunk. One request and its response therefore take RTT more than direct.

Threads, not asyncio: asyncio's timers go through epoll, whose timeout is whole milliseconds (rounded up), so a
0.5 ms hop became ~1 ms and a nominal 1 ms RTT measured 2 ms; time.sleep (clock_nanosleep) is good to ~0.1 ms.
Run as a child process so its Python work does not contend for the benchmark's GIL.

It also counts what goes by, for reading the latency numbers: the client's RPC commands by name (llama.cpp's
ggml-rpc framing: 1 command byte, 8-byte little-endian size, payload) and the server's replies (a reply = the
server speaking after the client did). Each line on stdin ("stats") is answered by one JSON line of counts per
upstream; end of stdin stops it.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

# ggml-rpc.cpp's enum rpc_cmd, in order (protocol 7.0 of the vendored llama.cpp)
RPC_COMMANDS = ("ALLOC_BUFFER", "GET_ALIGNMENT", "GET_MAX_SIZE", "BUFFER_GET_BASE", "FREE_BUFFER", "BUFFER_CLEAR",
                "SET_TENSOR", "SET_TENSOR_HASH", "GET_TENSOR", "COPY_TENSOR", "GRAPH_COMPUTE", "GET_DEVICE_MEMORY",
                "INIT_TENSOR", "GET_ALLOC_SIZE", "HELLO", "DEVICE_COUNT", "GRAPH_RECOMPUTE", "MEMSET_TENSOR")
HEADER = 9  # command byte + payload size


class Counts:
    """What one upstream saw, summed over its connections (updated by the reader threads under one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: dict[str, int] = {}
        self.replies = 0
        self.last_from_client = False  # who spoke last, to count replies as turns

    def command(self, code: int) -> None:
        name = RPC_COMMANDS[code] if code < len(RPC_COMMANDS) else f"cmd{code}"
        with self.lock:
            self.commands[name] = self.commands.get(name, 0) + 1

    def spoke(self, from_client: bool) -> None:
        with self.lock:
            if not from_client and self.last_from_client:
                self.replies += 1
            self.last_from_client = from_client

    def snapshot(self) -> dict:
        with self.lock:
            return {"commands": dict(self.commands), "replies": self.replies}


class CommandParser:
    """Splits the client's byte stream into RPC commands without keeping payloads (only the header is buffered)."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.header = b""
        self.skip = 0  # payload bytes of the current command still to come

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self.skip:
                n = min(self.skip, len(data) - i)
                self.skip -= n
                i += n
                continue
            need = HEADER - len(self.header)
            self.header += data[i:i + need]
            i += need
            if len(self.header) == HEADER:
                self.counts.command(self.header[0])
                self.skip = int.from_bytes(self.header[1:], "little")
                self.header = b""


def pump(src: socket.socket, dst: socket.socket, delay: float, counts: Counts, from_client: bool) -> None:
    """One direction: a reader stamping chunks with their due time, a writer sending each when due."""
    due: queue.Queue = queue.Queue()
    parser = CommandParser(counts) if from_client else None

    def read() -> None:
        try:
            while data := src.recv(1 << 20):
                due.put((time.monotonic() + delay, data))
                counts.spoke(from_client)
                if parser:
                    parser.feed(data)
        except OSError:
            pass
        due.put((0.0, b""))

    def write() -> None:
        try:
            while True:
                when, data = due.get()
                if not data:
                    break
                if (wait := when - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            try:  # the far side is gone: stop reading too
                src.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    for fn in (read, write):
        threading.Thread(target=fn, daemon=True).start()


def serve(listener: socket.socket, upstream: tuple[str, int], delay: float, counts: Counts) -> None:
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(upstream)
        for s in (client, server):  # ggml sets TCP_NODELAY on its sockets; Nagle here would hold small replies
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pump(client, server, delay, counts, from_client=True)
        pump(server, client, delay, counts, from_client=False)


# --- the benchmark's side ------------------------------------------------------------------------
class DelayProxy:
    """This file as a child process in front of ``upstreams``; ``listen`` holds the endpoints to connect to instead,
    in the same order."""

    def __init__(self, rtt_ms: float, upstreams: list[str]) -> None:
        cmd = [sys.executable, __file__, "--rtt-ms", str(rtt_ms), *[a for ep in upstreams for a in ("--upstream", ep)]]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise SystemExit(f"the delaying proxy did not start ({' '.join(cmd)})")
        self.listen: list[str] = json.loads(line)["listen"]

    def counts(self) -> list[dict]:
        """Commands and replies so far, per upstream."""
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def echo_server() -> str:
    """A loopback echo server in a daemon thread (one client at a time); its endpoint."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    threading.Thread(target=run, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def round_trip_ms(endpoint: str, n: int = 50, size: int = 64) -> float:
    """Median time of ``n`` request/response exchanges of ``size`` bytes with an echo server at ``endpoint``."""
    host, port = endpoint.rsplit(":", 1)
    times = []
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x" * size)
            got = 0
            while got < size:
                got += len(s.recv(size - got))
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt-ms", type=float, required=True, help="added round-trip time (half each way)")
    ap.add_argument("--upstream", action="append", required=True, help="HOST:PORT to forward to (repeatable)")
    args = ap.parse_args()
    counts = []
    listen = []
    for ep in args.upstream:
        host, port = ep.rsplit(":", 1)
        listener = socket.create_server(("127.0.0.1", 0))
        counts.append(Counts())
        listen.append(f"127.0.0.1:{listener.getsockname()[1]}")
        threading.Thread(target=serve, args=(listener, (host, int(port)), args.rtt_ms / 2e3, counts[-1]),
                         daemon=True).start()
    print(json.dumps({"listen": listen}), flush=True)
    for _ in sys.stdin:
        print(json.dumps([c.snapshot() for c in counts]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
