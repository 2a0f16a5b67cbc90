"""The dashboard's Prometheus series (`/metrics`): operators' labels per line and the access guards.

Label counts are read from Redis at scrape time (`LabelStore.counts`), so every dashboard replica
reports the same numbers and nothing is lost on restart. Every configured line is reported from the
first scrape (zeros), and the false-alarm ratio only once a line has a labelled alert: no NaN series.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.dashboard.store import DashboardStore
from pipeline.operators.labels import LABELS

log = logging.getLogger(__name__)

METRIC_NAMES = ("anoclip_alert_labels", "anoclip_alerts_acknowledged", "anoclip_confirmed_defects",
                "anoclip_false_alarm_ratio", "anoclip_dashboard_redis_up", "anoclip_dashboard_token_refusals_total",
                "anoclip_dashboard_rate_limited_total", "anoclip_dashboard_bad_host_total")
"""Every series name this collector can export (docs/operations.md, deploy/prometheus checks)."""


class MetricsSource(Protocol):
    """What the collector reads: the dashboard's store and its access-guard counters (`DashboardServer`)."""

    @property
    def store(self) -> DashboardStore: ...

    @property
    def refused(self) -> int: ...

    @property
    def limited(self) -> int: ...

    @property
    def bad_hosts(self) -> int: ...


class DashboardCollector(Collector):
    """Collects at scrape time from the server's store and counters."""

    def __init__(self, app: MetricsSource) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = GaugeMetricFamily("anoclip_alert_labels", "Alerts currently carrying each operator label",
                                   labels=["line", "label"])
        acked = GaugeMetricFamily("anoclip_alerts_acknowledged", "Alerts acknowledged by an operator", labels=["line"])
        defects = GaugeMetricFamily("anoclip_confirmed_defects", "Alerts confirmed as defects, by defect type",
                                    labels=["line", "defect_type"])
        ratio = GaugeMetricFamily("anoclip_false_alarm_ratio",
                                  "False alarms among alerts labelled confirmed or false alarm", labels=["line"])
        up = GaugeMetricFamily("anoclip_dashboard_redis_up", "1 if the dashboard could read Redis for this scrape")
        store = self.app.store
        try:
            for line in store.line_ids():
                c = store.labels.counts(line)
                for name in LABELS:
                    labels.add_metric([line, name], getattr(c, name))
                acked.add_metric([line], c.acknowledged)
                for kind, n in c.defect_types.items():
                    defects.add_metric([line, kind], n)
                if c.false_alarm_rate is not None:
                    ratio.add_metric([line], c.false_alarm_rate)
            up.add_metric([], 1)
        except (redis.RedisError, OSError) as e:
            log.debug("metrics: Redis unreachable: %s", e)
            up.add_metric([], 0)
        yield from (labels, acked, defects, ratio, up)
        yield CounterMetricFamily("anoclip_dashboard_token_refusals", "Requests refused for a wrong access token",
                                  value=self.app.refused)
        yield CounterMetricFamily("anoclip_dashboard_rate_limited", "Requests refused unchecked after too many "
                                  "wrong tokens from the client", value=self.app.limited)
        yield CounterMetricFamily("anoclip_dashboard_bad_host", "Requests refused for a Host header not allowed",
                                  value=self.app.bad_hosts)
