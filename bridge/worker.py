"""`hutong worker`: an extra process of a node that only sends and delivers.

A busy member adds workers instead of rewriting anything: every worker opens the same node file
and the same PostgreSQL store as the node's ``hutong run`` process, takes a fair share of the
lanes (``bridge/delivery/lanes.py``) and runs the ``send:<peer>`` and ``deliver`` jobs on it.
A worker has no ports, starts no adapter and runs no retention, checkpoint or reminder job;
those stay with the one ``hutong run`` process. When the node's adapters receive packets
(their sinks live in the ``hutong run`` process), workers send only.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from bridge.audit.events import AuditEntry
from bridge.config.models import NodePlan
from bridge.errors import ConfigError
from bridge.memory import TRIM_EVERY_S, trim_heap

log = logging.getLogger("hutong.worker")


def check_store(plan: NodePlan) -> None:
    if not plan.storage_dsn.startswith("postgresql"):
        raise ConfigError(
            f"hutong worker needs a PostgreSQL store: {plan.node_id} uses SQLite, which has one "
            "writer; run a single 'hutong run' process, or set storage_dsn to PostgreSQL"
        )


def run_worker(plan: NodePlan) -> None:
    """Run send (and deliver) jobs until SIGTERM or SIGINT."""
    check_store(plan)
    from bridge.node import Node

    node = Node(plan)
    delivers = not any(a.receives for a in plan.adapters)
    with node.ctx.store.write() as conn:
        node.ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action="config",
                    at=node.ctx.now(),
                    actor=plan.node_id,
                    message="worker started",
                    extra={"pid": os.getpid(), "delivers": delivers},
                )
            ],
        )
    cfg = plan.delivery
    node.add_send_jobs()
    node.add_receipts_job()  # a platform's returned receipts, for the lanes this worker holds
    if delivers:
        node._add_drain("deliver", lambda: (node.dispatcher.run_once(), False), cfg.poll_interval_s)
    node.scheduler.add_job(trim_heap, "interval", id="heap-trim", seconds=TRIM_EVERY_S)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.scheduler.start()
    try:
        stop.wait()
    finally:
        node.close()
