"""User-facing errors: the CLI prints ``error: <message>`` as one line and exits non-zero.

Library code raises these for bad input (files, configs, pairs); anything else is a bug and keeps its
traceback (set GGUF_MTP_DEBUG=1 to see tracebacks for these too).
"""

from __future__ import annotations


class GgufMtpError(Exception):
    """Bad input or an impossible request; the message is the whole story for the user."""

    exit_code = 2


class IncompatiblePair(GgufMtpError):
    """A target/drafter/projector set that cannot work together (see pairing.py)."""

    exit_code = 1
