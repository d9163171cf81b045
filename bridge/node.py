"""A running node: two ports (peer-facing gateway, hospital-facing local API) and the jobs.

Jobs (APScheduler, one thread each at most): ``send:<peer>`` per next hop, ``deliver``,
``results-journal`` (lab messages acknowledged, expanded into the FHIR store after),
``retention``, ``checkpoint``, ``heap-trim`` (``bridge/memory.py``), ``config-watch``; a
platform also ``receipts`` (the end-to-end receipts it returns to every member, one commit a
round). Work that arrives (a queued packet, a received batch) wakes the right job at once; the
interval is only the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import text

from bridge import faults
from bridge.audit.events import AuditEntry
from bridge.audit.watch import ChainWatch
from bridge.config.models import NodePlan
from bridge.consult.workflow import ConsultWorkflow
from bridge.context import NodeContext
from bridge.delivery.dispatcher import BatchHook, Dispatcher
from bridge.delivery.handlers import load_handlers
from bridge.delivery.lanes import Lanes
from bridge.delivery.receipts import ReceiptReturn
from bridge.delivery.retention import purge_bodies
from bridge.delivery.sender import PeerSender
from bridge.delivery.wakeups import Wakeups
from bridge.gateway.app import create_gateway
from bridge.gateway.intake import Intake
from bridge.local.registry import load_adapters, receivers
from bridge.memory import TRIM_EVERY_S, trim_heap
from bridge.referral.workflow import Workflow
from bridge.results.attach import imaging_events, to_imaging_sinks
from bridge.results.inbox import ResultsInbox
from bridge.results.journal import Journal
from bridge.startup import check_anchor
from bridge.store import state

log = logging.getLogger("hutong.node")
#: the interpreter's thread switch interval in a running node (Python's default 5 ms): a
#: thread back from SQLite, a socket or a lock waits up to this long for a thread running
#: Python (an LIS connection's handler converting a message) to give up the GIL, and the
#: node's threads do that several times a message (bench/README.md, ``lis.py``)
SWITCH_INTERVAL_S = 0.001
#: PostgreSQL, several hops: how often a send job runs when nothing woke it (``add_send_jobs``)
SEND_SAFETY_S = 10.0
#: the hops with packets waiting to be sent (not the receipts job's rows): one probe of
#: ``ix_outbox_due`` per hop, in one statement
_DUE_HOPS = text(
    "SELECT h FROM unnest(CAST(:hops AS text[])) AS h WHERE EXISTS (SELECT 1 FROM outbox o "
    "WHERE o.next_hop = h AND o.state = 'queued' AND o.origin <> 'receipt')"
)


class _Drain:
    """A job body that repeats its step while there is work, and can be woken early.

    A wake while it runs only marks it dirty (:meth:`wake`): it goes round again before it
    leaves, so the scheduler is asked to run it only when it is idle. Asking it on every wake
    (the LIS stages a message every few ms) cost the intake thread a ``modify_job`` each and
    the scheduler a skipped run ("maximum number of running instances reached") each."""

    def __init__(self, step: Any) -> None:
        self.step = step
        self.dirty = threading.Event()
        self.stopping = False
        self.running = False
        self._lock = threading.Lock()

    def wake(self) -> bool:
        """Marks it dirty; True if it is idle (the caller asks the scheduler to run it)."""
        self.dirty.set()
        with self._lock:
            return not self.running

    def __call__(self) -> None:
        with self._lock:
            self.running = True
        while not self.stopping:
            self.dirty.clear()
            try:
                moved, failed = self.step()
            except Exception:  # a job must never die; the error is in the outbox row / log
                log.exception("job step failed")
                failed, moved = True, 0
            if failed:  # the next round (its interval, or a wake) tries again
                break
            if moved == 0 and not self.dirty.is_set():
                with self._lock:  # a wake from here on finds it idle and asks the scheduler
                    if not self.dirty.is_set():
                        self.running = False
                        return
        with self._lock:
            self.running = False


class Node:
    def __init__(self, plan: NodePlan) -> None:
        self.plan = plan
        self.ctx = NodeContext.open(plan)
        check_anchor(self.ctx)  # a store younger than its audit anchor does not start
        faults.install(self.ctx)
        self.chain_watch = ChainWatch(
            self.ctx,
            lambda conn: [*plan.me.signing_keys, *own_signing_keys(conn)],
            plan.alerts.chain_every_s,
        )
        # PostgreSQL: several processes may share this store (hutong worker); see lanes.py
        self.lanes = None if self.ctx.store.is_sqlite else Lanes(plan.storage_dsn)
        self.intake = Intake(self.ctx)
        self.workflow = Workflow(self.ctx, wake=self.wake_all_senders)
        self.consult = ConsultWorkflow(self.ctx, wake=self.wake_all_senders)
        self._jobs: list[tuple[str, Any, float]] = []
        from bridge.console import Pauses

        self.pauses = Pauses(self.ctx)  # IT's pause of a peer's sending or of an adapter
        #: lab messages acknowledged, not yet in the FHIR store (bridge/results/journal.py)
        self.journal = Journal(
            self.ctx,
            bound=plan.limits.max_results_journal,
            wait_s=plan.limits.results_journal_wait_s,
            on_routed=self.wake_all_senders,
        )
        self.journal.wake = lambda: self.wake("results-journal")
        self.adapters = load_adapters(self)
        self.results = ResultsInbox(self.ctx)
        handlers: dict[str, Any] = load_handlers(
            dict(plan.delivery.handlers), {"spool_dir": plan.delivery.spool_dir}
        )
        handlers.update(receivers(self, self.adapters))
        self.dispatcher = Dispatcher(
            self.ctx,
            handlers,
            hooks={
                "referral.": self.workflow.apply_packet,
                "consult.": self._apply_consult,
                "result.": BatchHook(self.results.apply_many, self._after_result),
            },
            lanes=self.lanes,
        )
        self.dispatcher.held = lambda h: any(  # a paused adapter receives nothing meanwhile
            a is h and self.pauses.has(f"adapter:{n}") for n, a in self.adapters.items()
        )
        me = plan.directory[plan.node_id]
        if me.role == "platform" or not me.via:
            hops = [m for m in plan.directory if m != plan.node_id]
        else:
            hops = [me.via]
        self.senders = {peer: PeerSender(self.ctx, peer, self.lanes) for peer in hops}
        #: a platform returns the recipients' receipts to every member in one round
        self.receipts = (
            ReceiptReturn(
                self.ctx, hops, self.lanes, paused=lambda hop: self.pauses.has(f"peer:{hop}")
            )
            if me.role == "platform"
            else None
        )
        # a platform wakes only the senders of the hops a batch was relayed to, not all of them
        self.intake.on_relayed = self._wake_hops
        self.drains: dict[str, _Drain] = {}
        #: PostgreSQL: wake-ups to and from the node's other processes (hutong worker)
        self.wakeups = None if self.lanes is None else Wakeups(plan.storage_dsn, on_wake=self.wake)
        if self.wakeups is not None:
            self.wakeups.start()
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(len(hops) + 8 + len(self.adapters))},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        logging.getLogger("apscheduler").setLevel(logging.ERROR)

    def _after_result(self, item: Any, ev: Any) -> Any:
        """After the inbox stored a ``result.*`` packet (with the round's others, a few a commit):
        an imaging report also goes to the adapters that keep reports with their studies (the
        PACS)."""
        if item.kind == "result.imaging":
            to_imaging_sinks(
                self.adapters,
                imaging_events(
                    ev.bundle,
                    key=item.packet_id,
                    sender=item.sender,
                    thread=item.thread,
                    patient=ev.patient,
                    party=ev.view is not None,
                ),
            )  # the inbox checked the party
        return ev

    def _apply_consult(self, item: Any) -> Any:
        """The dispatcher hook of ``consult.*``: the workflow applies the step (its party
        check first); a released imaging reading (``consult.report`` at the inviting side)
        then also goes to the adapters that keep reports with their studies (the PACS that
        holds the study), as a ``result.imaging`` report does. The packet's Bundle is read, not
        the thread's stored resources: the study the report names may be our own PACS record
        outside the thread, which travels back with the report but is not stored again."""
        ev = self.consult.apply_packet(item)
        if item.kind == "consult.report" and ev.side == "inviter":
            row = ev.view["consultation"]
            task: dict[str, Any] = next(
                (
                    r
                    for r in ev.view["resources"]
                    if r["resourceType"] == "Task" and r["id"] == row["task_id"]
                ),
                {},
            )
            to_imaging_sinks(
                self.adapters,
                imaging_events(
                    orjson.loads(item.body),
                    key=item.packet_id,
                    sender=item.sender,
                    thread=item.thread,
                    patient=(task.get("for") or {}).get("reference"),
                    party=row["centre"] == item.sender,
                ),
            )  # the workflow checked the party
        return ev

    # -- jobs ---------------------------------------------------------------------------------

    def _add_drain(self, job_id: str, step: Any, every: float) -> None:
        drain = _Drain(step)
        self.drains[job_id] = drain
        self.scheduler.add_job(
            drain, "interval", seconds=every, id=job_id, next_run_time=datetime.now(UTC)
        )

    def wake(self, job_id: str) -> None:
        drain = self.drains.get(job_id)
        if drain is None:
            return
        if not drain.wake():
            return  # running: it goes round again before it leaves
        try:
            self.scheduler.modify_job(job_id, next_run_time=datetime.now(UTC))
        except Exception:  # noqa: BLE001, S110 - scheduler shutting down; a wake-up is a hint
            pass

    def wake_everywhere(self, jobs: set[str]) -> None:
        """Wake ``jobs`` here and, when other processes work this node's jobs, in them too
        (``wakeups.py``): the work may be in a lane another process holds."""
        for job in jobs:
            self.wake(job)
        if self.wakeups is not None and self.lanes is not None and not self.lanes.alone():
            self.wakeups.notify(jobs)

    def wake_all_senders(self) -> None:
        for peer in self.senders:
            self.wake(f"send:{peer}")

    def _wake_hops(self, next_hops: set[str]) -> None:
        """A platform wakes only the senders of the hops a batch was relayed to."""
        self.wake_everywhere({f"send:{hop}" for hop in next_hops})

    def add_send_jobs(self) -> None:
        """A send job per hop (``hutong run`` and ``hutong worker``). On SQLite each polls
        its hop's queue every ``poll_interval_s``. On PostgreSQL one read a round
        (``_poll_senders``) finds the hops with packets queued and wakes only their jobs:
        a platform's 50 members each polled by every process of the node, twice a second
        whether or not anything waited, cost more reads than the relaying itself; a job's
        own interval is then only a safety net."""
        cfg = self.plan.delivery
        every = cfg.poll_interval_s
        if self.lanes is not None and len(self.senders) > 1:
            every = max(every, SEND_SAFETY_S)
            self.scheduler.add_job(
                self._poll_senders,
                "interval",
                id="send-poll",
                seconds=cfg.poll_interval_s,
                next_run_time=datetime.now(UTC),
            )
        for peer, sender in self.senders.items():

            def step(s: PeerSender = sender, p: str = peer) -> tuple[int, bool]:
                if self.pauses.has(f"peer:{p}"):  # paused by IT: packets stay queued
                    return 0, False
                report = s.send_batch()
                if report.sent and self.receipts is not None:
                    self.wake_everywhere({"receipts"})  # relayed packets' receipts, maybe
                # k > 1 partitions: keep draining while some partition got through
                return report.sent, report.failed > 0 and report.sent == 0

            self._add_drain(f"send:{peer}", step, every)

    def _poll_senders(self) -> None:
        """Wake the send jobs of the hops with packets queued (one statement for all)."""
        try:
            with self.ctx.store.read() as conn:
                due = conn.execute(_DUE_HOPS, {"hops": sorted(self.senders)}).scalars().all()
        except Exception:  # a poll; the jobs' own interval is the safety net
            log.exception("send poll failed")
            return
        for hop in due:
            self.wake(f"send:{hop}")

    def start_jobs(self) -> None:
        cfg = self.plan.delivery
        self.add_send_jobs()
        self.add_receipts_job()
        self._add_drain("deliver", lambda: (self.dispatcher.run_once(), False), cfg.poll_interval_s)
        # resumes the journal left by a stop or a crash at once (its first run is immediate)
        self._add_drain("results-journal", self.journal.run_once, cfg.poll_interval_s)
        self.scheduler.add_job(
            self._retention, "interval", id="retention", seconds=self.plan.retention.run_every_s
        )
        self.scheduler.add_job(self._checkpoint, "interval", id="checkpoint", seconds=60)
        self.scheduler.add_job(trim_heap, "interval", id="heap-trim", seconds=TRIM_EVERY_S)
        self.scheduler.add_job(
            self.workflow.remind,
            "interval",
            id="referral-reminders",
            seconds=self.plan.referral.reminder_every_s,
        )
        self.scheduler.add_job(
            self.consult.remind,
            "interval",
            id="consult-reminders",
            seconds=self.plan.consult.reminder_every_s,
        )
        self.scheduler.add_job(self._watch_config, "interval", id="config-watch", seconds=10)
        for adapter in self.adapters.values():
            adapter.start()
        for job_id, func, every in self._jobs:
            self.scheduler.add_job(
                func, "interval", id=job_id, seconds=every, next_run_time=datetime.now(UTC)
            )
        self.scheduler.start()

    def add_receipts_job(self) -> None:
        """A platform's ``receipts`` job (also run by its ``hutong worker`` processes)."""
        if self.receipts is None:
            return
        receipts = self.receipts

        def step() -> tuple[int, bool]:
            report = receipts.run_once()
            return report.sent, report.failed > 0 and report.sent == 0

        self._add_drain("receipts", step, self.plan.delivery.poll_interval_s)

    def add_job(self, job_id: str, func: Any, every: float) -> None:
        """An adapter's periodic job (registered before or after the scheduler starts)."""
        if self.scheduler.running:
            self.scheduler.add_job(
                func,
                "interval",
                id=job_id,
                seconds=every,
                next_run_time=datetime.now(UTC),
                replace_existing=True,
            )
        else:
            self._jobs.append((job_id, func, every))

    def _retention(self) -> None:
        purge_bodies(self.ctx)

    def _checkpoint(self) -> None:
        with self.ctx.store.write() as conn:
            self.ctx.audit.checkpoint(conn)

    def _watch_config(self) -> None:
        """The running plan is immutable; a file edited on disk is audited so it is seen."""
        from bridge.config.loader import files_hash

        on_disk = files_hash(self.plan.source_files)
        with self.ctx.store.write() as conn:
            known = state.get(conn, "config_files_hash")
            if known != on_disk:
                state.put(conn, "config_files_hash", on_disk, self.ctx.now())
                if known is not None:
                    self.ctx.audit.append(
                        conn,
                        [
                            AuditEntry(
                                action="config",
                                outcome="4",
                                at=self.ctx.now(),
                                message="config files changed on disk; restart to apply",
                                extra={"files_hash": on_disk},
                            )
                        ],
                    )

    def record_start(self) -> None:
        with self.ctx.store.write() as conn:
            remember_own_key(conn, self.ctx)
            previous = state.get(conn, "config_hash")
            state.put(conn, "config_hash", self.plan.config_hash, self.ctx.now())
            self.ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="config",
                        at=self.ctx.now(),
                        actor=self.plan.node_id,
                        message="node started"
                        + (
                            ""
                            if previous in (None, self.plan.config_hash)
                            else "; config changed since last start"
                        ),
                        extra={"config_hash": self.plan.config_hash, "previous": previous},
                    )
                ],
            )

    # -- servers ------------------------------------------------------------------------------

    def apps(self) -> tuple[Any, Any]:
        from bridge.api.local_app import create_local_app

        def received() -> None:
            self.wake_everywhere({"deliver"})

        gateway = create_gateway(self.ctx, self.intake, on_received=received)
        from bridge.web.security import SecurityHeaders

        gateway.add_middleware(SecurityHeaders)  # nosniff, DENY, API policy on peer answers
        local = create_local_app(self)
        return gateway, local

    def run(self) -> None:
        import sys

        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.record_start()
        _warm_up()
        gateway, local = self.apps()
        servers = [
            uvicorn.Server(
                uvicorn.Config(
                    gateway,
                    host=self.plan.peer_host,
                    port=self.plan.peer_port,
                    log_level="warning",
                    access_log=False,
                    **port_guards(self.plan),
                )
            ),
            uvicorn.Server(
                uvicorn.Config(
                    local,
                    host=self.plan.local_host,
                    port=self.plan.local_port,
                    log_level="warning",
                    access_log=False,
                    **port_guards(self.plan),
                )
            ),
        ]
        # main() below owns SIGINT/SIGTERM for both servers; uvicorn (>= 0.29) would otherwise
        # take them in serve() (its install_signal_handlers, overridden here before, is gone)
        for s in servers:
            s.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        self.start_jobs()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            tasks = [asyncio.create_task(s.serve()) for s in servers]
            await stop.wait()
            for s in servers:
                s.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run(main())
        finally:
            self.close()

    def close(self) -> None:
        for drain in self.drains.values():
            drain.stopping = True
        for adapter in self.adapters.values():
            try:
                adapter.stop()
            except Exception:
                log.exception("adapter stop failed")
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        try:
            self._checkpoint()
        except Exception:
            log.exception("final checkpoint failed")
        for sender in self.senders.values():
            sender.close()
        if self.receipts is not None:
            self.receipts.close()
        if self.wakeups is not None:
            self.wakeups.close()
        if self.lanes is not None:
            self.lanes.close()
        self.ctx.store.dispose()


