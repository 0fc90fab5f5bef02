#!/usr/bin/env python3
"""Serving over HTTP on the speed pair: aggregate tokens/s at 1, 2, 4, 8 concurrent streams, our server next to
llama-server, side by side in one run.

    python bench/bench_serve.py                       # builds .work/speed/pair on first use
    python bench/bench_serve.py --build-cpp -n 96 --repeats 2 --streams 1,2,4,8 --write-docs

Servers, each on the same files (speed pair, F16), the same k, the same prompts and load, bound to 127.0.0.1:

- ``gguf-mtp serve --parallel N --ctx N*512`` with the request's ``"draft"`` field: ``"off"`` (the target alone),
  ``{"max": 3}`` (MTP, k = 3) and ``"adaptive"``;
- ``llama-server -np N -c N*512 --kv-unified`` built from the same sdist with our patches (bench/cppbuild.py;
  ``--build-cpp`` builds it, or ``$LLAMA_SERVER``): the target alone, and ``--spec-type draft-mtp -md drafter
  --spec-draft-n-max 3`` (its p-min is 0: k = 3 every round, like ours).

Both: flash attention off, f32 KV cache (the drafter's too), no host-RAM prompt cache, ``--threads`` compute
threads (default 1: on a shared 2-core machine two spinning compute threads lose ~5x whenever anything else runs,
and the client and the servers' HTTP side need the other core).
For each N and each mode a fresh server process is started (no prompt cached from an earlier run: both servers
reuse a slot's cached prefix), warmed up with N requests of ``--warmup-tokens`` on other prompts, then sent N
streamed ``/v1/completions`` requests at once (greedy, ``-n`` tokens each, different prompts). A run takes from
the release of the requests to the last one's end; aggregate tokens/s = completion tokens / that time; time to
first token (TTFT) = from the release to the first text chunk. Modes run in turn within each repeat; the fastest
of ``--repeats`` counts for tokens/s, TTFT is pooled over the repeats. Acceptance comes from the servers' own
counts: ``usage.mtp`` (ours), ``timings.draft_n`` / ``draft_n_accepted`` (llama-server), with the lowest
per-request acceptance of the run in brackets. "same" counts replies equal to our target alone's for the prompt.
Our servers import a copy of gguf_mtp/ taken when the bench starts (.work/serve-bench/src), so every row runs
the same code even while the checkout changes. Every server is stopped (terminate, then kill) when its run ends,
also on errors and on SIGTERM.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cppbuild  # noqa: E402
from bench_speed_pair import speed_pair  # noqa: E402
from docsection import write_section  # noqa: E402

from gguf_mtp.tiny import speed_pair as sp  # noqa: E402

DOCS = ROOT / "docs" / "bench.md"
LOGS = ROOT / ".work" / "serve-bench"
HOST = "127.0.0.1"
SLOT_CTX = 512
K = 3
START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class Mode:
    name: str
    server: str  # "ours" | "llama-server"
    draft: object = None  # ours: the request's "draft" field; llama-server: None (target alone) or k


MODES = (Mode("ours target", "ours", "off"), Mode(f"ours k={K}", "ours", {"max": K}),
         Mode("ours adaptive", "ours", "adaptive"), Mode("llama-server target", "llama-server"),
         Mode(f"llama-server k={K}", "llama-server", K))


@dataclass
class Reply:
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    end: float = 0.0
    proposed: int | None = None
    accepted: int | None = None


@dataclass
class RunResult:
    seconds: float
    replies: list[Reply]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.replies)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def acceptance(self) -> tuple[float, float] | None:
        """(all accepted / all proposed, the lowest per-request rate), or None when nothing was proposed."""
        drafted = [r for r in self.replies if r.proposed]
        if not drafted:
            return None
        return (sum(r.accepted for r in drafted) / sum(r.proposed for r in drafted),
                min(r.accepted / r.proposed for r in self.replies) if len(drafted) == len(self.replies) else 0.0)


@dataclass
class Row:
    mode: Mode
    best: RunResult
    ttfts: list[float] = field(default_factory=list)


# --- servers -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_argv(mode: Mode, n: int, pair: tuple[Path, Path], llama_server: Path | None, threads: int,
                port: int) -> list[str]:
    target, drafter = pair
    common = ["--threads", str(threads)]
    if mode.server == "ours":
        return [sys.executable, "-m", "gguf_mtp", "serve", "--target", str(target), "--drafter", str(drafter),
                "--parallel", str(n), "--ctx", str(n * SLOT_CTX), "--host", HOST, "--port", str(port),
                "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32", *common]
    argv = [str(llama_server), "-m", str(target), "-np", str(n), "-c", str(n * SLOT_CTX), "--kv-unified",
            "--host", HOST, "--port", str(port), "-fa", "off", "-ctk", "f32", "-ctv", "f32", "-tb", str(threads),
            "--cache-ram", "0", "-fit", "off", "--no-webui", *common]
    if mode.draft is not None:
        argv += ["--spec-type", "draft-mtp", "-md", str(drafter), "--spec-draft-n-max", str(mode.draft),
                 "-td", str(threads), "-ctkd", "f32", "-ctvd", "f32"]
    return argv


def get_json(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body.startswith(b"{") else {}
    finally:
        conn.close()


class Server:
    """One server process on 127.0.0.1; its log under .work/serve-bench/. Use as a context manager."""

    def __init__(self, argv: list[str], port: int, log: Path, src: Path | None = None):
        self.argv, self.port, self.log, self.src = argv, port, log, src
        self.proc: subprocess.Popen | None = None
        self.model = ""

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as fh:
            env = {**os.environ, "PYTHONPATH": str(self.src)} if self.src else None  # ahead of the editable install
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                         cwd=self.src, env=env)
        try:
            self._wait_ready()
        except BaseException:  # also SystemExit from SIGTERM: no server outlives the bench
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{Path(self.argv[0]).name} exited ({self.proc.returncode}) before serving; "
                                   f"log {self.log}: {self.log.read_text(errors='replace')[-400:]}")
            try:
                if get_json(self.port, "/health")[0] == 200:
                    self.model = get_json(self.port, "/v1/models")[1]["data"][0]["id"]
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{' '.join(self.argv[:4])} not serving after {START_TIMEOUT:.0f} s; log {self.log}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


# --- client --------------------------------------------------------------------------------------

def body(mode: Mode, model: str, prompt: str, n: int) -> dict:
    b = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}}
    if mode.server == "ours":
        b["draft"] = mode.draft
    return b


def stream(port: int, payload: dict, release: threading.Barrier, t0: list[float], out: Reply) -> None:
    """POST one streamed completion once every stream is ready; fill ``out`` from the SSE chunks."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.connect()
        release.wait()
        conn.request("POST", "/v1/completions", json.dumps(payload), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        chunks = 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if "error" in ev:
                raise RuntimeError(f"server error: {ev['error']}")
            for choice in ev.get("choices") or []:
                if choice.get("text"):
                    out.ttft = out.ttft if out.ttft is not None else time.perf_counter() - t0[0]
                    out.text += choice["text"]
                    chunks += 1
            usage, timings = ev.get("usage") or {}, ev.get("timings") or {}
            if usage.get("completion_tokens") is not None:
                out.tokens = usage["completion_tokens"]
            if "mtp" in usage:
                out.proposed, out.accepted = usage["mtp"]["proposed"], usage["mtp"]["accepted"]
            if "draft_n" in timings:
                out.proposed, out.accepted = timings["draft_n"], timings["draft_n_accepted"]
            if timings.get("predicted_n") and not out.tokens:
                out.tokens = timings["predicted_n"]
        out.tokens = out.tokens or chunks
        out.end = time.perf_counter() - t0[0]
    finally:
        conn.close()


def concurrent(port: int, payloads: list[dict]) -> RunResult:
    """Every request released at once; the run ends with the last reply."""
    replies = [Reply() for _ in payloads]
    errors: list[BaseException] = []
    release, t0 = threading.Barrier(len(payloads) + 1), [0.0]

    def worker(p: dict, r: Reply) -> None:
        try:
            stream(port, p, release, t0, r)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
            release.abort()

    threads = [threading.Thread(target=worker, args=(p, r), daemon=True) for p, r in zip(payloads, replies)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    try:
        release.wait()
    except threading.BrokenBarrierError:
        pass
    t0[0] = time.perf_counter()  # the streams leave the barrier together with this thread
    for t in threads:
        t.join(REQUEST_TIMEOUT)
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}") from errors[0]
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"a request did not finish within {REQUEST_TIMEOUT:.0f} s")
    return RunResult(max(r.end for r in replies), replies)


