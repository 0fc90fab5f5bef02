#!/usr/bin/env python3
"""Write the speed pair: a ~130M-parameter Gemma 4 target and an MTP drafter that agrees with it (not shipped).

    python tools/make_speed_pair.py OUTDIR [--damping 0.04] [--force]

Writes OUTDIR/hf/{target,drafter} (bf16 safetensors) and OUTDIR/target-F16.gguf, OUTDIR/drafter-F16.gguf (our
converter). How the pair is constructed, and what ``--damping`` does to acceptance: gguf_mtp/tiny/speed_pair.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_mtp.errors import GgufMtpError  # noqa: E402
from gguf_mtp.tiny.speed_pair import DEFAULT_DAMPING, make_speed_pair  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--damping", type=float, default=DEFAULT_DAMPING,
                    help="target layer-output scale (0: drafts always kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace OUTDIR's files")
    args = ap.parse_args()
    try:
        pair = make_speed_pair(args.outdir, damping=args.damping, seed=args.seed, force=args.force)
    except GgufMtpError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {pair.target} ({pair.target.stat().st_size / 2**20:.0f} MiB) and {pair.drafter} "
          f"({pair.drafter.stat().st_size / 2**20:.1f} MiB); damping {args.damping}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
