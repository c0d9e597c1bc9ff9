"""The scheduler and the client never import torch (DESIGN.md): they run on machines without it."""

from __future__ import annotations

import subprocess
import sys


def test_scheduler_and_client_do_not_import_torch():
    code = (
        "import sys\n"
        "import diffserve.scheduler.server, diffserve.scheduler.app, diffserve.client.cli, diffserve.client\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