def one_run(mode: Mode, n: int, args, pair, llama_server, prompts: list[str], warmups: list[str], tag: str,
            src: Path) -> RunResult:
    port = free_port()
    argv = server_argv(mode, n, pair, llama_server, args.threads, port)
    log = LOGS / f"{mode.name.replace(' ', '-').replace('=', '')}-np{n}-{tag}.log"
    with Server(argv, port, log, src if mode.server == "ours" else None) as srv:
        # weights paged in, graphs built, adaptive k's first cost and acceptance estimates learnt (a server that
        # has been up a while has them); other prompts, so no measured prompt is in a slot's cache
        concurrent(port, [body(mode, srv.model, w, args.warmup_tokens) for w in warmups[:n]])
        return concurrent(port, [body(mode, srv.model, p, args.tokens) for p in prompts[:n]])


# --- report --------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


SAME_K = {"ours target": "llama-server target", f"ours k={K}": f"llama-server k={K}"}  # ours -> its peer


def table(results: dict[int, dict[str, Row]]) -> list[str]:
    lines = ["| streams | server, mode | tokens/s | vs our target alone | vs llama-server, same k | "
             "TTFT mean / p50 / p90 ms | acceptance (lowest request) | tokens | same as ours target |",
             "|---:|---|---:|---:|---:|---|---|---:|---:|"]
    for n, rows in results.items():
        base = rows.get("ours target")
        for name, row in rows.items():
            tps, peer = row.best.tokens_per_second, rows.get(SAME_K.get(name, ""))
            acc, t = row.best.acceptance(), [x * 1000 for x in row.ttfts]
            same = sum(r.text == b.text for r, b in zip(row.best.replies, base.best.replies)) if base else None
            lines.append(
                f"| {n} | {name} | {tps:.1f} | {f'{tps / base.best.tokens_per_second:.2f}x' if base else '-'} | "
                f"{f'{tps / peer.best.tokens_per_second:.2f}x' if peer else '-'} | "
                f"{statistics.mean(t):.0f} / {pct(t, 0.5):.0f} / {pct(t, 0.9):.0f} | "
                f"{f'{acc[0]:.2f} ({acc[1]:.2f})' if acc else '-'} | {row.best.tokens} | "
                f"{'-' if same is None else f'{same}/{n}'} |")
    return lines


