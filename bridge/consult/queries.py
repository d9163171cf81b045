"""Reading this node's consultations (queues, one thread, statistics) and the reminder job:
the part of :class:`bridge.consult.workflow.ConsultWorkflow` that takes no step."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, select, update

from bridge.audit.events import AuditEntry
from bridge.config.models import NodePlan
from bridge.consult.states import INVITER, WAITING
from bridge.consult.tables import CONSULTATION, CONSULTATION_STEP
from bridge.context import NodeContext
from bridge.errors import NotFound
from bridge.fhirstore import store


class ConsultQueries:
    ctx: NodeContext
    plan: NodePlan

    # -- reading --------------------------------------------------------------------------------

    def _row(self, conn: Connection, thread: str) -> Any:
        row = conn.execute(select(CONSULTATION).where(CONSULTATION.c.thread == thread)).first()
        if row is None:
            raise NotFound(f"no consultation {thread}")
        return row

    def _row_by_task(self, conn: Connection, task_id: str) -> Any:
        row = conn.execute(select(CONSULTATION).where(CONSULTATION.c.task_id == task_id)).first()
        if row is None:
            raise NotFound(f"Task/{task_id} is not a consultation known here")
        return row

    def by_task(self, task_id: str) -> dict[str, Any] | None:
        """This side's consultation row for a Task id, or None (not a consultation)."""
        with self.ctx.store.read() as conn:
            row = conn.execute(
                select(CONSULTATION).where(CONSULTATION.c.task_id == task_id)
            ).first()
        return dict(row._mapping) if row is not None else None

    def by_service_request(self, conn: Connection, sr_id: str) -> Any | None:
        return conn.execute(select(CONSULTATION).where(CONSULTATION.c.sr_id == sr_id)).first()

    def view(self, thread: str) -> dict[str, Any] | None:
        """This side's consultation row, its steps and every FHIR resource of the thread."""
        with self.ctx.store.read() as conn:
            return self._view(conn, thread)

    def _view(self, conn: Connection, thread: str) -> dict[str, Any] | None:
        row = conn.execute(select(CONSULTATION).where(CONSULTATION.c.thread == thread)).first()
        if row is None:
            return None
        steps = [
            dict(s._mapping)
            for s in conn.execute(
                select(CONSULTATION_STEP)
                .where(CONSULTATION_STEP.c.thread == thread)
                .order_by(CONSULTATION_STEP.c.id)
            )
        ]
        return {
            "consultation": dict(row._mapping),
            "steps": steps,
            "resources": store.by_thread(conn, thread),
        }

    def list(
        self, *, step: str | None = None, status: str | None = None, side: str | None = None
    ) -> list[dict[str, Any]]:
        """Every consultation on this side, the latest change first (the centre's queue:
        ``side="centre"``), for tests and scripts: no cap, so nothing is left out silently.
        Pages and the API count and page instead (``/local/v1/consultations``,
        ``bridge/web/consult_list.py``), in the same order."""
        stmt = select(CONSULTATION).order_by(
            CONSULTATION.c.updated_at.desc(), CONSULTATION.c.thread.desc()
        )
        if step:
            stmt = stmt.where(CONSULTATION.c.step == step)
        if status:
            stmt = stmt.where(CONSULTATION.c.status == status)
        if side:
            stmt = stmt.where(CONSULTATION.c.side == side)
        with self.ctx.store.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def stats(self, year: int) -> dict[tuple[str, str], Any]:
        """Figures per (month, inviting member) for one year (``bridge/consult/stats.py``)."""
        from bridge.consult.stats import compute

        with self.ctx.store.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(CONSULTATION))]
        return compute(rows, year)

    def overdue(self) -> int:
        """Consultations reminded about and still waiting at the same step (alerts)."""
        with self.ctx.store.read() as conn:
            rows = conn.execute(
                select(CONSULTATION.c.reminded_at, CONSULTATION.c.step_at).where(
                    CONSULTATION.c.step.in_(WAITING), CONSULTATION.c.reminded_at.is_not(None)
                )
            ).all()
        return sum(1 for r in rows if r.reminded_at >= r.step_at)

    # -- reminders ----------------------------------------------------------------------------

    def remind(self) -> int:
        """Consultations waiting at a step past ``[consult] wait_timeout_s`` (urgent ones past
        ``urgent_timeout_s``): flagged once per step, audited (action ``reminder``) and counted
        by the ``consult-overdue`` alert. A job every ``reminder_every_s``."""
        cfg = self.plan.consult
        now = self.ctx.now()
        with self.ctx.store.write() as conn:
            rows = conn.execute(select(CONSULTATION).where(CONSULTATION.c.step.in_(WAITING))).all()
            due = [
                r
                for r in rows
                if (r.reminded_at is None or r.reminded_at < r.step_at)
                and now - r.step_at
                > timedelta(
                    seconds=cfg.urgent_timeout_s
                    if r.priority in ("urgent", "asap", "stat")
                    else cfg.wait_timeout_s
                )
            ]
            for r in due:
                conn.execute(
                    update(CONSULTATION)
                    .where(CONSULTATION.c.thread == r.thread)
                    .values(reminded_at=now)
                )
            if due:
                self.ctx.audit.append(
                    conn,
                    [
                        AuditEntry(
                            action="reminder",
                            outcome="4",
                            thread=r.thread,
                            patient_hash=r.patient_hash,
                            peer=r.centre if r.side == INVITER else r.inviter,
                            at=now,
                            message=f"consultation waiting at '{r.step}' for "
                            f"{int((now - r.step_at).total_seconds() // 60)} min",
                            extra={"step": r.step},
                        )
                        for r in due
                    ],
                )
        return len(due)
