"""``gguf-mtp demo``: the whole product path on the small trained Gemma 4 pair that ships with the package.

convert (Hugging Face checkpoint -> F16 GGUF) -> quantize-pair (target Q8_0, drafter Q8_0) -> check -> plan (a
24 GiB card) -> generate with and without MTP (acceptance by draft position, tokens/s, speed-up) -> an Ollama
Modelfile and the llama-server command line; then the speed pair: built, and timed with and without MTP.

The trained pair (gguf_mtp/data/trained-pair, trained by tools/train_tiny_pair.py) is a few-MB model: llama.cpp's
per-call overhead is a large part of each step at that size, so its speed-up says little about a 31B target; its
acceptance is real. The speed pair (gguf_mtp/tiny/speed_pair.py: a generated ~130M-parameter target and a drafter
constructed to agree with it) is big enough for a verify batch to cost about one token's time, so its speed-up is
real; its acceptance is by construction. Every step reports ok / failed / skipped and why; a failed step skips
only the steps that need its output.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bench
from .errors import GgufMtpError
from .quantize import DEFAULT_DRAFTER_TYPE
from .settings import RuntimeSettings

PAIR = bench.TRAINED_PAIR
TARGET_QUANT = "Q8_0"  # Q4_K_M costs this small a target real acceptance (docs/quantize.md); Q8_0 keeps it
DRAFTER_QUANT = DEFAULT_DRAFTER_TYPE
VRAM = "24GiB"
N_PROMPTS = 4
GENERATE_CTX = 1024  # the plan picks the largest context that fits 24 GiB; generating 128 tokens needs far less
MTP_MODES = ("k=3", "adaptive")  # llama-server's default draft length, and ours
MTP_KS = tuple(int(m[2:]) for m in MTP_MODES if m.startswith("k="))
SUMMARY_MODE = "k=3"  # drafts every round, so acceptance is measured at every position (adaptive may stop drafting)
# the speed pair: ~4 s to build, ~260 MB in DIR/speed-pair; 3 prompts x -n tokens per mode, each the fastest of 3
SPEED_DIR = "speed-pair"
SPEED_PROMPTS = 3
SPEED_REPEATS = 3  # one stall on a busy machine does not decide a ratio
# llama.cpp's default of 4 threads, no more than the CPUs: more threads than cores stall at ggml's barriers
SPEED_THREADS = min(os.cpu_count() or 1, 4)
SPEED_SETTINGS = RuntimeSettings(n_ctx=GENERATE_CTX, threads=SPEED_THREADS, flash_attn="off", cache_type_k="f32",
                                 cache_type_v="f32")
# what each pair's numbers are evidence of, and why (the human output's table labels; --json's speed_pair.what)
TRAINED_LABEL = "Trained pair: real acceptance"
TRAINED_WHAT = ("a drafter trained against its 3.3M-parameter target; at this size llama.cpp's per-call overhead "
                "dominates a step, so its speed says little")
SPEED_LABEL = "Speed pair: real speed-up"
SPEED_WHAT = ("a generated ~130M-parameter target and a drafter built to agree with it: big enough for a verify "
              "batch to cost about one token's time; its acceptance is by construction")


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | failed | skipped
    detail: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3)}


@dataclass
class Demo:
    workdir: Path
    force: bool = False
    max_tokens: int = 128
    n_prompts: int = N_PROMPTS
    steps: list[Step] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    check: Any = None  # check.CheckReport
    plan: Any = None  # plan.Plan
    bench: bench.BenchResult | None = None
    speed: bench.BenchResult | None = None  # the speed pair
    generate_settings: RuntimeSettings | None = None
    modelfile: Path | None = None
    llama_server: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.steps)

    def summary(self) -> dict[str, Any]:
        """The trained pair's numbers (``summarize``)."""
        return summarize(self.bench) if self.bench is not None else {}

    def speed_summary(self) -> dict[str, Any] | None:
        """The speed pair's numbers (``summarize``), with how they were measured and every mode in full."""
        if self.speed is None:
            return None
        r = self.speed
        return {"what": SPEED_WHAT, **summarize(r), "prompts": r.prompts, "max_tokens": r.max_tokens,
                "repeats": r.repeats, "threads": SPEED_THREADS, "modes": [m.to_dict() for m in r.modes]}

    def headline(self) -> str | None:
        """One line: the acceptance the trained pair shows, the speed-up the speed pair shows, output identity."""
        parts, same = [], []
        if self.bench is not None:
            s = self.summary()
            parts.append(f"acceptance {s['acceptance']:.2f} at {SUMMARY_MODE} (trained pair)")
            same.append(s["same_output"])
        if self.speed is not None:
            s = summarize(self.speed)
            parts.append(f"speed-up {s['speedup']:.2f}x at {SUMMARY_MODE}, {s['speedup_adaptive']:.2f}x adaptive "
                         "(speed pair)")
            same.append(s["same_output"])
        if not parts:
            return None
        return "; ".join(parts) + f"; MTP output = the target's own: {'yes' if all(same) else 'NO'}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "workdir": str(self.workdir),
            "steps": [s.to_dict() for s in self.steps],
            "files": {k: str(v) for k, v in self.files.items()},
            "quant": {"target": TARGET_QUANT, "drafter": DRAFTER_QUANT},
            **self.summary(),
            "prompts": self.bench.prompts if self.bench else 0,
            "max_tokens": self.max_tokens,
            "generate_settings": self.generate_settings.to_dict() if self.generate_settings else None,
            "modes": [m.to_dict() for m in self.bench.modes] if self.bench else [],
            "check": self.check.to_dict() if self.check else None,
            "plan": _plan_summary(self.plan) if self.plan else None,
            "modelfile": str(self.modelfile) if self.modelfile else None,
            "llama_server": self.llama_server,
            "speed_pair": self.speed_summary(),
        }


