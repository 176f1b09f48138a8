"""The sans-IO yamux core: bytes in, events out, frames queued; no trio, no I/O.

Layout follows h11's tests: a table of frames fed whole, byte by byte and with trailing
data; one test per hashicorp behaviour; fuzzing for "only ProtocolViolation"; and a stateful
test wiring a client and a server back to back through an unreliable-timing network.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from visiona_tunnel.yamux.config import Config
from visiona_tunnel.yamux.connection import YamuxConnection
from visiona_tunnel.yamux.core_errors import GoAwayInForce, ProtocolViolation, StreamsExhausted
from visiona_tunnel.yamux.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    ResetReceived,
    StreamAcked,
    StreamEnded,
    StreamOpened,
    WindowUpdated,
)

from .helpers import (
    ACK,
    DATA,
    FIN,
    GO_AWAY,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    INITIAL_WINDOW,
    PING,
    RST,
    SYN,
    WINDOW_UPDATE,
    Frame,
    FrameParser,
    data,
    frame,
    pattern,
    ping,
    syn,
    window_update,
)

KIB = 1024


# ---------------------------------------------------------------------------------------
# Helpers


def frames_of(raw: bytes) -> list[Frame]:
    return FrameParser().feed(raw)


def sent_frames(conn: YamuxConnection) -> list[Frame]:
    """Everything ``conn`` has queued, as frames."""
    return frames_of(conn.data_to_send())


def go_away(code: int) -> bytes:
    return frame(GO_AWAY, 0, 0, code)


def control(type: int, flags: int, stream_id: int, length: int = 0) -> Frame:
    """The Frame a bodyless (non-Data) header decodes to."""
    return Frame(0, type, flags, stream_id, length, b"")


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge adjacent DataReceived of one stream: how data is split is not behaviour."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, DataReceived):
            if not event.data:
                continue
            last = merged[-1] if merged else None
            if isinstance(last, DataReceived) and last.stream_id == event.stream_id:
                merged[-1] = DataReceived(event.stream_id, last.data + event.data)
                continue
        merged.append(event)
    return merged


def feed_in_pieces(conn: YamuxConnection, raw: bytes, cuts: Iterable[int]) -> list[Event]:
    """Feed ``raw`` split at ``cuts`` (never an empty piece: that would mean EOF)."""
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        if cut > start:
            events += conn.receive_data(raw[start:cut])
            start = cut
    return events


def feed_byte_by_byte(conn: YamuxConnection, raw: bytes) -> list[Event]:
    return feed_in_pieces(conn, raw, range(len(raw)))


def server() -> YamuxConnection:
    return YamuxConnection(client=False)


def client() -> YamuxConnection:
    return YamuxConnection(client=True)


class ConnectionPair:
    """A client and a server connection whose output is fed to each other by hand."""

    def __init__(
        self, client_config: Config | None = None, server_config: Config | None = None
    ) -> None:
        self.client = YamuxConnection(client=True, config=client_config)
        self.server = YamuxConnection(client=False, config=server_config)
        #: Every frame that went each way.
        self.to_server_frames: list[Frame] = []
        self.to_client_frames: list[Frame] = []
        self._to_server = FrameParser()
        self._to_client = FrameParser()

    def send_to_server(self) -> list[Event]:
        raw = self.client.data_to_send()
        self.to_server_frames += self._to_server.feed(raw)
        return self.server.receive_data(raw) if raw else []

    def send_to_client(self) -> list[Event]:
        raw = self.server.data_to_send()
        self.to_client_frames += self._to_client.feed(raw)
        return self.client.receive_data(raw) if raw else []

    def exchange(self) -> tuple[list[Event], list[Event]]:
        """Move bytes both ways until both are quiet; returns (client events, server events)."""
        client_events: list[Event] = []
        server_events: list[Event] = []
        while self.client.has_data_to_send() or self.server.has_data_to_send():
            server_events += self.send_to_server()
            client_events += self.send_to_client()
        return client_events, server_events

    def open_accepted(self) -> int:
        """A client-opened stream, ACKed and accepted by the server."""
        stream_id = self.client.open_stream()
        self.exchange()
        assert self.server.accept() == stream_id
        return stream_id


# ---------------------------------------------------------------------------------------
# A table of frames fed whole, byte by byte and with trailing data (as h11's test_io)

#: (name, bytes a client sends, events a fresh server reports)
TABLE: list[tuple[str, bytes, list[Event]]] = [
    ("syn", syn(1), [StreamOpened(1)]),
    ("syn-with-delta", syn(1, 4096), [StreamOpened(1), WindowUpdated(1)]),
    ("data", syn(1) + data(1, b"hello"), [StreamOpened(1), DataReceived(1, b"hello")]),
    ("data-syn", data(1, b"hi", SYN), [StreamOpened(1), DataReceived(1, b"hi")]),
    ("empty-data", syn(1) + data(1, b""), [StreamOpened(1)]),
    ("fin", syn(1) + window_update(1, 0, FIN), [StreamOpened(1), StreamEnded(1)]),
    (
        "data-fin",
        syn(1) + data(1, b"bye", FIN),
        [StreamOpened(1), DataReceived(1, b"bye"), StreamEnded(1)],
    ),
    ("rst", syn(1) + window_update(1, 0, RST), [StreamOpened(1), ResetReceived(1)]),
    ("window-update", syn(1) + window_update(1, 4096), [StreamOpened(1), WindowUpdated(1)]),
    ("ping", ping(7), []),
    ("pong", ping(7, ACK), [PongReceived(7)]),
    ("go-away-normal", go_away(GO_AWAY_NORMAL), [GoAwayReceived(GO_AWAY_NORMAL)]),
    (
        "interleaved-streams",
        syn(1) + syn(3) + data(1, b"a") + data(3, b"b") + data(1, b"c"),
        [
            StreamOpened(1),
            StreamOpened(3),
            DataReceived(1, b"a"),
            DataReceived(3, b"b"),
            DataReceived(1, b"c"),
        ],
    ),
]
TABLE_IDS = [name for name, _, _ in TABLE]


@pytest.mark.parametrize(("name", "raw", "expected"), TABLE, ids=TABLE_IDS)
def test_table_fed_whole(name: str, raw: bytes, expected: list[Event]) -> None:
    assert coalesce(server().receive_data(raw)) == expected


@pytest.mark.parametrize(("name", "raw", "expected"), TABLE, ids=TABLE_IDS)
def test_table_fed_byte_by_byte(name: str, raw: bytes, expected: list[Event]) -> None:
    whole = server()
    whole.receive_data(raw)
    conn = server()
    assert coalesce(feed_byte_by_byte(conn, raw)) == expected
    assert conn.data_to_send() == whole.data_to_send()


@pytest.mark.parametrize(("name", "raw", "expected"), TABLE, ids=TABLE_IDS)
def test_table_fed_with_trailing_data(name: str, raw: bytes, expected: list[Event]) -> None:
    conn = server()
    trailing = ping(0xC0FFEE)
    assert coalesce(conn.receive_data(raw + trailing[:5])) == expected
    assert conn.receive_data(trailing[5:]) == []
    assert sent_frames(conn)[-1] == control(PING, ACK, 0, 0xC0FFEE)


# ---------------------------------------------------------------------------------------
# Splitting never changes what is parsed


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_whole_byte_by_byte_and_random_splits_give_the_same_events(draw: st.DataObject) -> None:
    sender = client()
    ids: list[int] = []
    for _ in range(draw.draw(st.integers(1, 12), label="steps")):
        action = draw.draw(st.sampled_from(["open", "send", "close", "ping", "consume"]))
        if action == "open" or not ids:
            ids.append(sender.open_stream())
        elif action == "ping":
            sender.ping(draw.draw(st.integers(0, 2**32 - 1)))
        else:
            stream_id = draw.draw(st.sampled_from(ids))
            state = sender.stream(stream_id)
            if state is None or state.local_closed:
                continue
            if action == "send":
                body = draw.draw(st.binary(min_size=1, max_size=400))
                sender.send_data(stream_id, body, len(body))
            elif action == "close":
                sender.close_stream(stream_id)
    raw = sender.data_to_send()
    cuts = draw.draw(st.lists(st.integers(0, len(raw)), max_size=30), label="cuts")

    whole, bytewise, split = server(), server(), server()
    expected = coalesce(whole.receive_data(raw))
    assert coalesce(feed_byte_by_byte(bytewise, raw)) == expected
    assert coalesce(feed_in_pieces(split, raw, cuts)) == expected
    answer = whole.data_to_send()
    assert bytewise.data_to_send() == answer
    assert split.data_to_send() == answer


def test_data_header_alone_yields_no_empty_data_event() -> None:
    """A read that ends right after a Data header must not report ``b""`` (it reads as EOF)."""
    conn = server()
    header = frame(DATA, 0, 1, 5)
    assert conn.receive_data(syn(1) + header) == [StreamOpened(1)]
    assert conn.receive_data(b"hel") == [DataReceived(1, b"hel")]
    assert conn.receive_data(b"lo") == [DataReceived(1, b"lo")]


# ---------------------------------------------------------------------------------------
# Arbitrary bytes: nothing but ProtocolViolation, and then a GoAway(protocol error)

frame_like = st.builds(
    lambda version, type, flags, stream_id, length, body: (
        frame(type, flags, stream_id, length, version=version) + body
    ),
    version=st.sampled_from([0, 0, 0, 0, 0, 1, 255]),
    type=st.integers(0, 5),
    flags=st.integers(0, 15),
    stream_id=st.integers(0, 6),
    length=st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1)),
    body=st.binary(max_size=20),
)
garbage = st.one_of(st.binary(max_size=300), st.lists(frame_like, max_size=12).map(b"".join))


@settings(max_examples=300, deadline=None)
@given(
    raw=garbage,
    is_client=st.booleans(),
    opened=st.integers(0, 2),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_arbitrary_bytes_raise_only_protocol_error(
    raw: bytes, is_client: bool, opened: int, cuts: list[int]
) -> None:
    conn = YamuxConnection(client=is_client)
    for _ in range(opened):
        conn.open_stream()
    conn.data_to_send()
    try:
        feed_in_pieces(conn, raw, [cut for cut in cuts if cut < len(raw)])
    except ProtocolViolation as exc:
        assert type(exc) is ProtocolViolation
        assert exc.code == GO_AWAY_PROTOCOL_ERROR
        assert conn.terminated
        assert control(GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR) in sent_frames(conn)
        assert conn.receive_data(b"more bytes") == []


def test_protocol_error_queues_go_away_protocol_error() -> None:
    conn = server()
    with pytest.raises(ProtocolViolation):
        conn.receive_data(frame(9, 0, 0, 0))
    assert sent_frames(conn) == [control(GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)]
    assert conn.terminated


# ---------------------------------------------------------------------------------------
# Framing


def test_window_update_syn_carries_no_body() -> None:
    """The next header is parsed right after the 12 bytes, whatever the length says."""
    conn = server()
    events = conn.receive_data(syn(1, 12) + ping(5))
    assert events == [StreamOpened(1), WindowUpdated(1)]
    assert sent_frames(conn) == [control(WINDOW_UPDATE, ACK, 1), control(PING, ACK, 0, 5)]


def test_eof_terminates_the_connection() -> None:
    conn = server()
    assert conn.receive_data(b"") == []
    assert conn.terminated
    assert conn.receive_data(syn(1)) == []


# ---------------------------------------------------------------------------------------
# Flow control


def test_syn_delta_adds_to_the_initial_send_window() -> None:
    conn = server()
    conn.receive_data(syn(1, 1000))
    assert conn.send_window(1) == INITIAL_WINDOW + 1000


def test_ack_delta_adds_to_the_initial_send_window() -> None:
    conn = client()
    stream_id = conn.open_stream()
    events = conn.receive_data(window_update(stream_id, 500, ACK))
    assert events == [StreamAcked(stream_id), WindowUpdated(stream_id)]
    assert conn.send_window(stream_id) == INITIAL_WINDOW + 500


def test_larger_receive_window_is_announced_on_syn_as_a_delta() -> None:
    pair = ConnectionPair(client_config=Config(max_stream_window_size=1024 * KIB))
    stream_id = pair.client.open_stream()
    pair.exchange()
    assert pair.to_server_frames[0] == control(WINDOW_UPDATE, SYN, stream_id, 768 * KIB)
    assert pair.server.send_window(stream_id) == 1024 * KIB
    assert pair.client.send_window(stream_id) == INITIAL_WINDOW


def test_data_beyond_the_receive_window_is_a_protocol_error_from_the_header_alone() -> None:
    conn = server()
    conn.receive_data(syn(1))
    with pytest.raises(ProtocolViolation):
        conn.receive_data(frame(DATA, 0, 1, INITIAL_WINDOW + 1))
    assert control(GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR) in sent_frames(conn)


def test_data_filling_the_receive_window_exactly_is_accepted() -> None:
    conn = server()
    conn.receive_data(syn(1))
    events = conn.receive_data(data(1, pattern(INITIAL_WINDOW)))
    assert coalesce(events) == [DataReceived(1, pattern(INITIAL_WINDOW))]
    state = conn.stream(1)
    assert state is not None
    assert (state.recv_window, state.unread) == (0, INITIAL_WINDOW)


def test_receiving_data_returns_no_credit() -> None:
    conn = server()
    conn.receive_data(syn(1) + data(1, pattern(200 * KIB)))
    assert sent_frames(conn) == [control(WINDOW_UPDATE, ACK, 1)]


def test_credit_is_returned_once_half_the_window_is_consumed() -> None:
    conn = server()
    conn.receive_data(syn(1) + data(1, pattern(200 * KIB)))
    conn.data_to_send()
    conn.consume(1, 127 * KIB)
    assert conn.data_to_send() == b""
    conn.consume(1, 1 * KIB)
    # max (256) - unread (72) - recv_window (56) = 128 KiB
    assert sent_frames(conn) == [control(WINDOW_UPDATE, 0, 1, 128 * KIB)]
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window + state.unread == INITIAL_WINDOW


def test_credit_covers_only_consumed_bytes_of_a_partly_received_frame() -> None:
    """Body bytes still on their way are not consumed: no credit for them yet."""
    conn = server()
    conn.receive_data(syn(1) + frame(DATA, 0, 1, INITIAL_WINDOW) + pattern(200 * KIB))
    conn.data_to_send()
    conn.consume(1, 200 * KIB)
    assert sent_frames(conn) == [control(WINDOW_UPDATE, 0, 1, 200 * KIB)]
    conn.receive_data(pattern(56 * KIB))
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window + state.unread <= INITIAL_WINDOW


def auto_tuning_server(
    cap: int = 1024 * KIB, rtt: float | None = 0.010, *, auto_tune: bool = True
) -> YamuxConnection:
    conn = YamuxConnection(
        client=False, config=Config(auto_tune_window=auto_tune, max_stream_window_size=cap)
    )
    conn.rtt = rtt
    conn.receive_data(syn(1))
    conn.data_to_send()
    return conn


def read_half_window(conn: YamuxConnection, now: float) -> list[Frame]:
    """Receive and consume half of stream 1's current window at time ``now``."""
    state = conn.stream(1)
    assert state is not None
    half = state.recv_window_max // 2
    conn.receive_data(data(1, pattern(half)))
    conn.consume(1, half, now=now)
    return sent_frames(conn)


