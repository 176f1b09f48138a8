"""One HTTP/1.1 exchange per tunnel stream: ``http_exchange`` (relay) -> ``serve_tunnel_stream``
(agent) -> a local server on loopback, and back.

The local HTTP server is h11 over ``trio.serve_tcp`` (so the tests see requests exactly as
they arrive: target bytes, header order and case); the WebSocket server is
trio-websocket's. Relay and agent ends are paired by ``trio.testing.memory_stream_pair``
and by a real yamux session pair (the relay opens, the agent accepts).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import h11
import pytest
import trio
import trio.testing
import wsproto
import wsproto.events
from hypothesis import given
from hypothesis import strategies as st
from support.pyrelay import traced_peak
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from visiona_tunnel.agent_stream import UNREACHABLE_BODY, serve_tunnel_stream
from visiona_tunnel.httpstream import (
    HOP_BY_HOP_HEADERS,
    ExchangeError,
    HttpResponse,
    http_exchange,
    request_headers,
)
from visiona_tunnel.yamux import Session, StreamReset, open_session

KiB = 1024
MiB = 1024 * KiB
PIECE = 64 * KiB
#: Upper bound for one exchange or test body (the largest transfers take about a second).
TEST_TIMEOUT = 20.0

Headers = Sequence[tuple[bytes, bytes]]


def pattern(index: int, size: int = PIECE) -> bytes:
    """Piece ``index`` of a deterministic byte sequence: no two pieces are alike."""
    seed = hashlib.sha256(index.to_bytes(8, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def pieces(total: int) -> Iterator[bytes]:
    for index, offset in enumerate(range(0, total, PIECE)):
        yield pattern(index, min(PIECE, total - offset))


def sha256_of_pieces(total: int) -> str:
    digest = hashlib.sha256()
    for piece in pieces(total):
        digest.update(piece)
    return digest.hexdigest()


async def upload_pieces(total: int) -> AsyncIterator[bytes]:
    for piece in pieces(total):
        yield piece


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class H11Peer:
    """h11 over a trio stream: the local server's side, or a hand-driven relay."""

    def __init__(self, stream: trio.abc.Stream, role: type[h11.CLIENT] | type[h11.SERVER]):
        self.stream = stream
        self.conn = h11.Connection(role)

    async def next_event(self) -> Any:
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            self.conn.receive_data(bytes(await self.stream.receive_some(PIECE)))
        return event

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            if data := self.conn.send(event):
                await self.stream.send_all(data)


# -- the local server ------------------------------------------------------------------------


