"""``GET /metrics`` on the local port: the dashboard's numbers for Prometheus (and Grafana).

Read at scrape time from the node's tables (``bridge.console.snapshot``) and the alerter, so
the figures survive restarts and match the IT page. Access: the IT bearer token, or the token
of ``[metrics] token`` (a secret reference) so the Prometheus server needs no IT rights. The
Grafana dashboard over these series is ``docs/it/grafana-hutong.json``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bridge.console import snapshot
from bridge.errors import Unauthorized

if TYPE_CHECKING:
    from bridge.alerts import Alerter
    from bridge.node import Node


class NodeCollector:
    """One scrape = one snapshot of the store; nothing is counted in process memory."""

    def __init__(self, node: Node, alerter: Alerter | None) -> None:
        self.node = node
        self.alerter = alerter

    def collect(self) -> Iterator[Metric]:
        snap = snapshot(self.node)
        node_id = self.node.plan.node_id
        windows = (("1h", "hour"), ("24h", "day"))
        for what, helptext in (
            ("received", "packets received from the peer"),
            ("sent", "packets acknowledged by the peer"),
            ("failed", "packets dead, refused or failed"),
            ("quarantined", "items quarantined"),
        ):
            g = GaugeMetricFamily(
                f"hutong_peer_{what}_window",
                f"{helptext}, in the last hour/day",
                labels=["node", "peer", "window"],
            )
            for ch in snap.peers:
                for w, _ in windows:
                    g.add_metric([node_id, ch.name, w], getattr(ch, what)[w])
            yield g
        g = GaugeMetricFamily(
            "hutong_peer_queued", "packets waiting for the peer now", labels=["node", "peer"]
        )
        age = GaugeMetricFamily(
            "hutong_peer_oldest_waiting_seconds",
            "age of the oldest packet waiting for the peer (0: none)",
            labels=["node", "peer"],
        )
        paused = GaugeMetricFamily(
            "hutong_paused", "1 while IT has paused this channel", labels=["node", "kind", "name"]
        )
        for ch in snap.peers:
            g.add_metric([node_id, ch.name], ch.queued)
            age.add_metric([node_id, ch.name], ch.oldest_waiting_s or 0.0)
            paused.add_metric([node_id, "peer", ch.name], 1 if ch.paused else 0)
        for ch in snap.adapters:
            paused.add_metric([node_id, "adapter", ch.name], 1 if ch.paused else 0)
        yield g
        yield age
        yield paused
        for what, helptext in (
            ("received", ("packets an adapter handed on (from the local system)")),
            ("sent", "packets delivered to an adapter (to the local system)"),
            ("failed", "deliveries to an adapter that failed"),
        ):
            g = GaugeMetricFamily(
                f"hutong_adapter_{what}_window",
                f"{helptext}, in the last hour/day",
                labels=["node", "adapter", "window"],
            )
            for ch in snap.adapters:
                for w, _ in windows:
                    g.add_metric([node_id, ch.name, w], getattr(ch, what)[w])
            yield g
        g = GaugeMetricFamily(
            "hutong_adapter_queued",
            "received packets waiting for delivery to the adapter",
            labels=["node", "adapter"],
        )
        for ch in snap.adapters:
            g.add_metric([node_id, ch.name], ch.queued)
        yield g
        q = GaugeMetricFamily(
            "hutong_adapter_quarantined_window",
            "items an adapter quarantined in the last hour/day",
            labels=["node", "adapter", "window"],
        )
        c = CounterMetricFamily(
            "hutong_adapter_events",
            "an adapter's own counters since the node started",
            labels=["node", "adapter", "event"],
        )
        for ch in snap.adapters:
            for w, _ in windows:
                q.add_metric([node_id, ch.name, w], ch.quarantined[w])
            for event, n in sorted(ch.counters.items()):
                c.add_metric([node_id, ch.name, event], n)
        yield q
        yield c
        t = GaugeMetricFamily(
            "hutong_store_items",
            "rows by table and state (outbox per peer, quarantine per source)",
            labels=["node", "table", "subject", "state"],
        )
        for key, n in sorted(snap.totals.items()):
            parts = key.split(":")
            if parts[0] == "inbox":
                t.add_metric([node_id, "inbox", "", parts[1]], n)
            else:
                t.add_metric([node_id, parts[0], ":".join(parts[1:-1]), parts[-1]], n)
        yield t
        bound = GaugeMetricFamily(
            "hutong_inbox_backlog_limit",
            "received packets waiting for local delivery at which the peer port refuses new "
            "batches (HT-PKT-BACKLOG); 0: no bound",
            labels=["node"],
        )
        bound.add_metric([node_id], self.node.plan.limits.max_inbox_backlog)
        yield bound
        journal = GaugeMetricFamily(
            "hutong_results_journal",
            "lab messages acknowledged (AA) and not yet in the FHIR store, by state: waiting "
            "(the expansion's backlog), failed (kept and quarantined, IT replays them)",
            labels=["node", "state"],
        )
        journal.add_metric([node_id, "waiting"], snap.journal_waiting)
        journal.add_metric([node_id, "failed"], snap.journal_failed)
        yield journal
        g = GaugeMetricFamily(
            "hutong_results_journal_oldest_seconds",
            "age of the oldest lab message waiting to be stored in the FHIR store (0: none)",
            labels=["node"],
        )
        g.add_metric([node_id], snap.journal_oldest_s or 0.0)
        yield g
        g = GaugeMetricFamily(
            "hutong_results_journal_limit",
            "waiting lab messages at which new ones are answered AE (resend later); 0: no bound",
            labels=["node"],
        )
        g.add_metric([node_id], self.node.plan.limits.max_results_journal)
        yield g
        if self.alerter is not None:
            a = GaugeMetricFamily(
                "hutong_alert_active",
                "1 per alert raised and not cleared",
                labels=["node", "rule", "subject"],
            )
            for alert in self.alerter.active().values():
                a.add_metric([node_id, alert["rule"], str(alert["subject"])], 1)
            yield a
        up = GaugeMetricFamily(
            "hutong_node_info", "1; the node's id and role", labels=["node", "role"]
        )
        up.add_metric([node_id, str(self.node.plan.role)], 1)
        yield up


def _token_ok(request: Request, tokens: list[str]) -> None:
    header = request.headers.get("authorization") or ""
    if not header.lower().startswith("bearer "):
        raise Unauthorized("a bearer token is required")
    given = header[7:].strip().encode()
    if not any(hmac.compare_digest(given, t.encode()) for t in tokens if t):
        raise Unauthorized("unknown token")


def metrics_router(node: Node, alerter: Alerter | None = None) -> APIRouter:
    from bridge.config.secrets import resolve_secret

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node, alerter))
    tokens = [node.plan.tokens.get("it", "")]
    metrics_cfg: Any = getattr(node.plan, "metrics", None)
    if metrics_cfg is not None and metrics_cfg.token:
        tokens.append(resolve_secret(metrics_cfg.token, node.plan.source_files[1].parent).strip())
    router = APIRouter(include_in_schema=False)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        _token_ok(request, tokens)
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return router