def summarize(r: bench.BenchResult) -> dict[str, Any]:
    """The target alone vs MTP at k = 3 (the drafter's acceptance by position, speed-up), the speed-up of the
    adaptive draft length, which drafts only while drafting pays, and whether every mode's output was the
    target alone's."""
    base, mtp, ad = r.mode("target"), r.mode(SUMMARY_MODE), r.mode("adaptive")
    return {"mtp_mode": SUMMARY_MODE, "tokens_per_second": {"target": round(base.tokens_per_second, 2),
                                                            "mtp": round(mtp.tokens_per_second, 2),
                                                            "adaptive": round(ad.tokens_per_second, 2)},
            "speedup": round(mtp.speedup, 3), "speedup_adaptive": round(ad.speedup, 3),
            "acceptance": round(mtp.acceptance, 4),
            "acceptance_by_position": [round(a, 4) for a in mtp.acceptance_by_position],
            "mean_accepted_length": round(mtp.mean_accepted_length, 3),
            "same_output": all(m.same_output == r.prompts for m in r.modes)}


def _require_same_output(r: bench.BenchResult) -> None:
    differ = [m.mode for m in r.modes if m.same_output != r.prompts]
    if differ:
        raise GgufMtpError(f"MTP output differs from the target's own on some prompts ({', '.join(differ)})")


def _plan_summary(p: Any) -> dict[str, Any]:
    s = p.settings
    return {"vram": VRAM, "fits": p.fits, "n_ctx": s.n_ctx, "n_gpu_layers": s.n_gpu_layers,
            "cache_type": s.cache_type_k, "flash_attn": s.flash_attn, "gpu_bytes": p.gpu_used}


