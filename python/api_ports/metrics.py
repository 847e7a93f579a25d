"""``GET /port/metrics``: the manager's numbers in Prometheus exposition format.

Each router has its own ``CollectorRegistry`` (never the process-global one,
so two routers, or an app's own metrics, never clash), holding one collector
that reads the state at scrape time.

Every ``dpm_*`` counter is a figure the state file records (``change_count``,
``stats``), never a tally of the process that answers: behind several workers,
whichever worker a scrape reaches reports the same count, so a counter never
goes backwards between two scrapes. ``server_registry`` adds the standard
``process_*`` and ``python_*`` metrics (of the answering process) for
``dynamic-port-manager serve``'s ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

PREFIX = "dpm_"


class PortCollector:
    """Collects the free/used counts, change count, pick/release/error counters,
    whether an error is in effect and the last refresh time of one manager's state."""

    def __init__(self, get_state: Callable[[], dict[str, Any]]) -> None:
        self._get_state = get_state

    def describe(self) -> Iterator[Metric]:
        # Names only: describing must not create or touch the manager.
        return _families(None)

    def collect(self) -> Iterator[Metric]:
        return _families(self._get_state())


def _families(state: dict[str, Any] | None) -> Iterator[Metric]:
    def gauge(name: str, doc: str, value: float | None) -> Metric:
        family = GaugeMetricFamily(PREFIX + name, doc)
        if value is not None:
            family.add_metric([], value)
        return family

    def counter(name: str, doc: str, value: float | None) -> Metric:
        family = CounterMetricFamily(PREFIX + name, doc)
        if value is not None:
            family.add_metric([], value)
        return family

    s: dict[str, Any] = state or {}
    stats: dict[str, Any] = s.get("stats") or {}
    known = state is not None
    yield gauge(
        "free_ports", "Ports of the range free now.", len(s["free_ports"]) if known else None
    )
    yield gauge(
        "used_ports",
        "Ports of the range leased or in use now.",
        len(s["used_ports"]) if known else None,
    )
    yield counter(
        "port_changes", "Changes of the active port.", s["change_count"] if known else None
    )
    yield counter("picks", "Ports picked.", stats.get("picks") if known else None)
    yield counter("releases", "Ports released.", stats.get("releases") if known else None)
    yield counter("errors", "Errors recorded.", stats.get("errors") if known else None)
    yield gauge(
        "error_active",
        "1 while last_error is in effect (cleared by the next clean save), else 0.",
        float(bool(s.get("error_active"))) if known else None,
    )
    # Left without a sample until the first refresh has a time stamp.
    yield gauge(
        "last_refresh_timestamp_seconds",
        "POSIX time of the last refresh (last_checked).",
        s.get("last_checked_unix"),
    )
    # etcd discovery (the manager's discovery=): no sample without it, or
    # before the announcer's first contact with etcd.
    up = GaugeMetricFamily(
        PREFIX + "discovery_up",
        "1 while etcd takes the service's announcements, 0 while it does not.",
        labels=["service"],
    )
    discovery: dict[str, Any] = s.get("discovery") or {}
    if discovery.get("up") is not None:
        up.add_metric([str(s.get("settings", {}).get("service", ""))], float(discovery["up"]))
    yield up


def new_registry(get_state: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PortCollector(get_state))
    return registry


def server_registry(get_state: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """``new_registry``'s metrics and the standard ones of this process:
    ``process_*`` (CPU, memory, open files, start time; read from ``/proc``)
    and ``python_*`` (interpreter version, garbage collections)."""
    registry = new_registry(get_state)
    ProcessCollector(registry=registry)
    # Stateless collectors: the process-global instances serve any registry.
    registry.register(PLATFORM_COLLECTOR)
    registry.register(GC_COLLECTOR)
    return registry


def render(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The body and content type the scraper asked for (text or OpenMetrics).

    An Accept header prometheus_client cannot read falls back to the plain text
    format, as for a scraper that asks for nothing: it compares versions as
    tuples of ints and strings, so ``version=abc`` or ``1..0`` raised a
    TypeError (a 500), and ``int()`` takes control characters around digits,
    which would then be echoed into the Content-Type header.
    """
    try:
        encoder, content_type = choose_encoder(accept)
        if content_type.isascii() and content_type.isprintable():
            return encoder(registry), content_type
    except (TypeError, ValueError):
        pass
    encoder, content_type = choose_encoder("")  # the plain text format
    return encoder(registry), content_type
