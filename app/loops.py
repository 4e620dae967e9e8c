"""The event loop a process of the service runs on (``INTAKE_EVENT_LOOP``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def runner(event_loop: str) -> asyncio.Runner:
    """uvloop (``uvicorn[standard]`` brings it), as uvicorn's own ``loop="auto"`` would,
    or Python's own asyncio loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        import uvloop  # only here: with INTAKE_EVENT_LOOP=asyncio it is not needed

        loop_factory = uvloop.new_event_loop
    return asyncio.Runner(loop_factory=loop_factory)