# --- the steps ---------------------------------------------------------------------------------------------
def _convert(d: Demo) -> str:
    from .export import convert

    t, dr = d.workdir / "trained-pair-target-F16.gguf", d.workdir / "trained-pair-drafter-F16.gguf"
    rt = convert(PAIR / "target", t, force=d.force)
    rd = convert(PAIR / "drafter", dr, target=t, force=d.force)
    d.files.update(target_f16=t, drafter_f16=dr)
    return (f"target {rt.n_tensors} tensors, {rt.n_bytes / 2**20:.1f} MiB {rt.outtype}; drafter {rd.n_tensors} "
            f"tensors, {rd.n_bytes / 2**20:.1f} MiB {rd.outtype}, pair-checked against the target")


def _quantize(d: Demo) -> str:
    from .quantize import quantize_pair

    r = quantize_pair(d.files["target_f16"], d.files["drafter_f16"], TARGET_QUANT, d.workdir,
                      drafter_type=DRAFTER_QUANT, force=d.force)
    d.files.update(target=r.target.dst, drafter=r.drafter.dst)
    return (f"target {r.target.qtype} {r.target.dst_file_bytes / 2**20:.1f} MiB, drafter {r.drafter.qtype} "
            f"{r.drafter.dst_file_bytes / 2**20:.1f} MiB (llama.cpp's quantizer)")


def _check(d: Demo) -> str:
    from .check import check_files

    d.check = check_files(d.files["target"], d.files["drafter"])
    if not d.check.compatible:
        raise GgufMtpError("; ".join(str(p) for p in d.check.problems))
    return "compatible (vocabulary, hidden size, attention geometry, layer layout)"


def _plan(d: Demo) -> str:
    from .fsutil import atomic_output
    from .planning.search import plan_for_files, shortfall_message

    d.plan = plan_for_files(d.files["target"], d.files["drafter"], vram=VRAM)
    if not d.plan.fits:
        raise GgufMtpError(shortfall_message(d.plan))
    out = d.workdir / "plan.json"
    with atomic_output(out, d.force) as tmp:
        tmp.write_text(json.dumps(d.plan.to_dict(), indent=2) + "\n")
    d.files["plan"] = out
    s = d.plan.settings
    return (f"fits {VRAM}: all layers on the GPU, context {s.n_ctx}, KV cache {s.cache_type_k}, "
            f"{d.plan.gpu_used / 2**20:.0f} MiB of the GPU")


def _generate(d: Demo) -> str:
    base = d.plan.settings if d.plan is not None and d.plan.fits else RuntimeSettings()
    # flash attention off and an f32 cache: on a CPU only then do batched (verify) and one-token logits agree
    # to the bit, so MTP output can be compared with the target's token for token (docs/runtime.md)
    d.generate_settings = base.replace(n_ctx=GENERATE_CTX, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    d.bench = bench.run_bench(d.files["target"], d.files["drafter"], bench.heldout_prompts(d.n_prompts),
                              max_tokens=d.max_tokens, ks=MTP_KS, adaptive="adaptive" in MTP_MODES,
                              settings=d.generate_settings)
    _require_same_output(d.bench)
    s = d.summary()
    return (f"trained pair, {d.bench.prompts} held-out prompts x {d.max_tokens} tokens: MTP output = target output; "
            f"{SUMMARY_MODE}: acceptance {s['acceptance']:.2f} "
            f"({' / '.join(f'{a:.2f}' for a in s['acceptance_by_position'])}), "
            f"{s['mean_accepted_length']:.2f} tokens per target step, {s['speedup']:.2f}x; "
            f"adaptive {s['speedup_adaptive']:.2f}x (too small a model for speed: the speed-pair step measures it)")


def _modelfile(d: Demo) -> str:
    from . import ollama
    from .fsutil import atomic_output

    n_layers = d.plan.request.files.target.n_layer
    mf = ollama.build_modelfile(d.plan.settings, d.files["target"], d.files["drafter"], base_dir=d.workdir,
                                n_layers=n_layers, header=["gguf-mtp demo: the small trained Gemma 4 pair"])
    out = d.workdir / "Modelfile"
    with atomic_output(out, d.force) as tmp:
        tmp.write_text(ollama.render_modelfile(mf), encoding="utf-8")
    d.modelfile = out
    return f"ollama create gemma4-mtp-demo -f {out}"


def _llama_server(d: Demo) -> str:
    d.llama_server = d.plan.to_dict()["llama_server"]
    return "the plan's settings as llama-server flags (--spec-type draft-mtp)"


def _speed_pair(d: Demo) -> str:
    from .tiny import speed_pair

    t0 = time.perf_counter()
    pair = speed_pair.make_speed_pair(d.workdir / SPEED_DIR, keep_hf=False, force=d.force)
    built = time.perf_counter() - t0
    d.files.update(speed_target=pair.target, speed_drafter=pair.drafter)
    d.speed = bench.run_bench(pair.target, pair.drafter, speed_pair.prompts(SPEED_PROMPTS), max_tokens=d.max_tokens,
                              ks=MTP_KS, adaptive="adaptive" in MTP_MODES, settings=SPEED_SETTINGS,
                              repeats=SPEED_REPEATS)
    _require_same_output(d.speed)
    s = summarize(d.speed)
    tps = s["tokens_per_second"]
    return (f"built in {built:.0f} s; {d.speed.prompts} prompts x {d.max_tokens} tokens, fastest of {SPEED_REPEATS}, "
            f"{SPEED_THREADS} thread(s): MTP output = target output; target alone {tps['target']:.0f} tokens/s, "
            f"{SUMMARY_MODE} {tps['mtp']:.0f} ({s['speedup']:.2f}x, acceptance {s['acceptance']:.2f}), "
            f"adaptive {tps['adaptive']:.0f} ({s['speedup_adaptive']:.2f}x)")


# (name, step, steps whose output it needs)
STEPS: list[tuple[str, Callable[[Demo], str], tuple[str, ...]]] = [
    ("convert", _convert, ()),
    ("quantize", _quantize, ("convert",)),
    ("check", _check, ("quantize",)),
    ("plan", _plan, ("check",)),
    ("generate", _generate, ("check",)),
    ("modelfile", _modelfile, ("plan",)),
    ("llama-server", _llama_server, ("plan",)),
    ("speed-pair", _speed_pair, ()),  # needs nothing above: it runs, and fails, on its own
]


def run_demo(workdir: str | Path | None = None, *, force: bool = False, max_tokens: int = 128,
             n_prompts: int = N_PROMPTS, on_step: Callable[[Step], None] | None = None) -> Demo:
    """Run every step; ``workdir`` (created if missing) holds the GGUFs, plan.json, the Modelfile and the speed
    pair's GGUFs (``speed-pair/``).

    Without ``workdir`` a new temporary directory is made and kept (the printed commands refer to its files).
    """
    if not (PAIR / "target" / "config.json").is_file():
        raise GgufMtpError(f"the trained pair is missing from this installation ({PAIR})")
    if workdir is None:
        wd = Path(tempfile.mkdtemp(prefix="gguf-mtp-demo-"))
    else:
        wd = Path(workdir)
        if wd.exists() and not wd.is_dir():
            raise GgufMtpError(f"--workdir {wd} is not a directory")
        wd.mkdir(parents=True, exist_ok=True)
    d = Demo(wd.resolve(), force, max_tokens, n_prompts)
    status: dict[str, str] = {}
    for name, fn, needs in STEPS:
        step = Step(name)
        missing = [n for n in needs if status.get(n) != "ok"]
        if missing:
            step.detail = f"needs {', '.join(missing)}"
        else:
            t0 = time.perf_counter()
            try:
                step.detail, step.status = fn(d), "ok"
            except Exception as e:  # noqa: BLE001 - the demo reports every failure and goes on with what it can
                if os.environ.get("GGUF_MTP_DEBUG"):
                    raise
                why = str(e) if isinstance(e, GgufMtpError) else f"{type(e).__name__}: {e}"
                step.detail, step.status = why, "failed"
            step.seconds = time.perf_counter() - t0
        status[name] = step.status
        d.steps.append(step)
        if on_step is not None:
            on_step(step)
    return d
