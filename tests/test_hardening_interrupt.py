"""Interrupted writes: kill -9 and Ctrl-C (SIGINT) at random points of ``convert`` and ``quantize``.

Each run starts the real command line in a subprocess on a checkpoint big enough to take ~0.5 s of writing
(tiny-q widened to 8 layers: 33 MB of bf16), waits until its temp file appears, sleeps a random part of the
measured write time and sends the signal. After every run the output path holds nothing, the old file (with
--force over an existing output), or the complete new file, byte for byte. Ctrl-C leaves no temp file; kill -9
leaves one, which the next run into that directory removes. GGUF_MTP_INTERRUPT_RUNS=N repeats the campaign N
times; ``pytest -s`` prints each campaign's outcomes (docs/hardening.md has the counts of the long run).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gguf_mtp.fsutil import TMP_PREFIX

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("GGUF_MTP_INTERRUPT_RUNS", "1") or 1)


def cli(*args: str) -> list[str]:
    """The command line as the ``gguf-mtp`` entry point runs it. Not ``python -m``: after a caught Ctrl-C,
    CPython may still end a ``-m`` run by SIGINT instead of its exit code (its unhandled_keyboard_interrupt flag)."""
    return [sys.executable, "-c", "from gguf_mtp.cli import main; main(prog_name='gguf-mtp')", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "GGUF_MTP_DEBUG": ""}


def temps(d: Path) -> list[Path]:
    return sorted(d.glob(TMP_PREFIX + "*"))


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    """tiny-q with 8 layers and a 1024-wide MLP: big enough that writing it takes a while."""
    from gguf_mtp.tiny import build_family
    from gguf_mtp.tiny.configs import FAMILIES, F, S, text_fields

    base = FAMILIES["tiny-q"]
    text = {k: v for k, v in base.target_text.items() if k != "num_hidden_layers"}
    text.update(layer_types=[S, F] * 4, intermediate_size=1024)
    spec = dataclasses.replace(base, name="tiny-wide", target_text=text_fields(**text))
    return build_family(spec, tmp_path_factory.mktemp("wide") / "tiny-wide") / "target"


@dataclasses.dataclass
class Job:
    """One command whose output is watched: its arguments, output path and a reference copy of the output."""

    name: str
    args: list[str]
    out: Path
    reference: bytes = b""
    write_seconds: float = 0.0  # from the temp file's appearance to the output's

    def run_clean(self) -> None:
        """A full run, timed: the reference output and how long its writing takes."""
        self.out.unlink(missing_ok=True)
        p = subprocess.Popen(cli(*self.args, "--force"), env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        t_tmp = _wait_for(lambda: temps(self.out.parent) or p.poll() is not None)
        t_out = _wait_for(lambda: self.out.exists() or p.poll() is not None)
        assert p.wait(120) == 0, p.stderr.read().decode()
        self.write_seconds = max(t_out - t_tmp, 0.05)
        self.reference = self.out.read_bytes()


def _wait_for(cond, timeout: float = 60.0) -> float:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.002)
    return time.perf_counter()


def interrupt(job: Job, sig: int, force: bool, rng: random.Random) -> str:
    """One interrupted run; returns what the signal hit ("mid-write", "before-write", "after-write")."""
    old = b"an older output that must survive an interrupted --force run"
    if force:
        job.out.write_bytes(old)
    else:
        job.out.unlink(missing_ok=True)
    stale_before = set(temps(job.out.parent))
    p = subprocess.Popen(cli(*job.args, *(["--force"] if force else [])), env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: set(temps(job.out.parent)) - stale_before or p.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.8) * job.write_seconds)
        p.send_signal(sig)
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            p.kill()
    stderr = p.stderr.read().decode()
    got = job.out.read_bytes() if job.out.exists() else None
    assert got in (None, old if force else None, job.reference), f"partial output after {sig!r} (rc {rc})"
    if sig == signal.SIGINT:
        # 0: the signal came after the work; -SIGINT: during interpreter shutdown (default handler restored)
        assert rc == 130 or (rc in (0, -signal.SIGINT) and got == job.reference), (rc, stderr)
        assert "Traceback" not in stderr, stderr
        if rc == 130:
            assert "interrupted" in stderr  # the output: none/old, or complete when Ctrl-C came after the rename
        assert set(temps(job.out.parent)) <= stale_before, "Ctrl-C left a temp file"
    else:
        assert rc in (-signal.SIGKILL, 0), (rc, stderr)
    if got == job.reference:
        return "after-write"
    return "mid-write" if set(temps(job.out.parent)) - stale_before or sig == signal.SIGINT else "before-write"


def recover(job: Job) -> None:
    """The next run into the directory: removes what kill -9 left, writes the complete output."""
    job.out.unlink(missing_ok=True)
    r = subprocess.run(cli(*job.args), env=env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert job.out.read_bytes() == job.reference
    assert temps(job.out.parent) == [], "stale temp files survived the next run"


def campaign(job: Job, runs: int, seed: int) -> list[str]:
    """``runs`` interrupted runs, then the recovering one; prints the outcomes' counts (seen with pytest -s)."""
    rng = random.Random(seed)
    outcomes = []
    for i in range(runs):
        sig = (signal.SIGKILL, signal.SIGINT)[i % 2]
        outcomes.append(f"{sig.name}:{interrupt(job, sig, force=bool(i // 2 % 2), rng=rng)}")
    recover(job)
    counts = {o: outcomes.count(o) for o in sorted(set(outcomes))}
    print(f"\n{job.name}: {len(outcomes)} interrupted runs: {counts}")
    return outcomes