def test_auto_tuning_starts_at_the_initial_window_whatever_the_cap() -> None:
    conn = auto_tuning_server(cap=16 * 1024 * KIB)
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window_max == state.recv_window == INITIAL_WINDOW


def test_auto_tuning_doubles_the_window_when_half_is_read_within_a_few_rtts() -> None:
    conn = auto_tuning_server()
    read_half_window(conn, now=1.0)  # first update: starts the clock
    # 4 x RTT (10 ms) later: fast enough, the window doubles to 512 KiB; the update
    # returns the consumed 128 KiB plus the 256 KiB of growth.
    assert read_half_window(conn, now=1.0 + 0.039) == [
        control(WINDOW_UPDATE, 0, 1, 128 * KIB + 256 * KIB)
    ]
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window_max == 512 * KIB
    assert state.recv_window + state.unread == 512 * KIB


def test_auto_tuning_keeps_the_window_of_a_slow_reader() -> None:
    conn = auto_tuning_server()
    read_half_window(conn, now=1.0)
    assert read_half_window(conn, now=1.0 + 0.041) == [control(WINDOW_UPDATE, 0, 1, 128 * KIB)]
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window_max == INITIAL_WINDOW


def test_auto_tuning_waits_for_an_rtt() -> None:
    conn = auto_tuning_server(rtt=None)
    read_half_window(conn, now=1.0)
    assert read_half_window(conn, now=1.0) == [control(WINDOW_UPDATE, 0, 1, 128 * KIB)]


