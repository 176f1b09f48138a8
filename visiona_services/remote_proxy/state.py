"""What the remote-proxy's two listeners share: config, live tunnels, metrics."""

from __future__ import annotations

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram

from visiona_tunnel.limits import EveryInterval
from visiona_tunnel.relay import Tunnel, TunnelDown, TunnelEvent, TunnelRegistry, TunnelUp

from ..common.gcpauses import gc_pauses
from ..common.inflight import InFlight
from ..common.metrics import MetricSet
from .config import ProxyConfig


@attrs.define(eq=False)
class TunnelTraffic:
    """Bytes over every tunnel since the start: the ended ones' totals plus the running
    ones' (from their :class:`TunnelUp` to their :class:`TunnelDown`, so that a tunnel
    that is closing still counts and the totals never go down)."""

    _running: set[Tunnel] = attrs.field(factory=set)
    _ended_received: int = 0
    _ended_sent: int = 0

    def observe(self, event: TunnelEvent) -> None:
        if isinstance(event, TunnelUp):
            self._running.add(event.tunnel)
        elif event.tunnel in self._running:
            self._running.discard(event.tunnel)
            stats = event.tunnel.stats()
            self._ended_received += stats.bytes_in
            self._ended_sent += stats.bytes_out

    def received(self) -> float:
        return self._ended_received + sum(t.stats().bytes_in for t in self._running)

    def sent(self) -> float:
        return self._ended_sent + sum(t.stats().bytes_out for t in self._running)


#: ``visiona_forward_duration_seconds``'s buckets (seconds).
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@attrs.define(eq=False)
class ProxyMetrics:
    """The series ``GET /metrics`` shows (names are part of the service's interface:
    docs/remote-proxy.md lists them), on a registry of this service's own."""

    registry: CollectorRegistry
    traffic: TunnelTraffic
    connects: Counter
    replacements: Counter
    disconnects: Counter
    auth_failures: Counter
    refusals: Counter  # labels: status, code
    forwards: Counter  # labels: status
    forward_seconds: Histogram
    forward_request_bytes: Counter  # request bodies sent to agents
    forward_response_bytes: Counter  # response bodies from agents

    @classmethod
    def create(cls, tunnels: TunnelRegistry, subscribers: InFlight) -> ProxyMetrics:
        """``subscribers``: the subscriptions of ``GET /internal/events``."""
        registry = CollectorRegistry()
        series = MetricSet(registry)
        series.gauge_of("visiona_tunnel_sessions", "Live agent tunnels.", lambda: len(tunnels))
        series.gauge_of(
            "visiona_tunnel_open_streams",
            "Open yamux streams over all tunnels.",
            lambda: sum(t.session.num_streams for t in tunnels),
        )
        traffic = TunnelTraffic()
        series.counter_of(
            "visiona_tunnel_received_bytes_total",
            "Bytes received from agents over their tunnels (WebSocket payload).",
            traffic.received,
        )
        series.counter_of(
            "visiona_tunnel_sent_bytes_total",
            "Bytes sent to agents over their tunnels (WebSocket payload).",
            traffic.sent,
        )
        metrics = cls(
            registry=registry,
            traffic=traffic,
            connects=series.counter("visiona_tunnel_connects_total", "Tunnels accepted."),
            replacements=series.counter(
                "visiona_tunnel_replacements_total", "Tunnels replaced by a newer one."
            ),
            disconnects=series.counter("visiona_tunnel_disconnects_total", "Tunnels ended."),
            auth_failures=series.counter(
                "visiona_tunnel_auth_failures_total", "Tunnel upgrades refused for the token."
            ),
            refusals=series.counter(
                "visiona_tunnel_refusals_total",
                "Tunnel upgrades refused, by status and code (401 UNAUTHORIZED, 429 "
                "TOO_MANY_ATTEMPTS, 503 DRAINING / AUTH_UNAVAILABLE / AT_CAPACITY, 400 ...).",
                ["status", "code"],
            ),
            forwards=series.counter(
                "visiona_forward_requests_total", "Forwarded requests by status.", ["status"]
            ),
            forward_seconds=series.histogram(
                "visiona_forward_duration_seconds",
                "Time to the agent's response head.",
                FORWARD_BUCKETS,
            ),
            forward_request_bytes=series.counter(
                "visiona_forward_request_bytes_total", "Request body bytes forwarded to agents."
            ),
            forward_response_bytes=series.counter(
                "visiona_forward_response_bytes_total", "Response body bytes from agents."
            ),
        )
        series.gauge_of(
            "visiona_events_subscribers",
            "Subscribers of the events stream (GET /internal/events).",
            lambda: subscribers.count,
        )
        series.gc_pauses(gc_pauses())
        return metrics

    def value(self, name: str, **labels: str) -> float:
        """One series' value now (0 if it has none yet), e.g.
        ``value("visiona_forward_requests_total", status="200")``."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def observe(self, event: TunnelEvent) -> None:
        """A :class:`TunnelRegistry` observer."""
        self.traffic.observe(event)
        if isinstance(event, TunnelUp):
            self.connects.inc()
        elif isinstance(event, TunnelDown):
            self.disconnects.inc()
            if event.replaced:
                self.replacements.inc()


@attrs.define(eq=False)
class ProxyState:
    config: ProxyConfig
    tunnels: TunnelRegistry
    metrics: ProxyMetrics
    #: Set when the service is shutting down: no new tunnels, no new forwards.
    draining: trio.Event = attrs.field(factory=trio.Event)
    #: Forwards running now (``with state.inflight:``); a shutdown waits for
    #: ``state.inflight.wait_idle()``. WebSocket relays count too: draining closes them
    #: (1001 both ways), and the tunnel must outlive their close frames.
    inflight: InFlight = attrs.field(factory=InFlight)
    #: Subscriptions of the events stream (``GET /internal/events``) now; a subscription
    #: ends when its observer leaves the registry.
    event_subscribers: InFlight = attrs.field(factory=InFlight)
    #: How many event lines a subscriber may have waiting before it is disconnected
    #: (set in code only: tests make it small).
    events_buffer: int = 1000
    #: Refused upgrades and failing token checks are logged at most every 10 s, with a
    #: count: an attacker must not be able to fill the log.
    refusals_log: EveryInterval = attrs.field(factory=EveryInterval)
    verifier_failures_log: EveryInterval = attrs.field(factory=EveryInterval)

    @classmethod
    def create(cls, config: ProxyConfig) -> ProxyState:
        tunnels = TunnelRegistry()
        subscribers = InFlight()
        metrics = ProxyMetrics.create(tunnels, subscribers)
        tunnels.add_observer(metrics.observe)
        return cls(config=config, tunnels=tunnels, metrics=metrics, event_subscribers=subscribers)
