"""Waiting in tests for a state to be reached: poll a predicate until it holds or a deadline passes.

Use these instead of sleeping a guessed amount of time: the test goes on as soon as the state is
there, and a state that never comes fails with a message naming what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


def _timed_out(what: str, timeout: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what or 'a condition'}")


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> object:
    """Call predicate every interval seconds until it returns a truthy value, and return that value.

    Raises AssertionError naming what if the predicate is still falsy after timeout seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], object] | Callable[[], Awaitable[object]],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> object:
    """wait_until for a running event loop: polls a sync or async predicate, yielding in between."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)