def test_convert_interrupted(wide_checkpoint, tmp_path):
    out = tmp_path / "wide-Q8_0.gguf"
    job = Job("convert", ["convert", str(wide_checkpoint), "-o", str(out), "--outtype", "q8_0"], out)
    job.run_clean()
    outcomes = campaign(job, 8 * ROUNDS, seed=1)
    assert sum(o.endswith("mid-write") for o in outcomes) >= len(outcomes) // 2, outcomes


def test_quantize_interrupted(wide_checkpoint, tmp_path):
    src = tmp_path / "wide-bf16.gguf"
    subprocess.run(cli("convert", str(wide_checkpoint), "-o", str(src)), env=env(), check=True,
                   capture_output=True)
    out = tmp_path / "q" / "wide-Q8_0.gguf"
    out.parent.mkdir()
    job = Job("quantize", ["quantize", str(src), str(out), "Q8_0", "--threads", "1"], out)
    job.run_clean()
    outcomes = campaign(job, 4 * ROUNDS, seed=2)
    assert sum(o.endswith("mid-write") for o in outcomes) >= len(outcomes) // 2, outcomes


def test_existing_output_is_kept_without_force(wide_checkpoint, tmp_path):
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"precious")
    r = subprocess.run(cli("convert", str(wide_checkpoint), "-o", str(out)), env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "--force" in r.stderr and out.read_bytes() == b"precious" and temps(tmp_path) == []


def test_stale_temps_of_live_runs_are_kept(tmp_path):
    """A temp whose writer is alive (another run into the same directory) is not the next run's to delete."""
    from gguf_mtp.fsutil import atomic_output

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        theirs = tmp_path / f"{TMP_PREFIX}{live.pid}-abc.gguf"
        dead = tmp_path / f"{TMP_PREFIX}{_dead_pid()}-abc.gguf"
        old_style = tmp_path / f"{TMP_PREFIX}abc.gguf"
        for p in (theirs, dead, old_style):
            p.write_bytes(b"x")
        with atomic_output(tmp_path / "out.gguf") as tmp:
            tmp.write_bytes(b"new")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, "out.gguf"])
    finally:
        live.kill()
        live.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid

