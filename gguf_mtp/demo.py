"""``gguf-mtp demo``: the whole product path on the small trained Gemma 4 pair that ships with the package.

convert (Hugging Face checkpoint -> F16 GGUF) -> quantize-pair (target Q8_0, drafter Q8_0) -> check -> plan (a
24 GiB card) -> generate with and without MTP (acceptance by draft position, tokens/s, speed-up) -> an Ollama
Modelfile and the llama-server command line.

The pair (gguf_mtp/data/trained-pair, trained by tools/train_tiny_pair.py) is a few-MB model: llama.cpp's
per-call overhead is a large part of each step at that size, so its speed-up says little about a 31B target
(bench/ measures that); its acceptance is real. Every step reports ok / failed / skipped and why; a failed step
skips only the steps that need its output.
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
SUMMARY_MODE = "k=3"  # drafts every round, so acceptance is measured at every position (adaptive may stop drafting)


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
    generate_settings: RuntimeSettings | None = None
    modelfile: Path | None = None
    llama_server: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.steps)

    def summary(self) -> dict[str, Any]:
        """The target alone vs MTP at k = 3 (the drafter's acceptance by position, speed-up), and the speed-up
        of the adaptive draft length, which drafts only while drafting pays."""
        if self.bench is None:
            return {}
        base, mtp, ad = self.bench.mode("target"), self.bench.mode(SUMMARY_MODE), self.bench.mode("adaptive")
        return {"mtp_mode": SUMMARY_MODE, "tokens_per_second": {"target": round(base.tokens_per_second, 2),
                                                                "mtp": round(mtp.tokens_per_second, 2),
                                                                "adaptive": round(ad.tokens_per_second, 2)},
                "speedup": round(mtp.speedup, 3), "speedup_adaptive": round(ad.speedup, 3),
                "acceptance": round(mtp.acceptance, 4),
                "acceptance_by_position": [round(a, 4) for a in mtp.acceptance_by_position],
                "mean_accepted_length": round(mtp.mean_accepted_length, 3),
                "same_output": all(m.same_output == self.bench.prompts for m in self.bench.modes)}

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
        }


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
    from .plan import plan_for_files, shortfall_message

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
                              max_tokens=d.max_tokens, ks=[int(m[2:]) for m in MTP_MODES if m.startswith("k=")],
                              adaptive="adaptive" in MTP_MODES, settings=d.generate_settings)
    s = d.summary()
    differ = [m.mode for m in d.bench.modes if m.same_output != d.bench.prompts]
    if differ:
        raise GgufMtpError(f"MTP output differs from the target's own on some prompts ({', '.join(differ)})")
    return (f"{d.bench.prompts} held-out prompts x {d.max_tokens} tokens: MTP output = target output; "
            f"{SUMMARY_MODE}: acceptance {s['acceptance']:.2f} "
            f"({' / '.join(f'{a:.2f}' for a in s['acceptance_by_position'])}), "
            f"{s['mean_accepted_length']:.2f} tokens per target step, {s['speedup']:.2f}x; "
            f"adaptive {s['speedup_adaptive']:.2f}x")


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


# (name, step, steps whose output it needs)
STEPS: list[tuple[str, Callable[[Demo], str], tuple[str, ...]]] = [
    ("convert", _convert, ()),
    ("quantize", _quantize, ("convert",)),
    ("check", _check, ("quantize",)),
    ("plan", _plan, ("check",)),
    ("generate", _generate, ("check",)),
    ("modelfile", _modelfile, ("plan",)),
    ("llama-server", _llama_server, ("plan",)),
]


def run_demo(workdir: str | Path | None = None, *, force: bool = False, max_tokens: int = 128,
             n_prompts: int = N_PROMPTS, on_step: Callable[[Step], None] | None = None) -> Demo:
    """Run every step; ``workdir`` (created if missing) holds the GGUFs, plan.json and the Modelfile.

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
