"""diffserve client: `Client`, `AsyncClient`, the CLI (`diffserve`)."""

import os as _os

# The scheduler starts ffmpeg (and local workers) as subprocesses while gRPC threads run; gRPC's
# fork handlers are not needed for fork+exec and only log noise, so they are off unless set.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from diffserve.client.client import AsyncClient, Client, DiffserveError, is_terminal, make_params

__all__ = ["AsyncClient", "Client", "DiffserveError", "is_terminal", "make_params"]