def test_auto_tuning_allowance_grows_with_the_window() -> None:
    """go-yamux#136: a fixed 4 x RTT would stop growth near 512 KiB on a busy reader."""
    conn = auto_tuning_server(cap=2048 * KIB)
    read_half_window(conn, now=1.0)
    read_half_window(conn, now=1.03)  # 256 -> 512 KiB within 40 ms
    read_half_window(conn, now=1.03 + 0.07)  # 512 KiB allows 80 ms: -> 1 MiB
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window_max == 1024 * KIB


def test_auto_tuning_stops_at_the_cap() -> None:
    conn = auto_tuning_server(cap=512 * KIB)
    now = 1.0
    for _ in range(6):
        read_half_window(conn, now=now)
        now += 0.001
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window_max == 512 * KIB
    assert read_half_window(conn, now=now) == [control(WINDOW_UPDATE, 0, 1, 256 * KIB)]


def test_without_auto_tuning_the_window_stays_at_its_size() -> None:
    conn = auto_tuning_server(cap=1024 * KIB, auto_tune=False)
    for step in range(4):
        read_half_window(conn, now=1.0 + step * 0.001)
    state = conn.stream(1)
    assert state is not None
    assert state.recv_window_max == 1024 * KIB


def test_send_data_never_exceeds_the_send_window() -> None:
    conn = client()
    stream_id = conn.open_stream()
    assert conn.send_data(stream_id, pattern(300 * KIB), 10**9) == INITIAL_WINDOW
    assert conn.send_window(stream_id) == 0
    assert conn.send_data(stream_id, b"more", 10**9) == 0
    payload = sum(f.length for f in sent_frames(conn) if f.type == DATA)
    assert payload == INITIAL_WINDOW


