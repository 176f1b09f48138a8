"""``common.metrics``: prometheus-client series on a registry of their own, without the
``_created`` series, in the format the scraper asks for."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry

from visiona_services.common.metrics import MetricSet, exposition

OPENMETRICS = "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3"


def _series(registry: CollectorRegistry, level: list[float]) -> MetricSet:
    series = MetricSet(registry)
    series.gauge_of("demo_level", "A level read when scraped.", lambda: level[0])
    series.counter_of("demo_read_total", "A total read when scraped.", lambda: level[0] * 2)
    series.counter("demo_events_total", "Events.", ["kind"]).labels(kind="a").inc(3)
    series.histogram("demo_seconds", "Durations.", (0.1, 1.0)).observe(0.5)
    return series


def test_the_text_format_has_the_series_and_no_created_ones() -> None:
    registry, level = CollectorRegistry(), [4.0]
    _series(registry, level)
    body, content_type = exposition(registry)
    text = body.decode()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE demo_level gauge\ndemo_level 4.0\n" in text
    assert "# TYPE demo_read_total counter\ndemo_read_total 8.0\n" in text
    assert 'demo_events_total{kind="a"} 3.0' in text
    assert 'demo_seconds_bucket{le="1.0"} 1.0' in text and "demo_seconds_count 1.0" in text
    assert "_created" not in text
    level[0] = 5.0  # read again at the next scrape
    assert "demo_level 5.0\n" in exposition(registry)[0].decode()


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    registry = CollectorRegistry()
    _series(registry, [1.0])
    body, content_type = exposition(registry, OPENMETRICS)
    text = body.decode()
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert "# TYPE demo_events counter" in text and "# EOF" in text
    assert "_created" not in text


def test_registries_are_separate_and_the_global_one_stays_empty() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    _series(first, [1.0])
    _series(second, [2.0])  # the same names: no DuplicateTimeseries
    assert first.get_sample_value("demo_level") == 1.0
    assert second.get_sample_value("demo_level") == 2.0
    assert prometheus_client.REGISTRY.get_sample_value("demo_level") is None
