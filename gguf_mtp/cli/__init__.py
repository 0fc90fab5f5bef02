"""The ``gguf-mtp`` command line: parsing and printing only; the work is in the library modules.

Conventions (docs/contracts.md): ``-o`` names outputs, ``--force`` overwrites, ``--json`` prints machine
output, ``--mmproj PATH`` names a projector file (except ``convert SRC --mmproj``), quant names are
spelled as llama.cpp spells them (Q4_K_M). Errors print one line to stderr and exit non-zero; set
GGUF_MTP_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import click

from .. import __version__
from .benchmarking import bench_cmd, demo_cmd
from .common import Group
from .conversation import chat_cmd
from .conversion import convert_cmd
from .generation import generate_cmd
from .inspection import check_cmd, inspect_cmd
from .integration import modelfile_cmd, serve_cmd
from .llama_runtime import rpc_server_cmd, runtime_group
from .planning import plan_cmd, skeleton_cmd
from .quantization import quantize_cmd, quantize_pair_cmd
from .serving import serve_http_cmd


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gguf-mtp")
def main() -> None:
    """Gemma 4 + MTP drafters on llama.cpp: export, quantize, plan, run."""


for _command in (modelfile_cmd, serve_cmd, quantize_cmd, quantize_pair_cmd, inspect_cmd, check_cmd, generate_cmd,
                 runtime_group, convert_cmd, plan_cmd, skeleton_cmd, chat_cmd, demo_cmd, bench_cmd,
                 serve_http_cmd, rpc_server_cmd):
    main.add_command(_command)