def test_send_data_stops_at_the_limit() -> None:
    conn = client()
    stream_id = conn.open_stream()
    assert conn.send_data(stream_id, b"0123456789", 4) == 4
    assert sent_frames(conn)[1:] == [Frame(0, DATA, 0, stream_id, 4, b"0123")]


def test_send_data_splits_at_max_frame_size() -> None:
    conn = YamuxConnection(client=True, config=Config(max_frame_size=100 * KIB))
    stream_id = conn.open_stream()
    body = pattern(INITIAL_WINDOW)
    assert conn.send_data(stream_id, body, 10**9) == INITIAL_WINDOW
    frames = [f for f in sent_frames(conn) if f.type == DATA]
    assert [f.length for f in frames] == [100 * KIB, 100 * KIB, 56 * KIB]
    assert b"".join(f.body for f in frames) == body


def test_window_update_reopens_the_send_window() -> None:
    conn = client()
    stream_id = conn.open_stream()
    conn.send_data(stream_id, pattern(INITIAL_WINDOW), 10**9)
    assert conn.receive_data(window_update(stream_id, 1000)) == [WindowUpdated(stream_id)]
    assert conn.send_data(stream_id, pattern(2000), 10**9) == 1000


# ---------------------------------------------------------------------------------------
# Opening and accepting streams


def test_client_stream_ids_are_odd_from_one() -> None:
    conn = client()
    assert [conn.open_stream() for _ in range(3)] == [1, 3, 5]


def test_server_stream_ids_are_even_from_two() -> None:
    conn = server()
    assert [conn.open_stream() for _ in range(3)] == [2, 4, 6]


def test_open_stream_queues_window_update_syn() -> None:
    conn = client()
    stream_id = conn.open_stream()
    assert sent_frames(conn) == [control(WINDOW_UPDATE, SYN, stream_id)]
    assert conn.unacked_streams == 1


def test_client_stream_ids_exhausted() -> None:
    conn = client()
    conn._next_id = 2**32 - 3
    assert conn.open_stream() == 2**32 - 3
    with pytest.raises(StreamsExhausted):
        conn.open_stream()


def test_server_stream_ids_exhausted() -> None:
    conn = server()
    conn._next_id = 2**32 - 4
    assert conn.open_stream() == 2**32 - 4
    with pytest.raises(StreamsExhausted):
        conn.open_stream()


def test_ack_is_queued_once_immediately_on_inbound_syn() -> None:
    conn = server()
    assert conn.receive_data(syn(1)) == [StreamOpened(1)]
    assert sent_frames(conn) == [control(WINDOW_UPDATE, ACK, 1)]
    assert conn.accept() == 1
    conn.send_data(1, b"hi", 2)
    conn.close_stream(1)
    assert sent_frames(conn) == [
        Frame(0, DATA, 0, 1, 2, b"hi"),
        control(WINDOW_UPDATE, FIN, 1),
    ]


def test_accept_returns_streams_in_arrival_order() -> None:
    conn = server()
    conn.receive_data(syn(3) + syn(1) + syn(5))
    assert [conn.accept(), conn.accept(), conn.accept(), conn.accept()] == [3, 1, 5, None]


def test_stream_acked_once() -> None:
    conn = client()
    stream_id = conn.open_stream()
    assert conn.receive_data(window_update(stream_id, 0, ACK)) == [StreamAcked(stream_id)]
    assert conn.unacked_streams == 0
    assert conn.receive_data(window_update(stream_id, 0, ACK)) == []
    assert conn.unacked_streams == 0


def test_full_accept_backlog_answers_syn_with_rst() -> None:
    conn = YamuxConnection(client=False, config=Config(accept_backlog=1))
    assert conn.receive_data(syn(1)) == [StreamOpened(1)]
    assert conn.receive_data(syn(3)) == []
    assert sent_frames(conn) == [control(WINDOW_UPDATE, ACK, 1), control(WINDOW_UPDATE, RST, 3)]
    assert conn.stream(3) is None


def test_refused_data_syn_body_is_drained() -> None:
    conn = YamuxConnection(client=False, config=Config(accept_backlog=1))
    conn.receive_data(syn(1))
    assert conn.receive_data(data(3, syn(5), SYN) + syn(7)) == []
    assert conn.stream(5) is None


def test_inbound_syn_after_our_go_away_is_answered_with_rst() -> None:
    conn = server()
    conn.go_away()
    assert conn.receive_data(syn(1)) == []
    assert sent_frames(conn) == [
        control(GO_AWAY, 0, 0, GO_AWAY_NORMAL),
        control(WINDOW_UPDATE, RST, 1),
    ]


