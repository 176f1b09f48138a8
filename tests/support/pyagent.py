"""Our agent (``TunnelClient``) for tests: started in a nursery, its hooks recorded in
order and awaitable (bounded)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from visiona_tunnel.client import ClientConfig, ClientHooks, TunnelClient

#: Short backoff so that reconnects happen within a test.
#: No jitter: tests of the backoff read its delays (the jitter has tests of its own).
FAST = ClientConfig(
    backoff_base=0.05,
    backoff_cap=0.5,
    backoff_jitter=0.0,
    redial_spread=0.05,
    restart_spread=0.05,
    connect_timeout=5.0,
)

#: How long one wait for a hook may take.
HOOK_TIMEOUT = 10.0

#: A hook call: its name without ``on_``, then its arguments.
HookEvent = tuple[object, ...]


class HookRecorder:
    """``hooks()`` for a client; every call is kept in ``events`` and can be awaited."""

    def __init__(self) -> None:
        self.events: list[HookEvent] = []
        self._in, self._out = trio.open_memory_channel[HookEvent](math.inf)

    def hooks(self) -> ClientHooks:
        return ClientHooks(
            on_dial_attempt=lambda attempt: self._record("dial_attempt", attempt),
            on_session_up=lambda: self._record("session_up"),
            on_session_down=lambda error: self._record("session_down", error),
            on_dial_failed=lambda attempt, error: self._record("dial_failed", attempt, error),
            on_retry_scheduled=lambda attempt, delay: self._record(
                "retry_scheduled", attempt, delay
            ),
        )

    def _record(self, *event: object) -> None:
        self.events.append(event)
        self._in.send_nowait(event)

    def names(self) -> list[object]:
        return [event[0] for event in self.events]

    def count(self, name: str) -> int:
        return sum(1 for event in self.events if event[0] == name)

    async def next(self, timeout: float = HOOK_TIMEOUT) -> HookEvent:
        """The next hook call not yet taken by ``next`` or ``wait_for``."""
        with trio.fail_after(timeout):
            return await self._out.receive()

    async def wait_for(self, name: str, timeout: float = HOOK_TIMEOUT) -> HookEvent:
        """Skip hook calls until one named ``name``; return it."""
        with trio.fail_after(timeout):
            while (event := await self._out.receive())[0] != name:
                pass
        return event


@dataclass
class PyAgent:
    client: TunnelClient
    hooks: HookRecorder


async def start_py_agent(
    nursery: trio.Nursery,
    relay_url: str,
    token: str,
    local_port: int,
    *,
    config: ClientConfig = FAST,
) -> PyAgent:
    """A ``TunnelClient`` for 127.0.0.1:``local_port`` running in ``nursery``; it dials at
    once (wait for its ``session_up`` hook)."""
    hooks = HookRecorder()
    client = TunnelClient(
        relay_url, token, ("127.0.0.1", local_port), hooks=hooks.hooks(), config=config
    )
    await nursery.start(client.run)
    return PyAgent(client, hooks)
