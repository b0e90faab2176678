"""Prometheus metrics: Deckhouse's per-image progress gauges and our transfer counters."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from importer.progress import Progress

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["ownerUID"]
        self.progress = Gauge(
            "registry_progress", "Progress of the transfer, percent", labels, registry=self.registry
        )
        self.average_speed = Gauge(
            "registry_average_speed",
            "Average speed of the transfer, bytes per second",
            labels,
            registry=self.registry,
        )
        self.current_speed = Gauge(
            "registry_current_speed",
            "Current speed of the transfer, bytes per second",
            labels,
            registry=self.registry,
        )
        self.received_bytes = Counter(
            "dvcr_received_bytes", "Bytes received from senders and sources", registry=self.registry
        )
        self.written_bytes = Counter(
            "dvcr_written_bytes", "Bytes written to storage", registry=self.registry
        )
        self.transfers = Counter(
            "dvcr_transfers", "Finished transfers by result", ["result"], registry=self.registry
        )
        self.active_transfers = Gauge(
            "dvcr_active_transfers", "Transfers in progress", registry=self.registry
        )

    def report(self, uid: str, progress: Progress) -> None:
        fraction = progress.fraction
        if fraction is not None:
            self.progress.labels(uid).set(round(fraction * 100, 1))
        self.average_speed.labels(uid).set(progress.average_speed())
        self.current_speed.labels(uid).set(progress.current_speed())

    def forget(self, uid: str) -> None:
        for gauge in (self.progress, self.average_speed, self.current_speed):
            with contextlib.suppress(KeyError):
                gauge.remove(uid)

    def render(self) -> bytes:
        return generate_latest(self.registry)
