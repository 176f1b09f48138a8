"""Prometheus metrics through ``prometheus-client``, one registry per service instance.

The exposition formats (text 0.0.4, OpenMetrics, the content negotiation between them,
escaping, histogram buckets) are prometheus-client's to get right. Each service instance
has a :class:`MetricSet` on a ``CollectorRegistry`` of its own, never the library's global
``REGISTRY``: several services, or the many of a test run, live in one process without
colliding, and the output holds only the service's series.

prometheus-client gives every counter and histogram a ``<name>_created`` series (its start
time); :class:`MetricSet` leaves those out, so that ``GET /metrics`` shows exactly the
documented series. (``prometheus_client.disable_created_metrics()`` would do it for the
whole process instead.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .gcpauses import GcPauses

__all__ = ["MetricSet", "exposition"]


class MetricSet:
    """The series of one registry, in the order they are added: prometheus-client's
    counters and histograms, and values read when scraped (:meth:`counter_of`,
    :meth:`gauge_of`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._sources: list[Callable[[], Iterable[Metric]]] = []
        registry.register(self)

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        counter = Counter(name, help, labelnames, registry=None)
        self._sources.append(counter.collect)
        return counter

    def counter_of(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A counter whose total is ``read()`` when scraped (it must never go down)."""
        self._sources.append(lambda: [CounterMetricFamily(name, help, value=read())])

    def gauge_of(self, name: str, help: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` when scraped."""
        self._sources.append(lambda: [GaugeMetricFamily(name, help, value=read())])

    def gc_pauses(self, pauses: GcPauses) -> None:
        """``visiona_gc_pause_seconds_total`` and ``visiona_gc_longest_pause_seconds``, by
        generation: how long the garbage collector stopped the process."""

        def families() -> list[Metric]:
            total = CounterMetricFamily(
                "visiona_gc_pause_seconds",
                "Time the garbage collector stopped the process, by generation.",
                labels=["generation"],
            )
            longest = GaugeMetricFamily(
                "visiona_gc_longest_pause_seconds",
                "The longest garbage-collection pause since start, by generation.",
                labels=["generation"],
            )
            for generation in range(3):
                total.add_metric([str(generation)], pauses.total[generation])
                longest.add_metric([str(generation)], pauses.longest[generation])
            return [total, longest]

        self._sources.append(families)

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        histogram = Histogram(name, help, registry=None, buckets=buckets)
        self._sources.append(histogram.collect)
        return histogram

    def collect(self) -> Iterator[Metric]:
        """For the registry: every series, without the ``_created`` ones."""
        for source in self._sources:
            for family in source():
                created = family.name + "_created"
                family.samples = [sample for sample in family.samples if sample.name != created]
                yield family


def exposition(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The body and ``Content-Type`` of a scrape whose ``Accept`` header is ``accept``,
    negotiated as prometheus-client's own exporters do: Prometheus text 0.0.4
    (``text/plain; version=0.0.4; charset=utf-8``) unless the scraper asks for OpenMetrics
    or text 1.0.0."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type