class LocalServer:
    """h11 over ``trio.serve_tcp``; it keeps every request as received (``requests``).

    * ``GET|HEAD /hello``; ``GET /headers`` (odd case, repeats); ``GET /status/N``
      (reason "Custom Reason").
    * ``POST /echo``: streams the body back, framed as it came.
    * ``GET /bytes/N[?cl=1]``: N pattern bytes, chunked (``cl=1``: with Content-Length).
    * ``POST /upload``: answers "<bytes> <sha256>". ``POST /reject``: 413 at once, then
      reads the body.
    * ``GET /die``: hangs up mid-body. ``GET /die-early``: hangs up before answering.
    * ``Upgrade: echo``: 101, then echoes raw bytes until EOF.
    """

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[h11.Request] = []
        #: Set when a response could not be written because the client went away.
        self.client_gone = trio.Event()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            peer = H11Peer(stream, h11.SERVER)
            request = await peer.next_event()
            if not isinstance(request, h11.Request):
                return
            self.requests.append(request)
            path, _, query = request.target.partition(b"?")
            routes = {
                (b"GET", b"/hello"): self.hello,
                (b"HEAD", b"/hello"): self.hello_head,
                (b"POST", b"/echo"): self.echo,
                (b"GET", b"/headers"): self.headers,
                (b"POST", b"/upload"): self.upload,
                (b"POST", b"/reject"): self.reject,
            }
            try:
                if dict(request.headers).get(b"upgrade") == b"echo":
                    await self.raw_echo(peer)
                elif route := routes.get((request.method, path)):
                    await route(peer, request)
                elif path.startswith(b"/bytes/"):
                    await self.download(peer, int(path[7:]), query == b"cl=1")
                elif path.startswith(b"/status/"):
                    await self.status(peer, int(path[8:]))
                elif path == b"/die":
                    head = h11.Response(status_code=200, headers=[(b"content-length", b"1000")])
                    await peer.send(head, h11.Data(data=b"x" * 100))
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                self.client_gone.set()

    @staticmethod
    async def answer(
        peer: H11Peer, status: int, body: bytes, headers: Headers = (), reason: bytes = b""
    ) -> None:
        framing = [] if status in (204, 304) else [(b"Content-Length", b"%d" % len(body))]
        response = h11.Response(status_code=status, reason=reason, headers=[*headers, *framing])
        await peer.send(response, h11.Data(data=body), h11.EndOfMessage())

    async def hello(self, peer: H11Peer, request: h11.Request) -> None:
        await self.answer(peer, 200, b"hello", [(b"Content-Type", b"text/plain")])

    async def hello_head(self, peer: H11Peer, request: h11.Request) -> None:
        headers = [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
        await peer.send(h11.Response(status_code=200, headers=headers), h11.EndOfMessage())

    async def echo(self, peer: H11Peer, request: h11.Request) -> None:
        framing = [
            (b"Content-Length", v) for name, v in request.headers if name == b"content-length"
        ]
        await peer.send(h11.Response(status_code=200, headers=framing))
        while not isinstance(event := await peer.next_event(), h11.EndOfMessage):
            await peer.send(event)
        await peer.send(h11.EndOfMessage())

    async def headers(self, peer: H11Peer, request: h11.Request) -> None:
        odd = [(b"X-Odd-CASE", b"1"), (b"Set-Cookie", b"a=1"), (b"set-COOKIE", b"b=2")]
        await self.answer(peer, 200, b"ok", odd)

    async def upload(self, peer: H11Peer, request: h11.Request) -> None:
        size, digest = 0, hashlib.sha256()
        while not isinstance(event := await peer.next_event(), h11.EndOfMessage):
            size += len(event.data)
            digest.update(event.data)
        await self.answer(peer, 200, f"{size} {digest.hexdigest()}".encode())

    async def reject(self, peer: H11Peer, request: h11.Request) -> None:
        await self.answer(peer, 413, b"too large")
        while not isinstance(await peer.next_event(), h11.EndOfMessage):
            pass

    async def download(self, peer: H11Peer, size: int, content_length: bool) -> None:
        framing = [(b"Content-Length", b"%d" % size)] if content_length else []
        await peer.send(h11.Response(status_code=200, headers=framing))
        for piece in pieces(size):
            await peer.send(h11.Data(data=piece))
        await peer.send(h11.EndOfMessage())

    async def status(self, peer: H11Peer, status: int) -> None:
        body = b"" if status in (204, 304) else b"status %d" % status
        await self.answer(peer, status, body, reason=b"Custom Reason")

    async def raw_echo(self, peer: H11Peer) -> None:
        switch = h11.InformationalResponse(
            status_code=101, headers=[(b"Upgrade", b"echo"), (b"Connection", b"upgrade")]
        )
        await peer.send(switch)
        early, _ = peer.conn.trailing_data
        if early:
            await peer.stream.send_all(early)
        while data := await peer.stream.receive_some(PIECE):
            await peer.stream.send_all(data)


@pytest.fixture
async def local(nursery: trio.Nursery) -> LocalServer:
    server = LocalServer()
    listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


# -- the tunnel: relay ends and agent ends -----------------------------------------------------


class Tunnel:
    """Opens relay ends of tunnel streams; the agent serves each other end."""

    def __init__(
        self, nursery: trio.Nursery, local_addr: tuple[str, int], options: dict[str, Any]
    ) -> None:
        self.nursery = nursery
        self.local_addr = local_addr
        self.options = options
        self.relay_session: Session | None = None
        self.running = 0
        self._changed = trio.Event()

    async def open_stream(self) -> trio.abc.HalfCloseableStream:
        if self.relay_session is not None:
            return await self.relay_session.open_stream()
        relay_end, agent_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.serve, agent_end)
        return relay_end

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.running += 1
        try:
            await serve_tunnel_stream(stream, self.local_addr, **self.options)
        finally:
            self.running -= 1
            self._changed.set()

    async def accept_loop(self, agent: Session) -> None:
        async for stream in agent:
            self.nursery.start_soon(self.serve, stream)

    async def wait_agents_done(self) -> None:
        while self.running:
            self._changed = trio.Event()
            await self._changed.wait()


