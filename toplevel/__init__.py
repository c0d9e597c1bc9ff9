"""diffserve: a serving engine for diffusion transformers.

The in-process API: `from diffserve import Engine` (client/engine.py) starts a private scheduler
and worker group, as the one-shot `diffserve generate --model-path` does, and tears them down on
exit. Everything else lives in the subpackages: diffserve.client (gRPC client, CLI),
diffserve.scheduler, diffserve.worker, diffserve.v1 (protos).
"""

from __future__ import annotations

__all__ = ["Engine"]


def __getattr__(name: str):
    if name == "Engine":  # imported on first use: `import diffserve` stays cheap
        from diffserve.client.engine import Engine

        return Engine
    raise AttributeError(f"module 'diffserve' has no attribute {name!r}")
