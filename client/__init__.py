"""diffserve client: `Client`, `AsyncClient`, the CLI (`diffserve`)."""

from .client import AsyncClient, Client, DiffserveError, is_terminal, make_params

__all__ = ["AsyncClient", "Client", "DiffserveError", "is_terminal", "make_params"]
