"""Shared test fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _close_sync_qmp_loop() -> Iterator[None]:
    """Close the event loop qemu.qmp's synchronous client leaves set on the main thread.

    A later ``asyncio.run`` (the QMP server tests) replaces it, and the orphaned loop
    (with the sockets it still holds) then surfaces as a ResourceWarning at some
    unrelated garbage collection.
    """
    yield
    policy = asyncio.get_event_loop_policy()
    loop = getattr(getattr(policy, "_local", None), "_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running() and not loop.is_closed():
        loop.close()
        policy.set_event_loop(None)
