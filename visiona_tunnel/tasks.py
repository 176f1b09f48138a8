"""Nurseries whose errors come out as themselves.

Trio groups what leaves a nursery in an ``ExceptionGroup``, even a single error of its body.
An object that owns a task or two behind an API of its own (an HTTP exchange and its upload,
say) raises its own errors: callers write ``except ExchangeError``, not ``except*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import trio

__all__ = ["open_owned_nursery", "ungrouped"]


@contextlib.contextmanager
def ungrouped() -> Iterator[None]:
    """Re-raise a nursery's ``ExceptionGroup`` as its only error other than
    ``trio.Cancelled`` (a cancellation left behind comes back at the next checkpoint), or
    as its only ``Cancelled``; a group of several errors stays a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        errors = [error for error in leaves if not isinstance(error, trio.Cancelled)]
        if len(errors) == 1:
            raise errors[0] from errors[0].__cause__
        if not errors and len(leaves) == 1:
            raise leaves[0] from None
        raise


@contextlib.asynccontextmanager
async def open_owned_nursery() -> AsyncIterator[trio.Nursery]:
    """``trio.open_nursery()`` under :func:`ungrouped`."""
    with ungrouped():
        async with trio.open_nursery() as nursery:
            yield nursery


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error
