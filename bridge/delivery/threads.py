"""Who may speak on a thread, and in which order: the gate every received packet passes.

A thread's parties, on this node, are the members it addressed on the thread (its own packets'
recipients) or, for a thread a peer opened with its seq 1, that peer. The dispatcher takes a
packet only from a party - the header's sender, which the sender signed end to end; a platform
relays and stamps but never becomes the sender - and only when its seq is the next one due
from that party (each sender numbers its packets per thread and recipient from 1). A packet
ahead of its turn is *held* until the missing one arrives; a new packet whose turn has passed
is refused. So a member that read a thread id off a clear header cannot move another pair's
referral, and a huge seq cannot make later genuine packets look old (issue 13).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from bridge.errors import NotThreadParty, StaleSequence
from bridge.referral.tables import REFERRAL
from bridge.store.tables import INBOX, OUTBOX, THREAD_PARTY

TAKE, HOLD = "take", "hold"
_CHUNK = 500  # ids per IN (...) list


def _insert(conn: Connection) -> Any:
    return pg_insert if conn.dialect.name == "postgresql" else sqlite_insert


def open_threads(conn: Connection, me: str, pairs: Iterable[tuple[str, str]], at: datetime) -> None:
    """This node sends on these (thread, recipient) pairs: each recipient is a party of its
    thread from now on (an existing row, and its next seq, stays as it is)."""
    rows = [
        {"thread": t, "peer": p, "next_seq": 1, "opened_by": me, "at": at}
        for t, p in dict.fromkeys(pairs)
    ]
    for i in range(0, len(rows), _CHUNK):  # a multi-row VALUES: keep under parameter limits
        stmt = _insert(conn)(THREAD_PARTY).values(rows[i : i + _CHUNK])
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["thread", "peer"]))


class ThreadGate:
    """One dispatcher round's view of the threads in its batch (load, judge, taken, commit)."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.parties: dict[str, dict[str, int]] = {}  # thread -> {peer: next seq}
        self.opened: set[tuple[str, str]] = set()  # (thread, peer) opened in this round
        self.moved: set[tuple[str, str]] = set()  # (thread, peer) whose next seq advanced

    def load(self, conn: Connection, threads: Iterable[str]) -> None:
        wanted = sorted(set(threads))
        for i in range(0, len(wanted), _CHUNK):
            for r in conn.execute(
                select(THREAD_PARTY.c.thread, THREAD_PARTY.c.peer, THREAD_PARTY.c.next_seq).where(
                    THREAD_PARTY.c.thread.in_(wanted[i : i + _CHUNK])
                )
            ):
                self.parties.setdefault(r.thread, {})[r.peer] = r.next_seq
        missing = [t for t in wanted if t not in self.parties]
        if missing:
            self._legacy(conn, missing)

    def _legacy(self, conn: Connection, threads: list[str]) -> None:
        """Threads of a store older than this table: parties from the referral and from our
        own packets, the next seq from what was already taken from each."""
        found: dict[str, set[str]] = {}
        for i in range(0, len(threads), _CHUNK):
            part = threads[i : i + _CHUNK]
            for r in conn.execute(
                select(
                    REFERRAL.c.thread, REFERRAL.c.side, REFERRAL.c.referrer, REFERRAL.c.receiver
                ).where(REFERRAL.c.thread.in_(part))
            ):
                found.setdefault(r.thread, set()).add(
                    r.receiver if r.side == "referrer" else r.referrer
                )
            for r in conn.execute(
                select(OUTBOX.c.thread, OUTBOX.c.recipient)
                .distinct()
                .where(
                    OUTBOX.c.thread.in_(part),
                    OUTBOX.c.origin == "local",
                    OUTBOX.c.sender == self.me,
                )
            ):
                found.setdefault(r.thread, set()).add(r.recipient)
        for thread, peers in found.items():
            for peer in peers:
                last = conn.execute(
                    select(func.max(INBOX.c.seq)).where(
                        INBOX.c.thread == thread,
                        INBOX.c.sender == peer,
                        INBOX.c.state.in_(("delivered", "failed")),
                    )
                ).scalar()
                self.parties.setdefault(thread, {})[peer] = (last or 0) + 1
                self.opened.add((thread, peer))

    def copy(self) -> ThreadGate:
        """A scratch gate to walk a batch ahead of the round (the dispatcher's batched hooks);
        nothing it judges or takes reaches this one."""
        other = ThreadGate(self.me)
        other.parties = {t: dict(p) for t, p in self.parties.items()}
        other.opened, other.moved = set(self.opened), set(self.moved)
        return other

    def judge(self, r: Any) -> str:
        """TAKE or HOLD for an inbox row (thread, sender, seq); raises a ThreadRefused."""
        parties = self.parties.get(r.thread)
        if parties is None:  # a thread new here: its first packet (seq 1) opens it
            if r.seq != 1:
                return HOLD
            parties = self.parties[r.thread] = {r.sender: 1}
            self.opened.add((r.thread, r.sender))
        due = parties.get(r.sender)
        if due is None:
            raise NotThreadParty(
                f"packet on thread {r.thread} from '{r.sender}', which is not "
                f"a party of that thread here"
            )
        if r.seq < due:
            raise StaleSequence(
                f"packet on thread {r.thread} from '{r.sender}' has seq "
                f"{r.seq}; that turn has passed (next due: {due})"
            )
        return HOLD if r.seq > due else TAKE

    def due(self, r: Any) -> int:
        return (self.parties.get(r.thread) or {}).get(r.sender, 1)

    def taken(self, r: Any) -> None:
        """The packet's turn is used (applied, or refused for good): the next one is due."""
        self.parties.setdefault(r.thread, {})[r.sender] = r.seq + 1
        self.moved.add((r.thread, r.sender))

    def forget(self, r: Any) -> None:
        """A thread opened by this round's packet that was not taken after all (transient
        failure): it stays unknown, so its next try opens it again."""
        if (r.thread, r.sender) in self.opened and (r.thread, r.sender) not in self.moved:
            self.opened.discard((r.thread, r.sender))
            self.parties.pop(r.thread, None)

    def commit(self, conn: Connection, at: datetime) -> None:
        """Persist every advanced next seq (and new parties); held packets of those threads
        go back to the queue, where the one now due is taken and the rest held again."""
        keys = self.moved | self.opened
        if not keys:
            return
        rows = [
            {
                "thread": t,
                "peer": p,
                "next_seq": self.parties[t][p],
                "opened_by": p if (t, p) in self.opened else self.me,
                "at": at,
            }
            for t, p in sorted(keys)
        ]
        for i in range(0, len(rows), _CHUNK):
            stmt = _insert(conn)(THREAD_PARTY).values(rows[i : i + _CHUNK])
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["thread", "peer"], set_={"next_seq": stmt.excluded.next_seq}
                )
            )
        threads = sorted({t for t, _ in self.moved})
        for i in range(0, len(threads), _CHUNK):
            conn.execute(
                update(INBOX)
                .where(INBOX.c.state == "held", INBOX.c.thread.in_(threads[i : i + _CHUNK]))
                .values(state="received")
            )
