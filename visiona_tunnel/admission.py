"""What the tunnel listener's hooks see and return: the request head (:class:`ListenerRequest`),
a plain answer (:class:`Answer`), a refusal (:class:`Refusal`), and :func:`admit_with`, which
makes an ``admit`` hook from a token verifier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

import attrs

from .relay import TokenVerifier, VerifierUnavailable

__all__ = [
    "UNAUTHORIZED",
    "VERIFIER_UNAVAILABLE",
    "Admit",
    "Answer",
    "Headers",
    "ListenerRequest",
    "OnRefusal",
    "Refusal",
    "RequestScope",
    "Route",
    "admit_with",
    "no_request_scope",
    "plain_text",
    "token_from_request",
]

Headers = Sequence[tuple[bytes, bytes]]


@attrs.frozen
class ListenerRequest:
    """A request head as the hooks see it."""

    method: str
    #: Path and query, as sent.
    target: str
    #: Names in lower case (h11's).
    headers: tuple[tuple[bytes, bytes], ...]
    #: ``host:port`` of the peer, when known.
    remote: str | None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def token(self) -> str | None:
        """The device token it carries (:func:`token_from_request`)."""
        return token_from_request(self.target, self.headers)


@attrs.frozen
class Answer:
    """A whole HTTP answer: status, body, and headers (``content-type`` among them)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class Refusal:
    """An error answer, before ``render`` gives it a body: a refused tunnel (401, 503 ...)
    or a request the listener does not serve (400, 404, 405, 426)."""

    status: int
    code: str
    message: str


#: ``await admit(request)``: the key to serve the tunnel as, or why it is refused.
Admit = Callable[[ListenerRequest], Awaitable[str | Refusal]]
#: A plain route: ``await route(request)`` answers a ``GET`` or ``HEAD`` of its path.
Route = Callable[[ListenerRequest], Awaitable[Answer]]
#: Entered around each request (for a tunnel, its whole life; for a head that cannot be
#: parsed, with an empty method and target); yields headers to add to every answer to it
#: (a request id, say).
RequestScope = Callable[[ListenerRequest], contextlib.AbstractContextManager[Headers]]


def plain_text(refusal: Refusal) -> Answer:
    """The default ``render``: the message as text."""
    content_type = (b"content-type", b"text/plain; charset=utf-8")
    return Answer(refusal.status, f"{refusal.message}\n".encode(), (content_type,))


@contextlib.contextmanager
def no_request_scope(request: ListenerRequest) -> Iterator[Headers]:
    yield ()


def token_from_request(target: str, headers: Headers) -> str | None:
    """The device token: ``Authorization: Bearer`` or the query parameter ``token``."""
    for name, value in headers:
        if name.lower() == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip() or None
    tokens = parse_qs(urlsplit(target).query).get("token")
    return tokens[0] if tokens else None


UNAUTHORIZED = Refusal(401, "UNAUTHORIZED", "a valid device token is required")
VERIFIER_UNAVAILABLE = Refusal(503, "AUTH_UNAVAILABLE", "cannot check tokens now")


def admit_with(verify_token: TokenVerifier) -> Admit:
    """``admit`` from a token verifier: the token's key; no token or an unknown one is
    401, a verifier raising :class:`~visiona_tunnel.relay.VerifierUnavailable` is 503."""

    async def admit(request: ListenerRequest) -> str | Refusal:
        token = request.token
        try:
            key = await verify_token(token) if token else None
        except VerifierUnavailable:
            return VERIFIER_UNAVAILABLE
        return UNAUTHORIZED if key is None else key

    return admit


#: Told of each refused tunnel upgrade (for metrics and logs); must not block or raise.
OnRefusal = Callable[[ListenerRequest, Refusal], None]