@asynccontextmanager
async def open_tunnel(
    kind: str, local_addr: tuple[str, int], **options: Any
) -> AsyncIterator[Tunnel]:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        tunnel = Tunnel(nursery, local_addr, options)
        if kind == "yamux":
            relay_transport, agent_transport = trio.testing.memory_stream_pair()
            agent = await stack.enter_async_context(open_session(agent_transport, client=True))
            tunnel.relay_session = await stack.enter_async_context(
                open_session(relay_transport, client=False)
            )
            nursery.start_soon(tunnel.accept_loop, agent)
        yield tunnel
        nursery.cancel_scope.cancel()


#: How relay and agent ends are paired: ``memory_stream_pair`` or a yamux session pair.
TUNNEL_KINDS = ["memory", "yamux"]


@pytest.fixture(params=TUNNEL_KINDS)
async def tunnel(request: pytest.FixtureRequest, local: LocalServer) -> AsyncIterator[Tunnel]:
    async with open_tunnel(request.param, local.address) as tunnel:
        yield tunnel


@pytest.fixture
async def yamux_tunnel(local: LocalServer) -> AsyncIterator[Tunnel]:
    async with open_tunnel("yamux", local.address) as tunnel:
        yield tunnel


async def read_body(response: HttpResponse) -> bytes:
    return b"".join([chunk async for chunk in response.body])


async def fetch(
    tunnel: Tunnel,
    method: str,
    target: bytes | str,
    headers: list[tuple[str, str]] | Headers | None = None,
    body: bytes | AsyncIterator[bytes] = b"",
) -> tuple[HttpResponse, bytes]:
    """One request through the tunnel; the response and its whole body."""
    with trio.fail_after(TEST_TIMEOUT):
        stream = await tunnel.open_stream()
        async with http_exchange(stream, method, target, headers or [], body) as response:
            return response, await read_body(response)


# -- HTTP through the tunnel ---------------------------------------------------------------


async def test_get_returns_the_local_servers_response(tunnel: Tunnel) -> None:
    response, body = await fetch(tunnel, "GET", "/hello")
    assert (response.status, response.reason, body) == (200, b"", b"hello")
    assert response.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
    assert response.complete


async def test_head_response_keeps_content_length_and_has_no_body(tunnel: Tunnel) -> None:
    response, body = await fetch(tunnel, "HEAD", "/hello")
    assert (response.status, body) == (200, b"")
    assert (b"Content-Length", b"5") in response.headers


async def test_post_echo_of_5_mib_with_content_length(tunnel: Tunnel, local: LocalServer) -> None:
    data = b"".join(pieces(5 * MiB))
    response, body = await fetch(tunnel, "POST", "/echo", body=data)
    assert (b"content-length", b"%d" % len(data)) in local.requests[-1].headers
    assert (b"Content-Length", b"%d" % len(data)) in response.headers
    assert body == data


async def test_post_echo_of_a_chunked_upload_comes_back_chunked(
    tunnel: Tunnel, local: LocalServer
) -> None:
    response, body = await fetch(tunnel, "POST", "/echo", body=upload_pieces(MiB + 5))
    assert (b"transfer-encoding", b"chunked") in local.requests[-1].headers
    assert (b"Transfer-Encoding", b"chunked") in response.headers
    assert body == b"".join(pieces(MiB + 5))


