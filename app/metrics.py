"""Prometheus metrics: per-site counters and histograms, and queue gauges read at scrape time.

Each Service owns its own ``CollectorRegistry`` (several services may share a test
process). Labels carry site names, outcomes and machine reasons only — never a
token, a password, a UID or anything about a patient. Counters are per process;
the queue gauges come from the database, so every process reports the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Site, State, Upload

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# What a stored upload became, as the site saw it.
_OUTCOMES = {
    State.QUEUED: "accepted",
    State.DUPLICATE: "duplicate",
    State.QUARANTINED: "conflict",
}
# Forward latency spans seconds (Orthanc up) to days (a weekend outage).
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)
_HANDLING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_UNKNOWN_SITE = "unknown"


class _QueueCollector(Collector):
    """Queue depth and quarantined count per site, counted in the database on each scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        queued, quarantined = self._families()
        try:
            with self._sessions() as session:
                names = session.scalars(select(Site.name).where(Site.deleted_at.is_(None))).all()
                counts = {(name, State.QUEUED.value): 0 for name in names} | {
                    (name, State.QUARANTINED.value): 0 for name in names
                }
                # One aggregate over the (state, received_at) index: queued and quarantined
                # rows only, however long the intake log grows.
                rows = session.execute(
                    select(Site.name, Upload.state, func.count())
                    .join(Site, Site.id == Upload.site_id)
                    .where(Upload.state.in_([State.QUEUED, State.QUARANTINED]))
                    .group_by(Site.name, Upload.state)
                ).all()
        except SQLAlchemyError as exc:
            log.warning("metrics: the database did not answer the queue count: %s", exc)
            return
        for name, state, count in rows:
            counts[(name, str(state))] = count
        for (name, key), count in sorted(counts.items()):
            family = queued if key == State.QUEUED.value else quarantined
            family.add_metric([name], count)
        yield queued
        yield quarantined

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "intake_queue_depth", "Uploads waiting for the private Orthanc", labels=["site"]
            ),
            GaugeMetricFamily(
                "intake_quarantined", "Uploads kept in quarantine for an admin", labels=["site"]
            ),
        )


class Metrics:
    """The service's metrics; the pipeline and the forwarder call its ``record_*`` verbs."""

    def __init__(self, sessions: sessionmaker[Session] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._sessions = sessions
        self._site_names: dict[int, str] = {}
        self._uploads = Counter(
            "intake_uploads",
            "Uploads by outcome (accepted, duplicate, conflict, rejected) and refusal reason",
            ["site", "outcome", "reason"],
            registry=self.registry,
        )
        self._bytes = Counter(
            "intake_received_bytes",
            "Bytes of uploads stored in the spool, whatever became of them",
            ["site"],
            registry=self.registry,
        )
        self._handling = Histogram(
            "intake_upload_handling_seconds",
            "Time from an upload's first header to its answer",
            ["site"],
            buckets=_HANDLING_BUCKETS,
            registry=self.registry,
        )
        self._forwards = Counter(
            "intake_forwards",
            "Forward attempts by result (forwarded, retry, quarantined) and reason",
            ["site", "result", "reason"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "intake_forward_latency_seconds",
            "Time from an upload being received to it being stored in the private Orthanc",
            ["site"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        if sessions is not None:
            self.registry.register(_QueueCollector(sessions))

    def render(self) -> bytes:
        """The Prometheus text exposition; reads the database (run it off the event loop)."""
        return generate_latest(self.registry)

    def record_bytes(self, site: str, byte_size: int) -> None:
        self._bytes.labels(site).inc(byte_size)

    def record_upload(self, site: str, state: State, seconds: float) -> None:
        self._uploads.labels(site, _OUTCOMES.get(state, state.value), "").inc()
        self._handling.labels(site).observe(seconds)

    def record_refusal(self, site: str, reason: str, seconds: float) -> None:
        self._uploads.labels(site, "rejected", reason).inc()
        self._handling.labels(site).observe(seconds)

    def record_forwarded(self, site_id: int, received_at: datetime, forwarded_at: datetime) -> None:
        latency = max(0.0, (forwarded_at - received_at).total_seconds())
        self.count_forward(self._site_name(site_id), "forwarded", "", latency)

    def record_retry(self, site_id: int, reason: str) -> None:
        self.count_forward(self._site_name(site_id), "retry", reason)

    def record_quarantine(self, site_id: int, reason: str) -> None:
        self.count_forward(self._site_name(site_id), "quarantined", reason)

    def count_forward(
        self, site: str, result: str, reason: str, latency: float | None = None
    ) -> None:
        """One forward attempt's result; the forwarder's own process sends these here."""
        self._forwards.labels(site, result, reason).inc()
        if latency is not None:
            self._latency.labels(site).observe(latency)

    def _site_name(self, site_id: int) -> str:
        """Site names never change, so they are looked up once per process."""
        name = self._site_names.get(site_id)
        if name is not None or self._sessions is None:
            return name or _UNKNOWN_SITE
        try:
            with self._sessions() as session:
                # Rows are tuples; .tuples() is deprecated since SQLAlchemy 2.1.
                self._site_names.update(session.execute(select(Site.id, Site.name)).all())
        except Exception as exc:  # a metric never fails a forward
            log.warning("metrics: could not look up site names: %s", exc)
        return self._site_names.get(site_id, _UNKNOWN_SITE)
