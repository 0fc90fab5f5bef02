"""Session-wide fixtures: tiny checkpoints and GGUFs are built once per test session.

Fixture modules live in tests/fixtures/ (one per area) and are pulled in here.
"""

from fixtures.ollama import *  # noqa
from fixtures.quant import *  # noqa
from fixtures.runtime import *  # noqa
from fixtures.gguf import *  # noqa
from fixtures.plan import *  # noqa
from fixtures.projector import *  # noqa
from fixtures.unified import *  # noqa

from fixtures.tiny import *  # noqa: F401,F403