def _warm_up() -> None:
    """Compile the R4 schema (~170 ms once) and configure the ORM's mappers (~200 ms once, at
    the first ORM object, e.g. the sender's first audit checkpoint) before the first packet,
    not during it."""
    from sqlalchemy.orm import configure_mappers

    from bridge.fhir.validate import validate_resource

    configure_mappers()

    for r in (
        {"resourceType": "Bundle", "type": "collection"},
        {"resourceType": "Patient"},
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
    ):
        validate_resource(r)


def remember_own_key(conn: Any, ctx: NodeContext) -> None:
    """Keep every signing public key this node has used, so its own audit checkpoints still
    verify after a key rollover removes the old key from the alliance directory."""
    import json

    from bridge.crypto.keys import public_text

    known = json.loads(state.get(conn, "own_signing_keys") or "[]")
    mine = public_text(ctx.signing_key)
    if mine not in known:
        state.put(conn, "own_signing_keys", json.dumps([*known, mine]), ctx.now())


def own_signing_keys(conn: Any) -> list[Any]:
    import json

    from bridge.crypto.keys import parse_public_key

    return [parse_public_key(t) for t in json.loads(state.get(conn, "own_signing_keys") or "[]")]


def port_guards(plan: NodePlan) -> dict[str, Any]:
    """uvicorn settings of both ports from ``[limits]``: head and body deadlines (slowloris),
    idle keep-alive, largest request head, open connections; no WebSocket upgrades."""
    from bridge.gateway.guard import guarded_protocol

    limits = plan.limits
    return {
        "http": guarded_protocol(limits.header_timeout_s, limits.body_timeout_s),
        "ws": "none",
        "timeout_keep_alive": limits.keep_alive_s,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        "limit_concurrency": limits.max_connections,
    }