@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
async def test_download_arrives_whole_with_either_framing(
    tunnel: Tunnel, content_length: bool
) -> None:
    size = 3 * MiB + 7
    response, body = await fetch(tunnel, "GET", f"/bytes/{size}{'?cl=1' if content_length else ''}")
    framing = dict(response.headers)
    assert (b"Content-Length" in framing, b"Transfer-Encoding" in framing) == (
        content_length,
        not content_length,
    )
    assert body == b"".join(pieces(size))


async def test_status_codes_and_reasons_pass_through(tunnel: Tunnel) -> None:
    for status in (201, 204, 301, 304, 400, 404, 418, 500, 503):
        response, body = await fetch(tunnel, "GET", f"/status/{status}")
        assert (response.status, response.reason) == (status, b"Custom Reason")
        assert body == (b"" if status in (204, 304) else b"status %d" % status)


async def test_response_headers_keep_order_case_and_repeats(tunnel: Tunnel) -> None:
    response, _ = await fetch(tunnel, "GET", "/headers")
    assert response.headers == [
        (b"X-Odd-CASE", b"1"),
        (b"Set-Cookie", b"a=1"),
        (b"set-COOKIE", b"b=2"),
        (b"Content-Length", b"2"),
    ]


async def test_request_headers_keep_order_case_and_repeats(
    tunnel: Tunnel, local: LocalServer
) -> None:
    sent = [("Host", "example.test"), ("X-Odd-CASE", "1"), ("x-rep", "a"), ("X-Rep", "b")]
    await fetch(tunnel, "GET", "/hello", sent)
    assert local.requests[-1].headers.raw_items() == [
        (b"Host", b"example.test"),
        (b"X-Odd-CASE", b"1"),
        (b"x-rep", b"a"),
        (b"X-Rep", b"b"),
    ]


async def test_escaped_path_and_query_arrive_byte_exact(tunnel: Tunnel, local: LocalServer) -> None:
    target = b"/hello/%2F%2e%20a;b/%E2%82%AC?q=%41%2B+b&x=&&z=%zz#"
    await fetch(tunnel, "GET", target)
    assert local.requests[-1].target == target


async def test_hop_by_hop_headers_are_dropped_and_host_is_added(
    tunnel: Tunnel, local: LocalServer
) -> None:
    sent = [
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Transfer-Encoding", "chunked"),
        ("X-Kept", "1"),
    ]
    await fetch(tunnel, "GET", "/hello", sent)
    assert local.requests[-1].headers.raw_items() == [(b"Host", b"localhost"), (b"X-Kept", b"1")]


@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([*HOP_BY_HOP_HEADERS, b"Host", b"X-A", b"content-length", b"X-b"]),
            st.sampled_from([b"1", b"x-a", b"close, x-b"]),
        )
    ),
    body=st.sampled_from([b"", b"data", None]),
)
def test_forwarded_headers_never_carry_hop_by_hop_headers_and_always_frame_the_body(
    headers: Headers, body: bytes | None
) -> None:
    chunks = upload_pieces(0) if body is None else body
    out = request_headers(headers, chunks, host=b"h")
    names = [name.lower() for name, _ in out]
    assert b"host" in names
    assert not (set(names) - {b"transfer-encoding"}) & HOP_BY_HOP_HEADERS
    if body is None and b"content-length" not in names:
        assert (b"Transfer-Encoding", b"chunked") in out
    else:
        assert b"transfer-encoding" not in names
    if body:
        assert (b"Content-Length", b"%d" % len(body)) in out


