"""How much hypercorn reads from a connection at a time.

hypercorn (0.18) reads its connections 64 KiB at a time (``MAX_RECV`` of
``hypercorn.trio.tcp_server``: a module constant, not a ``Config`` setting) and hands each
read of a request body to the application as one ASGI message. Every message costs the
same trip whatever its size -- hypercorn's h11 parser and request queue, then our route
(for a forward: the upload's h11 framing and the socket write upstream) -- so a large
upload costs CPU per 64 KiB. Reading up to :data:`READ_SIZE` takes what is waiting in
one go: a piece is never held back to fill a read, so latency is unchanged, and under
load pieces grow and the CPU per byte falls (the api-server's, on an upload through it:
about 30% less; docs/performance.md).

The price: hypercorn queues up to ``Config.max_app_queue_size`` (10) messages per request
before it stops reading, so a request body the application is slow to take may hold up
to 10 x :data:`READ_SIZE` (2.5 MiB) in memory instead of 640 KiB.
"""

from __future__ import annotations

from hypercorn.trio import tcp_server

__all__ = ["READ_SIZE", "read_larger_pieces"]

#: The largest read of a connection, once :func:`read_larger_pieces` ran.
READ_SIZE = 256 * 1024


def read_larger_pieces() -> None:
    """Let every hypercorn server of this process read up to :data:`READ_SIZE` at a time.
    Idempotent; a hypercorn without the constant (another version) is left as it is."""
    current = getattr(tcp_server, "MAX_RECV", None)
    if isinstance(current, int) and current < READ_SIZE:
        tcp_server.MAX_RECV = READ_SIZE