def test_open_stream_after_our_go_away_raises() -> None:
    conn = client()
    conn.go_away()
    with pytest.raises(GoAwayInForce) as info:
        conn.open_stream()
    assert not info.value.remote


def test_open_stream_after_peer_go_away_raises() -> None:
    conn = client()
    conn.receive_data(go_away(GO_AWAY_NORMAL))
    with pytest.raises(GoAwayInForce) as info:
        conn.open_stream()
    assert info.value.remote


def test_go_away_is_sent_once() -> None:
    conn = client()
    conn.go_away()
    conn.go_away()
    assert sent_frames(conn) == [control(GO_AWAY, 0, 0, GO_AWAY_NORMAL)]


# ---------------------------------------------------------------------------------------
# Protocol errors


def test_duplicate_syn_is_a_protocol_error() -> None:
    conn = server()
    conn.receive_data(syn(1))
    with pytest.raises(ProtocolViolation):
        conn.receive_data(syn(1))


def test_bad_version_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolViolation):
        server().receive_data(frame(WINDOW_UPDATE, SYN, 1, 0, version=1))


def test_unknown_frame_type_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolViolation):
        server().receive_data(frame(4, 0, 0, 0))


@pytest.mark.parametrize(("is_client", "stream_id"), [(True, 1), (False, 2)])
def test_syn_with_our_own_parity_is_a_protocol_error(is_client: bool, stream_id: int) -> None:
    conn = YamuxConnection(client=is_client)
    with pytest.raises(ProtocolViolation):
        conn.receive_data(syn(stream_id))


@pytest.mark.parametrize("is_client", [True, False])
def test_syn_on_stream_zero_is_a_protocol_error(is_client: bool) -> None:
    conn = YamuxConnection(client=is_client)
    with pytest.raises(ProtocolViolation):
        conn.receive_data(syn(0))


def test_second_fin_is_a_protocol_error() -> None:
    conn = server()
    conn.receive_data(syn(1) + window_update(1, 0, FIN))
    with pytest.raises(ProtocolViolation):
        conn.receive_data(data(1, b"", FIN))


# ---------------------------------------------------------------------------------------
# Unknown streams


def test_data_for_an_unknown_stream_is_drained() -> None:
    """The body is skipped whole: header-like bytes inside it are not parsed."""
    conn = server()
    events = conn.receive_data(data(3, syn(5)) + syn(7))
    assert events == [StreamOpened(7)]
    assert conn.stream(5) is None


def test_data_for_an_unknown_stream_is_drained_across_reads() -> None:
    conn = server()
    raw = data(3, syn(5) + pattern(100)) + syn(7)
    assert coalesce(feed_byte_by_byte(conn, raw)) == [StreamOpened(7)]


def test_other_frames_for_an_unknown_stream_are_ignored() -> None:
    conn = server()
    raw = (
        window_update(3, 100)
        + window_update(3, 0, ACK)
        + window_update(3, 0, FIN)
        + window_update(3, 0, RST)
        + data(3, b"", FIN)
    )
    assert conn.receive_data(raw) == []
    assert conn.data_to_send() == b""
    assert not conn.terminated


# ---------------------------------------------------------------------------------------
# Pings and GoAway


def test_ping_is_answered_with_ack_carrying_the_same_opaque() -> None:
    conn = server()
    assert conn.receive_data(ping(0xDEADBEEF)) == []
    assert sent_frames(conn) == [control(PING, ACK, 0, 0xDEADBEEF)]


def test_ping_queues_syn_with_the_opaque() -> None:
    conn = client()
    conn.ping(42)
    assert sent_frames(conn) == [control(PING, SYN, 0, 42)]


def test_pong_yields_pong_received() -> None:
    assert client().receive_data(ping(42, ACK)) == [PongReceived(42)]


def test_ping_round_trip() -> None:
    pair = ConnectionPair()
    pair.client.ping(7)
    client_events, _ = pair.exchange()
    assert client_events == [PongReceived(7)]


def test_go_away_normal_sets_remote_go_away_and_keeps_streams() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_accepted()
    assert pair.client.receive_data(go_away(GO_AWAY_NORMAL)) == [GoAwayReceived(GO_AWAY_NORMAL)]
    assert pair.client.remote_go_away
    assert not pair.client.terminated
    pair.server.send_data(stream_id, b"still here", 100)
    client_events, _ = pair.exchange()
    assert client_events == [DataReceived(stream_id, b"still here")]


@pytest.mark.parametrize("code", [1, 2])
def test_go_away_with_an_error_code_terminates(code: int) -> None:
    conn = client()
    conn.open_stream()
    assert conn.receive_data(go_away(code) + ping(1)) == [GoAwayReceived(code)]
    assert conn.terminated
    assert conn.remote_go_away
    assert conn.receive_data(ping(2)) == []


# ---------------------------------------------------------------------------------------
# Closing and resetting


def test_fin_goes_behind_queued_data() -> None:
    conn = client()
    stream_id = conn.open_stream()
    conn.send_data(stream_id, b"abc", 3)
    conn.close_stream(stream_id)
    conn.ping(1)
    assert sent_frames(conn) == [
        control(WINDOW_UPDATE, SYN, stream_id),
        control(PING, SYN, 0, 1),
        Frame(0, DATA, 0, stream_id, 3, b"abc"),
        control(WINDOW_UPDATE, FIN, stream_id),
    ]


def test_fin_waits_for_data_held_back_by_the_send_limit() -> None:
    conn = client()
    stream_id = conn.open_stream()
    conn.send_data(stream_id, b"a" * 100, 100)
    conn.send_data(stream_id, b"b" * 100, 100)
    conn.close_stream(stream_id)
    first = frames_of(conn.data_to_send(limit=100))
    assert [f.flags for f in first] == [SYN, 0]
    second = frames_of(conn.data_to_send())
    assert [(f.type, f.flags, f.body) for f in second] == [
        (DATA, 0, b"b" * 100),
        (WINDOW_UPDATE, FIN, b""),
    ]