async def test_request_with_both_framings_is_forwarded_chunked_only(
    tunnel: Tunnel, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay = H11Peer(await tunnel.open_stream(), h11.CLIENT)
        headers = [("Host", "x"), ("Content-Length", "3"), ("Transfer-Encoding", "chunked")]
        await relay.send(h11.Request(method="POST", target="/echo", headers=headers))
        await relay.send(h11.Data(data=b"hello"), h11.EndOfMessage())
        assert (await relay.next_event()).status_code == 200
        assert (await relay.next_event()).data == b"hello"
    assert local.requests[-1].headers.raw_items() == [
        (b"Host", b"x"),
        (b"Transfer-Encoding", b"chunked"),
    ]


async def test_early_answer_reaches_the_relay_while_the_upload_goes_on(tunnel: Tunnel) -> None:
    response, body = await fetch(tunnel, "POST", "/reject", body=upload_pieces(5 * MiB))
    assert (response.status, body) == (413, b"too large")


# -- failures ---------------------------------------------------------------------------------


async def test_local_server_down_answers_502(local: LocalServer) -> None:
    async with open_tunnel("yamux", ("127.0.0.1", closed_port())) as tunnel:
        response, body = await fetch(tunnel, "POST", "/echo", body=b"x" * MiB)
    assert (response.status, body) == (502, UNREACHABLE_BODY)
    assert (b"Content-Type", b"text/plain; charset=utf-8") in response.headers


async def test_local_server_hanging_up_before_answering_answers_502(tunnel: Tunnel) -> None:
    response, body = await fetch(tunnel, "GET", "/die-early")
    assert (response.status, body) == (502, UNREACHABLE_BODY)


async def test_local_server_dying_mid_response_is_an_error_for_the_relay(tunnel: Tunnel) -> None:
    # A yamux stream is reset; a memory stream, which cannot be, ends before the body does.
    cause = StreamReset if tunnel.relay_session is not None else h11.RemoteProtocolError
    with pytest.raises(ExchangeError) as raised:
        await fetch(tunnel, "GET", "/die")
    assert isinstance(raised.value.__cause__, cause)


async def test_malformed_request_answers_400(tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay = H11Peer(await tunnel.open_stream(), h11.CLIENT)
        # The relay's own h11 must expect a response; the bytes on the wire are broken.
        relay.conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        relay.conn.send(h11.EndOfMessage())
        await relay.stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        response = await relay.next_event()
    assert response.status_code == 400


async def test_relay_eof_after_the_request_stops_the_local_request(
    yamux_tunnel: Tunnel, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await yamux_tunnel.open_stream()
        relay = H11Peer(stream, h11.CLIENT)
        await relay.send(
            h11.Request(method="GET", target="/bytes/1000000000", headers=[("Host", "x")])
        )
        await relay.send(h11.EndOfMessage())
        assert isinstance(await relay.next_event(), h11.Response)
        await stream.send_eof()  # how a hashicorp/yamux relay gives up (it cannot RST)
        await local.client_gone.wait()
        await yamux_tunnel.wait_agents_done()


async def test_relay_eof_can_be_taken_as_a_half_close(local: LocalServer) -> None:
    async with open_tunnel("yamux", local.address, abort_on_relay_eof=False) as tunnel:
        with trio.fail_after(TEST_TIMEOUT):
            stream = await tunnel.open_stream()
            relay = H11Peer(stream, h11.CLIENT)
            await relay.send(h11.Request(method="GET", target="/hello", headers=[("Host", "x")]))
            await relay.send(h11.EndOfMessage())
            await stream.send_eof()
            assert (await relay.next_event()).status_code == 200
            assert (await relay.next_event()).data == b"hello"


async def test_caller_giving_up_mid_response_resets_the_stream_and_frees_the_agent(
    yamux_tunnel: Tunnel, local: LocalServer
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await yamux_tunnel.open_stream()
        async with http_exchange(stream, "GET", "/bytes/1000000000") as response:
            received = 0
            async for chunk in response.body:
                received += len(chunk)
                if received > MiB:
                    break
        assert not response.complete
        await local.client_gone.wait()
        await yamux_tunnel.wait_agents_done()


async def test_body_iterable_failing_resets_the_stream_and_is_the_forward_errors_cause(
    yamux_tunnel: Tunnel,
) -> None:
    async def failing_body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise ValueError("upstream broke")

    with trio.fail_after(TEST_TIMEOUT):
        stream = await yamux_tunnel.open_stream()
        with pytest.raises(ExchangeError) as raised:
            async with http_exchange(stream, "POST", "/echo", [], failing_body()) as response:
                async for _ in response.body:
                    pass
        assert isinstance(raised.value.__cause__, ValueError)
        await yamux_tunnel.wait_agents_done()


async def test_leaving_the_block_ends_an_upload_still_running(yamux_tunnel: Tunnel) -> None:
    closed = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 1024
        finally:
            closed.set()

    with trio.fail_after(TEST_TIMEOUT):
        stream = await yamux_tunnel.open_stream()
        async with http_exchange(stream, "POST", "/echo", [], endless()) as response:
            first = await anext(aiter(response.body))
        # The exchange's own upload task is done with the block: the body was closed.
        assert closed.is_set()
        assert first
        await yamux_tunnel.wait_agents_done()


async def test_a_caller_cancelled_mid_exchange_leaves_no_task_behind(
    yamux_tunnel: Tunnel,
) -> None:
    uploading = trio.Event()
    closed = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                uploading.set()
                yield b"x" * 1024
        finally:
            closed.set()

    with trio.fail_after(TEST_TIMEOUT):
        with trio.CancelScope() as scope:
            stream = await yamux_tunnel.open_stream()
            async with http_exchange(stream, "POST", "/echo", [], endless()):
                await uploading.wait()
                scope.cancel()
                await trio.sleep_forever()
        assert scope.cancelled_caught
        assert closed.is_set()
        await yamux_tunnel.wait_agents_done()


# -- a body framed by Content-Length is read without h11 ---------------------------------------


async def raw_exchange(
    method: str, answer: Sequence[bytes], *, eof: bool
) -> tuple[HttpResponse | None, bytes, BaseException | None]:
    """``http_exchange`` against a hand-driven peer that writes ``answer`` (each piece its
    own write, after the request head), then closes if ``eof``. The response (None if the
    head failed), the body read until the end or the failure, and the failure."""
    relay_end, peer_end = trio.testing.memory_stream_pair()
    body = bytearray()
    response: HttpResponse | None = None
    failure: BaseException | None = None

    async def peer() -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await peer_end.receive_some()
        for piece in answer:
            await peer_end.send_all(piece)
            await trio.sleep(0.01)  # one piece per read
        if eof:
            await peer_end.aclose()
        else:
            await trio.sleep_forever()

    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer)
            try:
                async with http_exchange(relay_end, method, "/x") as response:
                    async for chunk in response.body:
                        body += chunk
            except ExchangeError as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    return response, bytes(body), failure


HEAD_10 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"


async def pieces_handed_on(writes: list[bytes], pause_after: int | None = None) -> list[int]:
    """A Content-Length body written as ``writes`` on a yamux stream (all at once, or with
    the peer waiting after write number ``pause_after`` until the first piece was handed
    on); the sizes of the pieces the response gives."""
    relay_transport, agent_transport = trio.testing.memory_stream_pair()
    body_size = sum(len(write) for write in writes)
    first_handed_on = trio.Event()
    sizes: list[int] = []

    async def peer(agent: Session) -> None:
        stream = await agent.accept_stream()
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body_size)
        for number, write in enumerate(writes):
            await stream.send_all(write)
            if number == pause_after:
                await first_handed_on.wait()

    with trio.fail_after(TEST_TIMEOUT):
        async with (
            open_session(relay_transport, client=False) as relay,
            open_session(agent_transport, client=True) as agent,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(peer, agent)
            stream = await relay.open_stream()
            async with http_exchange(stream, "GET", "/x", read_size=256 * 1024) as response:
                async for chunk in response.body:
                    sizes.append(len(chunk))
                    first_handed_on.set()
            nursery.cancel_scope.cancel()
    assert sum(sizes) == body_size
    return sizes


async def test_small_pieces_on_their_way_are_handed_on_together() -> None:
    # 64 frames of 4 KiB: a few pieces, as the 256 KiB window lets them come.
    sizes = await pieces_handed_on([b"x" * 4096] * 64)
    assert len(sizes) <= 8, sizes


async def test_a_piece_with_nothing_behind_it_is_handed_on_without_waiting_for_more() -> None:
    # The rest comes only after the first piece was handed on: no deadlock, no hold-back
    # beyond the patience.
    sizes = await pieces_handed_on([b"a" * 100, b"b" * 100], pause_after=0)
    assert sizes == [100, 100]


@pytest.mark.parametrize(
    "answer",
    [
        [HEAD_10 + b"0123456789"],
        [HEAD_10 + b"0123", b"456", b"789"],
        [HEAD_10, b"0123456789"],
        # Whatever follows the body is not part of it (h11 would take it for a next
        # response, which a client never reads).
        [HEAD_10 + b"0123456789HTTP/1.1 200 OK\r\n"],
        [HEAD_10 + b"01234", b"56789 and more"],
    ],
    ids=["with-the-head", "in-pieces", "after-the-head", "more-with-the-head", "more-after"],
)
async def test_a_content_length_body_is_taken_whole_and_no_further(answer: list[bytes]) -> None:
    response, body, failure = await raw_exchange("GET", answer, eof=False)
    assert failure is None
    assert response is not None and response.complete
    assert body == b"0123456789"


@pytest.mark.parametrize(
    "answer",
    [[HEAD_10 + b"0123"], [HEAD_10, b"0123"], [HEAD_10]],
    ids=["with-the-head", "after-the-head", "no-body"],
)
async def test_a_content_length_body_cut_short_is_a_forward_error(answer: list[bytes]) -> None:
    response, body, failure = await raw_exchange("GET", answer, eof=True)
    assert response is not None and not response.complete
    assert body == b"".join(answer)[len(HEAD_10) :]
    assert isinstance(failure, ExchangeError)
    assert isinstance(failure.__cause__, h11.RemoteProtocolError)
    assert f"received {len(body)} bytes, expected 10" in str(failure)


@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("HEAD", HEAD_10),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
    ids=["head", "304", "204", "empty"],
)
async def test_responses_without_a_body_have_none_whatever_their_content_length(
    method: str, head: bytes
) -> None:
    response, body, failure = await raw_exchange(method, [head], eof=False)
    assert failure is None
    assert response is not None and response.complete
    assert body == b""


# -- memory stays bounded -------------------------------------------------------------------


async def test_100_mib_download_keeps_memory_bounded(yamux_tunnel: Tunnel) -> None:
    size = 100 * MiB
    digest = hashlib.sha256()
    with trio.fail_after(TEST_TIMEOUT):
        async with traced_peak() as peak:
            stream = await yamux_tunnel.open_stream()
            async with http_exchange(stream, "GET", f"/bytes/{size}") as response:
                async for chunk in response.body:
                    digest.update(chunk)
    assert digest.hexdigest() == sha256_of_pieces(size)
    assert peak[0] < 4 * MiB


async def test_50_mib_upload_keeps_memory_bounded(yamux_tunnel: Tunnel) -> None:
    size = 50 * MiB
    with trio.fail_after(TEST_TIMEOUT):
        async with traced_peak() as peak:
            _, body = await fetch(yamux_tunnel, "POST", "/upload", body=upload_pieces(size))
    assert body == f"{size} {sha256_of_pieces(size)}".encode()
    assert peak[0] < 4 * MiB


# -- upgrades: a raw pipe -----------------------------------------------------------------


async def test_upgrade_forwards_bytes_sent_after_the_request_head_first(tunnel: Tunnel) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        stream = await tunnel.open_stream()
        relay = H11Peer(stream, h11.CLIENT)
        upgrade = h11.Request(
            method="GET",
            target="/raw",
            headers=[("Host", "x"), ("Connection", "Upgrade"), ("Upgrade", "echo")],
        )
        head = relay.conn.send(upgrade)
        assert head is not None
        await relay.stream.send_all(head + b"early bytes;")
        assert (await relay.next_event()).status_code == 101
        echoed = bytearray(relay.conn.trailing_data[0])
        await relay.stream.send_all(b"more")
        await stream.send_eof()  # passed on to the local server, which then ends
        while data := await relay.stream.receive_some():
            echoed += data
    assert echoed == b"early bytes;more"


class WebSocketClient:
    """wsproto over a tunnel stream, the way a relay talks to the agent's local server."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.events: deque[wsproto.events.Event] = deque()

    async def send(self, event: wsproto.events.Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> wsproto.events.Event:
        while not self.events:
            data = await self.stream.receive_some(PIECE)
            self.ws.receive_data(bytes(data) or None)
            self.events.extend(self.ws.events())
        return self.events.popleft()


@pytest.fixture
async def websocket_echo_server(nursery: trio.Nursery) -> tuple[str, int]:
    """trio-websocket's server: echoes every message."""

    async def echo(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.send_message(await ws.get_message())

    server = await nursery.start(serve_websocket, echo, "127.0.0.1", 0, None)
    return ("127.0.0.1", server.port)


@pytest.mark.parametrize("kind", TUNNEL_KINDS)
async def test_websocket_upgrade_echoes_through_the_raw_pipe(
    kind: str, websocket_echo_server: tuple[str, int]
) -> None:
    async with open_tunnel(kind, websocket_echo_server) as tunnel:
        with trio.fail_after(TEST_TIMEOUT):
            client = WebSocketClient(await tunnel.open_stream())
            await client.send(wsproto.events.Request(host="localhost", target="/ws"))
            assert isinstance(await client.next_event(), wsproto.events.AcceptConnection)
            for message in ("hello", "x" * 200_000):
                await client.send(wsproto.events.TextMessage(data=message))
                received = ""
                while len(received) < len(message):
                    event = await client.next_event()
                    assert isinstance(event, wsproto.events.TextMessage)
                    received += event.data
                assert received == message
            await client.send(wsproto.events.CloseConnection(code=1000))
            closed = await client.next_event()
            assert isinstance(closed, wsproto.events.CloseConnection) and closed.code == 1000


# -- idle timeout ---------------------------------------------------------------------------


async def test_idle_stream_is_given_up_after_idle_timeout(autojump_clock: Any) -> None:
    async with open_tunnel("memory", ("127.0.0.1", 9), idle_timeout=300.0) as tunnel:
        relay = await tunnel.open_stream()
        await relay.send_all(b"GET / HTTP/1.1\r\n")
        start = trio.current_time()
        assert await relay.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(300.0)
        await tunnel.wait_agents_done()


async def test_each_byte_moved_pushes_the_idle_deadline(autojump_clock: Any) -> None:
    async with open_tunnel("memory", ("127.0.0.1", 9), idle_timeout=300.0) as tunnel:
        relay = await tunnel.open_stream()
        for byte in b"GET / H":
            await relay.send_all(bytes([byte]))
            await trio.sleep(200.0)  # simulated time: less than the idle timeout
        last = trio.current_time() - 200.0
        assert await relay.receive_some() == b""
        assert trio.current_time() - last == pytest.approx(300.0)


async def test_idle_timeout_can_be_disabled(autojump_clock: Any) -> None:
    async with open_tunnel("memory", ("127.0.0.1", 9), idle_timeout=math.inf) as tunnel:
        relay = await tunnel.open_stream()
        await relay.send_all(b"GET / HTTP/1.1\r\n")
        with trio.move_on_after(10 * 365 * 86400.0):
            await relay.receive_some()
            pytest.fail("the agent gave up")
