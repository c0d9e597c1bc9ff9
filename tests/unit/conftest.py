"""Fixtures of the unit tier (no torch, no sockets)."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture
def event_loop_for_jobs():
    """A fresh event loop set as the current one: Job objects make their asyncio.Event on it.
    Modules whose tests build jobs use it for every test (pytestmark usefixtures)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