def verdict(ratio: float, strict: bool) -> str:
    met = ratio > 1 if strict else ratio >= 1
    tie = "; within 5%: inside this machine's run-to-run noise" if abs(ratio - 1) < 0.05 else ""
    return f"goal {'>' if strict else '>='} 1: {'met' if met else 'not met'}{tie}"


def claims(results: dict[int, dict[str, Row]]) -> list[str]:
    """The issue's goals: batched MTP beats batched target alone at 4 streams; ours >= llama-server at equal N, k."""
    out = []
    rows4 = results.get(4, {})
    for name in (f"ours k={K}", "ours adaptive"):
        if "ours target" in rows4 and name in rows4:
            r = rows4[name].best.tokens_per_second / rows4["ours target"].best.tokens_per_second
            out.append(f"4 streams, {name} vs ours target alone: {r:.2f}x ({verdict(r, strict=True)})")
    for n, rows in results.items():
        for ours, theirs in SAME_K.items():
            if ours in rows and theirs in rows:
                r = rows[ours].best.tokens_per_second / rows[theirs].best.tokens_per_second
                out.append(f"{n} stream(s), {ours} vs {theirs}: {r:.2f}x ({verdict(r, strict=False)})")
    return out


def snapshot() -> Path:
    """A copy of gguf_mtp/ that our servers import for the whole run: the checkout may change under a long run
    (other work in progress), and every row must come from the same code."""
    dest = LOGS / "src"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT / "gguf_mtp", dest / "gguf_mtp", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def revision() -> str:
    """The checkout our server ran from: commit, and whether gguf_mtp/ had uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "gguf_mtp"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in gguf_mtp/' if dirty.strip() else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / ".work" / "speed" / "pair")
    ap.add_argument("-n", "--tokens", type=int, default=96, help="max_tokens of every measured request")
    ap.add_argument("--warmup-tokens", type=int, default=32, help="max_tokens of each warm-up request")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per server (1: see above)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--modes", default=",".join(m.name for m in MODES), help="comma-separated subset of the modes")
    ap.add_argument("--build-cpp", action="store_true", help="build llama-server first (bench/cppbuild.py)")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the serve section of docs/bench.md")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so every `with Server` stops its process

    streams = [int(s) for s in args.streams.split(",")]
    wanted = {m.strip() for m in args.modes.split(",")}
    llama_server = (cppbuild.build_tools("llama-server")["llama-server"] if args.build_cpp
                    else cppbuild.find_tool("llama-server", env="LLAMA_SERVER"))
    modes = [m for m in MODES if m.name in wanted and (m.server == "ours" or llama_server)]
    skipped = [m.name for m in MODES if m.name in wanted and m not in modes]
    pair = tuple(p.resolve() for p in speed_pair(args.workdir))  # absolute: ours run in the snapshot
    lines = sp.corpus_lines()
    prompts = sp.prompts(max(streams))
    warmups = [x for x in lines if x not in prompts][:max(streams)]
    load0 = os.getloadavg()[0]
    print(f"speed pair, greedy, {args.tokens} tokens per stream, {args.threads} thread(s), fastest of "
          f"{args.repeats}; {platform.machine()}, {os.cpu_count()} CPUs (load {load0:.1f}); flash attention off, "
          f"f32 KV cache", flush=True)
    if skipped:
        print(f"skipped (llama-server not built; --build-cpp or $LLAMA_SERVER): {', '.join(skipped)}")

    rev, src = revision(), snapshot()
    results: dict[int, dict[str, Row]] = {}
    for n in streams:
        rows: dict[str, Row] = {}
        for rep in range(args.repeats):
            for mode in modes:
                r = one_run(mode, n, args, pair, llama_server, prompts, warmups, f"r{rep}", src)
                row = rows.setdefault(mode.name, Row(mode, r))
                row.best = r if r.seconds < row.best.seconds else row.best
                row.ttfts += [x.ttft for x in r.replies if x.ttft is not None]
                acc = r.acceptance()
                print(f"  N={n} rep {rep} {mode.name:<20} {r.tokens_per_second:7.1f} tok/s  {r.tokens:4d} tokens"
                      f"{f'  acceptance {acc[0]:.2f} (min {acc[1]:.2f})' if acc else ''}", flush=True)
        results[n] = rows
        print("\n".join(table({n: rows})[2:]), flush=True)

    out = table(results)
    found = claims(results)
    print("\n".join(["", *out, "", *found]))
    if args.write_docs:
        shown = llama_server.relative_to(ROOT) if llama_server and llama_server.is_relative_to(ROOT) else llama_server
        head = (f"Speed pair, {len(streams)} loads x {len(modes)} modes, greedy, {args.tokens} tokens per request, "
                f"{args.threads} thread(s) per server, fastest of {args.repeats} (TTFT pooled over them); "
                f"{platform.machine()}, {os.cpu_count()} CPUs (1-minute load average {load0:.1f} before the run, "
                f"{os.getloadavg()[0]:.1f} after); flash attention off, f32 KV cache; ours at {rev}; "
                f"llama-server: `{shown}`.")
        note = [f"Not measured: {', '.join(skipped)} (llama-server not built)."] if skipped else []
        write_section(DOCS, "serve", "\n".join([head, "", *out, "", *note, *[f"- {c}" for c in found]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