def test_control_frames_go_before_queued_data() -> None:
    conn = server()
    conn.receive_data(syn(1) + data(1, pattern(200 * KIB)))
    conn.data_to_send()
    conn.send_data(1, b"queued", 6)
    conn.consume(1, 200 * KIB)
    frames = sent_frames(conn)
    assert [(f.type, f.flags) for f in frames] == [(WINDOW_UPDATE, 0), (DATA, 0)]


def test_close_stream_is_idempotent() -> None:
    conn = client()
    stream_id = conn.open_stream()
    conn.close_stream(stream_id)
    conn.close_stream(stream_id)
    assert [f.flags for f in sent_frames(conn)] == [SYN, FIN]


def test_send_after_close_raises() -> None:
    conn = client()
    stream_id = conn.open_stream()
    conn.close_stream(stream_id)
    with pytest.raises(RuntimeError):
        conn.send_data(stream_id, b"x", 1)


def test_reset_stream_drops_its_queued_data_and_queues_rst() -> None:
    conn = client()
    kept, dropped = conn.open_stream(), conn.open_stream()
    conn.data_to_send()
    conn.send_data(dropped, b"dropped", 7)
    conn.send_data(kept, b"kept", 4)
    conn.close_stream(dropped)
    conn.reset_stream(dropped)
    assert sent_frames(conn) == [
        control(WINDOW_UPDATE, RST, dropped),
        Frame(0, DATA, 0, kept, 4, b"kept"),
    ]
    assert conn.stream(dropped) is None
    assert conn.queued_data_bytes == 0


def test_rst_received_forgets_the_stream() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_accepted()
    pair.server.reset_stream(stream_id)
    client_events, _ = pair.exchange()
    assert client_events == [ResetReceived(stream_id)]
    assert pair.client.stream(stream_id) is None
    assert pair.server.stream(stream_id) is None


def test_abandon_stream_returns_unread_credit_then_answers_data_with_rst() -> None:
    conn = server()
    conn.receive_data(syn(1) + data(1, pattern(100 * KIB)))
    conn.data_to_send()
    conn.abandon_stream(1)
    assert sent_frames(conn) == [
        control(WINDOW_UPDATE, 0, 1, 100 * KIB),
        control(WINDOW_UPDATE, FIN, 1),
    ]
    assert conn.receive_data(data(1, b"late")) == []
    assert sent_frames(conn) == [control(WINDOW_UPDATE, RST, 1)]
    assert conn.stream(1) is None
    assert conn.receive_data(data(1, b"later")) == []
    assert conn.data_to_send() == b""


def test_no_rst_after_a_complete_exchange() -> None:
    pair = ConnectionPair()
    stream_id = pair.open_accepted()
    pair.client.send_data(stream_id, b"request", 100)
    pair.client.close_stream(stream_id)
    _, server_events = pair.exchange()
    assert server_events == [DataReceived(stream_id, b"request"), StreamEnded(stream_id)]
    pair.server.consume(stream_id, 7)
    pair.server.send_data(stream_id, b"response", 100)
    pair.server.close_stream(stream_id)
    client_events, _ = pair.exchange()
    assert client_events == [DataReceived(stream_id, b"response"), StreamEnded(stream_id)]
    pair.client.consume(stream_id, 8)
    pair.exchange()
    all_frames = pair.to_server_frames + pair.to_client_frames
    assert not [f for f in all_frames if f.flags & RST]
    assert (pair.client.num_streams, pair.server.num_streams) == (0, 0)


# ---------------------------------------------------------------------------------------
# Two connections back to back, driven by hypothesis

Side = Literal["client", "server"]
SIDES: tuple[Side, Side] = ("client", "server")
PEER: dict[Side, Side] = {"client": "server", "server": "client"}
sides = st.sampled_from(SIDES)
picks = st.integers(0, 2**16)
limits = st.one_of(st.integers(0, 64), st.integers(1 * KIB, 300 * KIB), st.just(2**31))
sizes = st.one_of(st.integers(1, 100), st.integers(10 * KIB, 200 * KIB))


@attrs.define
class Flow:
    """One direction of one stream, as the model knows it."""

    #: Bytes the sender's connection accepted (send_data returned them).
    sent: bytearray = attrs.Factory(bytearray)
    #: Bytes written by the application but not yet accepted (window or limit).
    pending: bytes = b""
    #: Bytes the receiver reported, in order.
    received: bytearray = attrs.Factory(bytearray)
    #: Received but not yet consumed by the receiving application.
    unconsumed: int = 0
    fin_queued: bool = False
    ended: bool = False
    reset_seen: bool = False


class BackToBack(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conns: dict[Side, YamuxConnection] = {
            "client": YamuxConnection(client=True),
            "server": YamuxConnection(client=False),
        }
        #: Bytes a side has sent that the network has not delivered yet.
        self.wire: dict[Side, bytearray] = {side: bytearray() for side in SIDES}
        self.next_id: dict[Side, int] = {"client": 1, "server": 2}
        #: Streams each application holds: opened by it, or accepted.
        self.held: dict[Side, list[int]] = {side: [] for side in SIDES}
        self.backlog: dict[Side, deque[int]] = {side: deque() for side in SIDES}
        self.opened: dict[Side, set[int]] = {side: set() for side in SIDES}
        self.acked: set[int] = set()
        self.abandoned: dict[Side, set[int]] = {side: set() for side in SIDES}
        #: Streams that either side reset or abandoned: delivery may stop short.
        self.may_reset: set[int] = set()
        #: (sender, stream id) -> the flow of bytes that way.
        self.flows: dict[tuple[Side, int], Flow] = {}
        self.pings: dict[Side, deque[int]] = {side: deque() for side in SIDES}

    # -- helpers --------------------------------------------------------------------------

    def writable(self, side: Side) -> list[int]:
        return [s for s in self.held[side] if self.is_writable(side, s)]

    def handle(self, side: Side, events: Sequence[Event]) -> None:
        peer = PEER[side]
        conn = self.conns[side]
        for event in events:
            if isinstance(event, StreamOpened):
                assert event.stream_id in self.opened[peer]
                self.backlog[side].append(event.stream_id)
            elif isinstance(event, DataReceived):
                flow = self.flows[(peer, event.stream_id)]
                assert not flow.reset_seen, "data after RST"
                assert not flow.ended, "data after FIN"
                start = len(flow.received)
                assert flow.sent[start : start + len(event.data)] == event.data
                flow.received += event.data
                if event.stream_id in self.abandoned[side]:
                    conn.consume(event.stream_id, len(event.data))  # as the session does
                else:
                    flow.unconsumed += len(event.data)
            elif isinstance(event, StreamEnded):
                flow = self.flows[(peer, event.stream_id)]
                assert flow.fin_queued, "StreamEnded without a FIN"
                assert not flow.ended
                if event.stream_id not in self.abandoned[side]:
                    # (an abandoned stream drops the rest of a frame still arriving)
                    assert len(flow.received) == len(flow.sent), "StreamEnded before all data"
                flow.ended = True
            elif isinstance(event, ResetReceived):
                assert event.stream_id in self.may_reset
                self.flows[(peer, event.stream_id)].reset_seen = True
                self.flows[(side, event.stream_id)].pending = b""
            elif isinstance(event, StreamAcked):
                assert event.stream_id in self.opened[side]
                assert event.stream_id not in self.acked
                self.acked.add(event.stream_id)
            elif isinstance(event, PongReceived):
                assert self.pings[side], f"unsolicited pong {event.opaque}"
                assert self.pings[side].popleft() == event.opaque
            elif isinstance(event, WindowUpdated):
                pass  # the stream may already be gone by the end of this batch
            else:
                raise AssertionError(f"unexpected event {event!r}")

    def push(self, side: Side, stream_id: int, limit: int) -> None:
        flow = self.flows[(side, stream_id)]
        window = self.conns[side].send_window(stream_id)
        n = self.conns[side].send_data(stream_id, flow.pending, limit)
        assert n == max(0, min(len(flow.pending), window, limit))
        flow.sent += flow.pending[:n]
        flow.pending = flow.pending[n:]

    def transmit(self, side: Side, limit: int) -> None:
        self.wire[side] += self.conns[side].data_to_send(limit)

    def deliver(self, sender: Side, size: int) -> bool:
        wire = self.wire[sender]
        if not wire:
            return False
        chunk = bytes(wire[:size])
        del wire[:size]
        receiver = PEER[sender]
        self.handle(receiver, self.conns[receiver].receive_data(chunk))
        return True

    def accept_one(self, side: Side) -> None:
        accepted = self.conns[side].accept()
        if self.backlog[side]:
            assert accepted == self.backlog[side].popleft()
            self.held[side].append(accepted)
        else:
            assert accepted is None

    def consume(self, side: Side, stream_id: int, amount: int) -> None:
        flow = self.flows[(PEER[side], stream_id)]
        amount = min(amount, flow.unconsumed)
        self.conns[side].consume(stream_id, amount)
        flow.unconsumed -= amount

    def held_streams(self, usable: Callable[[Side, int], bool]) -> list[tuple[Side, int]]:
        return [(side, s) for side in SIDES for s in self.held[side] if usable(side, s)]

    def is_writable(self, side: Side, stream_id: int) -> bool:
        state = self.conns[side].stream(stream_id)
        return state is not None and not state.local_closed

    def is_closable(self, side: Side, stream_id: int) -> bool:
        return self.is_writable(side, stream_id) and not self.flows[(side, stream_id)].pending

    def is_readable(self, side: Side, stream_id: int) -> bool:
        flow = self.flows[(PEER[side], stream_id)]
        return stream_id not in self.abandoned[side] and flow.unconsumed > 0

    def is_live(self, side: Side, stream_id: int) -> bool:
        return self.conns[side].stream(stream_id) is not None

    def is_abandonable(self, side: Side, stream_id: int) -> bool:
        return self.is_live(side, stream_id) and stream_id not in self.abandoned[side]

    # -- rules ----------------------------------------------------------------------------

    @initialize()
    def open_and_accept_one_stream_each_way(self) -> None:
        self.open_stream("client")
        self.open_stream("server")
        for side in SIDES:
            self.transmit(side, 0)
        for side in SIDES:
            self.deliver(side, 2**31)
            self.accept_one(PEER[side])

    @rule(side=sides)
    def open_stream(self, side: Side) -> None:
        stream_id = self.conns[side].open_stream()
        assert stream_id == self.next_id[side]
        self.next_id[side] += 2
        self.held[side].append(stream_id)
        self.opened[side].add(stream_id)
        self.flows[(side, stream_id)] = Flow()
        self.flows[(PEER[side], stream_id)] = Flow()

    @precondition(lambda self: any(self.backlog.values()))
    @rule(side=sides)
    def accept(self, side: Side) -> None:
        self.accept_one(side)

    @precondition(lambda self: self.held_streams(self.is_writable))
    @rule(pick=picks, size=sizes, seed=st.integers(0, 2**32 - 1), limit=limits)
    def write(self, pick: int, size: int, seed: int, limit: int) -> None:
        """The application writes ``size`` random bytes; what the window refuses stays pending."""
        candidates = self.held_streams(self.is_writable)
        side, stream_id = candidates[pick % len(candidates)]
        flow = self.flows[(side, stream_id)]
        flow.pending += random.Random(seed).randbytes(size)
        self.push(side, stream_id, limit)

    @precondition(lambda self: self.held_streams(self.is_writable))
    @rule(pick=picks, size=st.integers(64 * KIB, 300 * KIB), seed=st.integers(0, 2**32 - 1))
    def write_a_lot(self, pick: int, size: int, seed: int) -> None:
        """A bulk write, to run into the send window."""
        self.write(pick, size, seed, 2**31)

    @rule(side=sides, limit=limits)
    def send(self, side: Side, limit: int) -> None:
        """The side's writer hands queued frames (control first, then data) to the network."""
        self.transmit(side, limit)

    @rule(
        sender=sides,
        size=st.one_of(st.integers(1, 16), st.integers(1, 300 * KIB), st.just(2**31)),
        send_first=st.booleans(),
    )
    def network_delivers(self, sender: Side, size: int, send_first: bool) -> None:
        """Up to ``size`` bytes reach the peer; ``send_first``: the writer ran just before."""
        if send_first:
            self.transmit(sender, 2**31)
        self.deliver(sender, size)

    @precondition(lambda self: self.held_streams(self.is_readable))
    @rule(pick=picks, amount=st.one_of(st.integers(1, 64), st.integers(1, 300 * KIB)))
    def read(self, pick: int, amount: int) -> None:
        candidates = self.held_streams(self.is_readable)
        side, stream_id = candidates[pick % len(candidates)]
        self.consume(side, stream_id, amount)

    @precondition(lambda self: self.held_streams(self.is_closable))
    @rule(pick=picks)
    def half_close(self, pick: int) -> None:
        candidates = self.held_streams(self.is_closable)
        side, stream_id = candidates[pick % len(candidates)]
        self.conns[side].close_stream(stream_id)
        self.flows[(side, stream_id)].fin_queued = True

    @precondition(lambda self: self.held_streams(self.is_live))
    @rule(pick=picks)
    def reset(self, pick: int) -> None:
        candidates = self.held_streams(self.is_live)
        side, stream_id = candidates[pick % len(candidates)]
        self.conns[side].reset_stream(stream_id)
        self.may_reset.add(stream_id)
        self.flows[(side, stream_id)].pending = b""

    @precondition(lambda self: self.held_streams(self.is_abandonable))
    @rule(pick=picks)
    def abandon(self, pick: int) -> None:
        """The application closes the stream without reading the rest (``aclose``)."""
        candidates = self.held_streams(self.is_abandonable)
        side, stream_id = candidates[pick % len(candidates)]
        self.conns[side].abandon_stream(stream_id)
        self.abandoned[side].add(stream_id)
        self.may_reset.add(stream_id)
        outgoing = self.flows[(side, stream_id)]
        outgoing.pending = b""
        outgoing.fin_queued = True
        self.flows[(PEER[side], stream_id)].unconsumed = 0

    @rule(side=sides, opaque=st.integers(0, 2**32 - 1))
    def ping(self, side: Side, opaque: int) -> None:
        self.conns[side].ping(opaque)
        self.pings[side].append(opaque)

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def windows_and_buffers_are_bounded(self) -> None:
        for side in SIDES:
            conn = self.conns[side]
            assert not conn.terminated
            assert conn.queued_data_bytes >= 0
            for sender, stream_id in self.flows:
                if sender == side:
                    continue
                state = conn.stream(stream_id)
                if state is None:
                    continue
                assert state.send_window >= 0
                assert 0 <= state.recv_window <= state.recv_window_max == INITIAL_WINDOW
                assert 0 <= state.unread <= state.recv_window_max
                if stream_id not in self.abandoned[side]:
                    assert state.unread == self.flows[(sender, stream_id)].unconsumed
                    # Credit is only ever granted for consumed bytes.
                    assert state.recv_window + state.unread <= state.recv_window_max

    # -- the end: deliver and read everything ---------------------------------------------

    def teardown(self) -> None:
        for _ in range(10_000):
            for side in SIDES:
                while self.backlog[side]:
                    self.accept_one(side)
                for stream_id in self.writable(side):
                    if self.flows[(side, stream_id)].pending:
                        self.push(side, stream_id, 2**31)
                self.transmit(side, 2**31)
            moved = [self.deliver(side, 2**31) for side in SIDES]
            for side in SIDES:
                for stream_id in self.held[side]:
                    if stream_id not in self.abandoned[side]:
                        self.consume(side, stream_id, 2**31)
            if not any(moved) and not any(c.has_data_to_send() for c in self.conns.values()):
                break
        else:
            raise AssertionError("the two sides never went quiet")

        for side in SIDES:
            assert not self.conns[side].has_data_to_send()
            assert not self.pings[side], "unanswered pings"
        for (sender, stream_id), flow in self.flows.items():
            if stream_id in self.may_reset:
                continue
            assert not flow.pending, f"{sender} could not send on {stream_id}"
            assert flow.received == flow.sent
            assert flow.ended == flow.fin_queued
            state = self.conns[sender].stream(stream_id)
            peer_state = self.conns[PEER[sender]].stream(stream_id)
            if state is not None and peer_state is not None:
                assert state.send_window == peer_state.recv_window


BackToBack.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBackToBack = BackToBack.TestCase


# -- the core is sans-IO ----------------------------------------------------------------------

CORE_MODULES = ("connection", "core_errors", "events", "frames", "config")


@pytest.mark.parametrize("module", CORE_MODULES)
def test_the_core_imports_no_io(module: str) -> None:
    import ast
    import importlib.util

    spec = importlib.util.find_spec(f"visiona_tunnel.yamux.{module}")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if node.level == 0
            else []
        )
    }
    assert imported <= {"__future__", "attrs", "collections", "enum", "struct", "typing"}
