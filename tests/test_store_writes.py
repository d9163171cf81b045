"""The write path of a lab message: ``store.put_many`` writes what ``put`` writes, one by one,
except that a resource whose content equals its stored version is kept as it is;
a SQLite store's writers queue in-process; its WAL is checkpointed off the committing thread.

In process, against real stores (a SQLite file; a fresh PostgreSQL database for ``put_many``).
Rows are compared column by column with ``put``'s, including updates that move tokens, dates
and names.
"""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, event, insert, select

from bridge.errors import NotFound
from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_DATE, FHIR_HISTORY, FHIR_RESOURCE, FHIR_STRING, FHIR_TOKEN
from bridge.store.checkpoint import Checkpointer
from bridge.store.db import Store
from bridge.store.tables import NODE_STATE
from tests.harness import wait_for

T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
NID = "urn:oid:2.16.156.10011.1.3"


def resources(
    n: int, *, family: str = "王", mrn: str = "FX1", shift: int = 0
) -> list[dict[str, Any]]:
    """A lab message's worth: a Patient, an Organization, a report and n Observations."""
    out: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": "p-1",
            "identifier": [{"system": NID, "value": mrn}],
            "name": [{"family": family, "given": ["秀英"]}],
            "gender": "female",
            "birthDate": "1950-03-15",
        },
        {"resourceType": "Organization", "id": "org-1", "name": "检验科"},
        {
            "resourceType": "DiagnosticReport",
            "id": "dr-1",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}]},
            "subject": {"reference": "Patient/p-1"},
            "effectiveDateTime": "2026-12-07T08:00:00Z",
            "result": [{"reference": f"Observation/o-{i}"} for i in range(n)],
        },
    ]
    out += [
        {
            "resourceType": "Observation",
            "id": f"o-{i}",
            "status": "final",
            "identifier": [{"system": "urn:lab", "value": f"L{i}"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": f"{700 + i}-1"}]},
            "subject": {"reference": "Patient/p-1"},
            "effectiveDateTime": "2026-12-07T08:00:00Z",
            "valueQuantity": {"value": i + shift, "unit": "g/L"},
        }
        for i in range(n)
    ]
    return out


def snapshot(conn: Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the store holds (history without its sequence number)."""
    out = {}
    for table in (FHIR_RESOURCE, FHIR_TOKEN, FHIR_DATE, FHIR_STRING):
        out[table.name] = sorted(tuple(r) for r in conn.execute(select(table)))
    h = FHIR_HISTORY.c
    out["fhir_history"] = sorted(
        tuple(r) for r in conn.execute(select(h.rtype, h.id, h.version, h.at, h.body))
    )
    return out


def write(s: Store, many: bool, batches: list[list[dict[str, Any]]]) -> None:
    for k, batch in enumerate(batches):
        at = T0 + timedelta(minutes=k)
        with s.write() as conn:
            items = [
                (
                    copy.deepcopy(r),
                    "th-1" if r["resourceType"] != "Organization" else None,
                    "h" * 64 if r["resourceType"] != "Organization" else None,
                )
                for r in batch
            ]
            if many:
                store.put_many(conn, items, at=at, origin="core")
            else:  # put, except for a resource whose stored content is the same (put_many's rule)
                for r, th, ph in items:
                    try:
                        now = store.get(conn, r["resourceType"], r["id"])
                    except NotFound:
                        now = None
                    if now is None or store.content(now) != store.content(r):
                        store.put(conn, r, at=at, thread=th, origin="core", patient_hash=ph)


def test_put_many_writes_the_rows_put_writes(dsn: str, tmp_path: Path) -> None:
    """New resources, then the same ids again with a changed identifier, name and value
    (updates: new versions, tokens, dates and names replaced; the Organization and the report
    unchanged: no new version), then a partial batch."""
    batches = [resources(8), resources(8, family="李", mrn="FX2", shift=10), resources(3)]
    got: list[dict[str, list[tuple[Any, ...]]]] = []
    for many in (False, True):
        if dsn.startswith("sqlite"):
            s = Store(f"sqlite:///{tmp_path / f'node-{many}.db'}")
        else:
            s = Store(dsn)
        try:
            s.create_all()
            write(s, many, batches)
            with s.read() as conn:
                got.append(snapshot(conn))
            if not dsn.startswith("sqlite"):
                with s.write() as conn:
                    for table in (FHIR_RESOURCE, FHIR_TOKEN, FHIR_DATE, FHIR_STRING, FHIR_HISTORY):
                        conn.execute(table.delete())
        finally:
            s.dispose()
    one_by_one, batched = got
    assert batched == one_by_one
    # 11 new; Patient + 8 Observations changed; Patient, report and o-0..o-2 changed back
    assert len(batched["fhir_history"]) == 11 + 9 + 5
    assert ("Organization", "org-1", 1) in {r[:3] for r in batched["fhir_history"]}
    assert [r[:3] for r in batched["fhir_history"] if r[0] == "Organization"] == [
        ("Organization", "org-1", 1)
    ]
    versions = {(r[0], r[1]): r[2] for r in batched["fhir_resource"]}
    assert versions[("Patient", "p-1")] == 3 and versions[("Observation", "o-7")] == 2
    assert versions[("Organization", "org-1")] == 1 and versions[("DiagnosticReport", "dr-1")] == 2
    assert versions[("Observation", "o-0")] == 3
    assert ("Observation", "o-7", "identifier", "urn:lab", "L7") in batched["fhir_token"]


def test_put_many_returns_the_resources_with_their_versions(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        s.create_all()
        with s.write() as conn:
            first = store.put_many(conn, [(r, None, None) for r in resources(2)], at=T0)
        with s.write() as conn:
            again = store.put_many(
                conn, [(r, None, None) for r in resources(2)], at=T0 + timedelta(seconds=1)
            )
        assert [r["meta"]["versionId"] for r in first] == ["1"] * 5
        # the same content again: nothing written, each returned with its stored meta
        assert [r["meta"] for r in again] == [r["meta"] for r in first]
        assert again[0]["meta"] == {"versionId": "1", "lastUpdated": "2026-12-07T08:00:00.000Z"}
        with s.read() as conn:
            assert store.history(conn, "Patient")[0][0].version == 1
            assert len(store.history(conn, "Observation")[0]) == 2
        # a changed Observation only: it alone moves to version 2, at the second write's time
        changed = resources(2, shift=1)
        with s.write() as conn:
            out = store.put_many(
                conn, [(r, None, None) for r in changed], at=T0 + timedelta(seconds=1)
            )
        assert [r["meta"]["versionId"] for r in out] == ["1", "1", "1", "2", "2"]
        assert out[3]["meta"]["lastUpdated"] == "2026-12-07T08:00:01.000Z"
        with s.read() as conn:
            assert store.get(conn, "Observation", "o-1")["valueQuantity"]["value"] == 2
            assert store.get(conn, "Patient", "p-1")["meta"]["versionId"] == "1"
        # a (type, id) twice in one batch: written in order, as put would
        twice = [resources(0)[0], {**resources(0)[0], "gender": "male"}]
        with s.write() as conn:
            out = store.put_many(conn, [(r, None, None) for r in twice], at=T0)
        assert [r["meta"]["versionId"] for r in out] == ["2", "3"]
        with s.read() as conn:
            assert store.get(conn, "Patient", "p-1")["gender"] == "male"
    finally:
        s.dispose()


def test_put_many_reads_current_versions_by_primary_key(tmp_path: Path) -> None:
    """Two IN lists, not a row-value IN (which SQLite answered with a scan of the table)."""
    s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        s.create_all()
        sql = str(
            store._CURRENT_MANY.params(_types=["Patient", "Observation"], _ids=["a", "b"]).compile(
                s.engine, compile_kwargs={"literal_binds": True}
            )
        )
        with s.read() as conn:
            plan = [r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
        pk = "sqlite_autoindex_fhir_resource_1"
        want = f"SEARCH fhir_resource USING INDEX {pk} (rtype=? AND id=?)"
        assert plan == [want]
    finally:
        s.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'node.db'}")
    s.create_all()
    yield s
    s.dispose()


def test_writers_of_one_process_queue_and_every_commit_lands(sqlite_store: Store) -> None:
    """Eight threads, 25 write transactions each, each reading then bumping one counter:
    every increment survives (no lost update, no 'database is locked')."""
    with sqlite_store.write() as conn:
        conn.execute(insert(NODE_STATE).values(key="n", value="0", updated_at=T0))
    errors: list[BaseException] = []

    def bump() -> None:
        try:
            for _ in range(25):
                with sqlite_store.write() as conn:
                    n = int(
                        conn.execute(
                            select(NODE_STATE.c.value).where(NODE_STATE.c.key == "n")
                        ).scalar_one()
                    )
                    conn.execute(
                        NODE_STATE.update().where(NODE_STATE.c.key == "n").values(value=str(n + 1))
                    )
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with sqlite_store.read() as conn:
        assert (
            conn.execute(select(NODE_STATE.c.value).where(NODE_STATE.c.key == "n")).scalar_one()
            == "200"
        )


def _wal(path: Path) -> tuple[int, int]:
    """(frames in the log, frames copied): a PASSIVE checkpoint's answer, on a connection of
    the test's own."""
    c = sqlite3.connect(path)
    try:
        _busy, frames, copied = c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames, copied
    finally:
        c.close()


def test_the_wal_is_checkpointed_by_its_own_thread(tmp_path: Path) -> None:
    """The node's writer connections never checkpoint (autocheckpoint off); the
    checkpointer copies the log after commits, and the log starts over at the next commit."""
    path = tmp_path / "node.db"
    s = Store(f"sqlite:///{path}")
    try:
        s.create_all()
        with s.write() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        cp = s._checkpointer
        assert cp is not None
        for k in range(10):
            write(s, True, [resources(8, mrn=f"FX{k}")])
        wait_for(
            lambda: cp.runs >= 1 and _wal(path)[0] == _wal(path)[1],
            30,
            what="a checkpoint that copied the whole log",
        )
        before = _wal(path)[0]
        with s.write() as conn:  # the log starts over at the first commit after it
            conn.execute(insert(NODE_STATE).values(key="x", value="1", updated_at=T0))
        frames, _ = _wal(path)
        assert before > 50 and frames < 10, (before, frames)
    finally:
        s.dispose()
    assert cp._thread is None  # stopped with the store


def test_grouped_writes_each_get_their_own_result_and_a_failure_keeps_nothing(dsn: str) -> None:
    """Threads share commits (``write_grouped``, SQLite and PostgreSQL): each caller gets its
    own work's value; a work that raises gets its error, its rows are not kept, and the
    others' rows are. Commits counted: the group's (rolled back), then one per work alone."""
    s = Store(dsn)
    s.create_all()
    commits: list[int] = []
    event.listen(s.engine, "commit", lambda _conn: commits.append(1))
    try:
        _grouped_writes(s, commits)
    finally:
        s.dispose()


def test_grouped_writes_without_a_failure_share_one_commit(dsn: str) -> None:
    s = Store(dsn)
    s.create_all()
    commits: list[int] = []
    event.listen(s.engine, "commit", lambda _conn: commits.append(1))
    done: dict[int, int] = {}

    def caller(i: int) -> None:
        def work(conn: Connection) -> int:
            conn.execute(insert(NODE_STATE).values(key=f"g{i}", value=str(i), updated_at=T0))
            return i

        done[i] = s.write_grouped(work)

    try:
        with s._group_lock:  # a group in progress: the callers queue up behind it
            threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            wait_for(lambda: len(s._queue) == 6, 30, what="six queued writes")
        for t in threads:
            t.join(60)
        assert done == {i: i for i in range(6)}
        assert len(commits) == 1
        with s.read() as conn:
            keys = {r.key for r in conn.execute(select(NODE_STATE.c.key))}
        assert {f"g{i}" for i in range(6)} <= keys
    finally:
        s.dispose()


def _grouped_writes(s: Store, commits: list[int]) -> None:
    results: dict[int, Any] = {}
    gate = threading.Event()

    def work_of(i: int) -> Any:
        def work(conn: Connection) -> int:
            conn.execute(insert(NODE_STATE).values(key=f"k{i}", value=str(i), updated_at=T0))
            if i % 5 == 3:
                raise ValueError(f"refused {i}")
            return i * 10

        return work

    def caller(i: int) -> None:
        gate.wait()
        try:
            results[i] = s.write_grouped(work_of(i))
        except ValueError as exc:
            results[i] = str(exc)

    # hold the group lock so that the callers queue up and form one group behind it
    with s._group_lock:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        gate.set()
        wait_for(lambda: len(s._queue) == 10, 30, what="ten queued writes")
    for t in threads:
        t.join(60)
    assert results == {i: (f"refused {i}" if i % 5 == 3 else i * 10) for i in range(10)}
    assert len(commits) == 8  # the group rolled back; each of the eight that passed alone
    with s.read() as conn:
        keys = {r.key for r in conn.execute(select(NODE_STATE.c.key))}
    assert {f"k{i}" for i in range(10) if i % 5 != 3} <= keys
    assert not {"k3", "k8"} & keys


@pytest.fixture
def small_log(tmp_path: Path) -> Iterator[tuple[Path, Store, Checkpointer]]:
    """A node's SQLite store whose checkpointer restarts the log past 16 frames."""
    path = tmp_path / "node.db"
    s = Store(f"sqlite:///{path}")
    s.create_all()
    cp = s._checkpointer
    assert cp is not None
    cp.restart_frames = 16
    yield path, s, cp
    s.dispose()  # the tests also dispose of it in their finally; twice is harmless


def test_a_log_that_never_catches_up_is_restarted_under_the_writer_lock(
    small_log: tuple[Path, Store, Checkpointer],
) -> None:
    """A reader holding an old snapshot keeps the passive checkpoints from copying the log;
    past ``restart_frames`` the checkpointer tries a RESTART under the writer lock, gives up
    after its short busy timeout (writers go on), and once the reader is gone the log is
    copied and starts over."""
    path, s, cp = small_log
    try:
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM node_state").fetchone()  # holds this snapshot
        for k in range(4):
            write(s, True, [resources(8, mrn=f"FX{k}")])
        wait_for(lambda: cp.restarts >= 1, 30, what="a RESTART attempt")
        assert cp.restarts_busy == cp.restarts  # the reader held each one off
        t0 = time.monotonic()
        for k in range(6):  # commits go on; the back-off spaces the next attempts
            write(s, True, [resources(8, mrn=f"FX-during{k}")])
        elapsed = time.monotonic() - t0 + 0.3  # + the first attempt's wait and a round
        frames, copied = _wal(path)
        assert copied < frames  # the reader's snapshot still pins the log
        # the next attempts come 0.5, 1.5, 3.5 s ... after the first, not at every commit
        assert cp.restarts <= 1 + sum(1 for t in (0.5, 1.5, 3.5, 7.5, 15.5) if t < elapsed)
        reader.execute("COMMIT")
        reader.close()
        runs = cp.runs
        cp._next_restart = 0.0  # the back-off's end, without sleeping through it
        write(s, True, [resources(8, mrn="FX-after")])
        wait_for(
            lambda: cp.runs > runs and _wal(path)[0] == _wal(path)[1],
            30,
            what="the whole log copied",
        )
        with s.write() as conn:
            conn.execute(insert(NODE_STATE).values(key="y", value="1", updated_at=T0))
        assert _wal(path)[0] < 10
    finally:
        s.dispose()


def test_a_log_copied_to_the_end_but_never_started_over_is_restarted(
    small_log: tuple[Path, Store, Checkpointer],
) -> None:
    """A writer starts the log over only if its transaction began with nothing left to copy;
    commits back to back each begin before the copy of the one before ends, so the log can
    hold every frame copied and still grow (the LIS soak: 2.5 GB). Past ``restart_frames``
    the checkpointer restarts it even when everything is copied, and the file is cut back."""
    from bridge.store.checkpoint import JOURNAL_SIZE_LIMIT

    path, s, cp = small_log
    try:
        cp.interval_s = 3600.0  # no round of its own in between: this test calls it
        with s.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_size_limit").scalar() == JOURNAL_SIZE_LIMIT
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM node_state").fetchone()  # the log cannot start over
        for k in range(4):
            write(s, True, [resources(8, mrn=f"FX{k}")])
        reader.execute("COMMIT")
        reader.close()
        frames, copied = _wal(path)  # every frame copied; no writer has begun since
        assert frames == copied and frames >= 16
        before, busy = cp.restarts, cp.restarts_busy
        cp._next_restart = 0.0  # a round of its thread while the reader held may have backed off
        probe = sqlite3.connect(path, isolation_level=None)
        try:
            cp._checkpoint(probe)
        finally:
            probe.close()
        assert (cp.restarts - before, cp.restarts_busy - busy) == (1, 0)
        with s.write() as conn:
            conn.execute(insert(NODE_STATE).values(key="z", value="1", updated_at=T0))
        assert _wal(path)[0] < 10  # started over
    finally:
        s.dispose()


def test_bulk_writes_the_rows_execute_writes(dsn: str) -> None:
    """``bulk.run`` (put_many's writes, on the driver's cursor) against SQLAlchemy's own
    ``conn.execute`` on the same rows: a timestamp given at +08:00 is stored as naive UTC, a
    NULL stays NULL, bytes stay bytes; an UPDATE's SET and WHERE parameters land alike."""
    from datetime import timezone

    from sqlalchemy import bindparam, update

    from bridge.store import bulk

    beijing = timezone(timedelta(hours=8))
    at = datetime(2026, 12, 7, 16, 30, 5, 123000, tzinfo=beijing)
    s = Store(dsn)
    try:
        s.create_all()
        h = FHIR_HISTORY.c
        d = FHIR_DATE.c
        rows = {
            via: [
                {
                    "rtype": "Observation",
                    "id": f"{via}-{i}",
                    "version": i,
                    "at": at,
                    "body": b"\x00{}",
                }
                for i in (1, 2)
            ]
            for via in ("sa", "bulk")
        }
        dates = {
            via: [{"rtype": "Patient", "id": via, "param": "birthdate", "start": at, "end": None}]
            for via in ("sa", "bulk")
        }
        move = update(FHIR_DATE).where(d.rtype == bindparam("_rt"), d.id == bindparam("_id"))
        with s.write() as conn:
            conn.execute(insert(FHIR_HISTORY), rows["sa"])
            conn.execute(insert(FHIR_DATE), dates["sa"])
            conn.execute(move, [{"_rt": "Patient", "_id": "sa", "end": at + timedelta(days=1)}])
        with s.write() as conn:
            bulk.run(
                conn,
                [
                    (insert(FHIR_HISTORY), rows["bulk"]),
                    (insert(FHIR_DATE), dates["bulk"]),
                    (move, [{"_rt": "Patient", "_id": "bulk", "end": at + timedelta(days=1)}]),
                ],
            )
        with s.read() as conn:
            hist = {
                r.id: r for r in conn.execute(select(h.id, h.version, h.at, h.body).order_by(h.id))
            }
            got = {r.id: r for r in conn.execute(select(FHIR_DATE))}
    finally:
        s.dispose()
    utc = datetime(2026, 12, 7, 8, 30, 5, 123000, tzinfo=UTC)
    for i in (1, 2):
        a, b = hist[f"sa-{i}"], hist[f"bulk-{i}"]
        assert (b.version, b.at, b.body) == (a.version, a.at, a.body) == (i, utc, b"\x00{}")
    assert (got["bulk"].start, got["bulk"].end) == (got["sa"].start, got["sa"].end)
    assert (got["bulk"].start, got["bulk"].end) == (utc, utc + timedelta(days=1))


def test_a_bulk_write_that_fails_is_sqlalchemys_error_and_keeps_nothing(dsn: str) -> None:
    """A duplicate key in the second of two batches: SQLAlchemy's IntegrityError (as
    ``conn.execute`` raises it; PostgreSQL reports it when the pipeline syncs), the first
    batch rolled back with it, and the store writable at once."""
    from sqlalchemy.exc import IntegrityError

    from bridge.store import bulk

    s = Store(dsn)
    tok = [{"rtype": "Patient", "id": "p-1", "param": "identifier", "system": NID, "value": "FX1"}]
    hist = [{"rtype": "Patient", "id": "p-1", "version": 1, "at": T0, "body": b"{}"}]
    try:
        s.create_all()
        with s.write() as conn:
            conn.execute(insert(FHIR_TOKEN), tok)
        with pytest.raises(IntegrityError), s.write() as conn:
            bulk.run(conn, [(insert(FHIR_HISTORY), hist), (insert(FHIR_TOKEN), tok)])
        with s.read() as conn:
            assert list(conn.execute(select(FHIR_HISTORY.c.id))) == []
            assert [tuple(r) for r in conn.execute(select(FHIR_TOKEN))] == [
                ("Patient", "p-1", "identifier", NID, "FX1")
            ]
        with s.write() as conn:
            bulk.run(conn, [(insert(FHIR_HISTORY), hist)])
        with s.read() as conn:
            assert [r.id for r in conn.execute(select(FHIR_HISTORY.c.id))] == ["p-1"]
    finally:
        s.dispose()


def test_bulk_refuses_a_statement_whose_parameters_the_rows_do_not_give() -> None:
    from sqlalchemy import bindparam, create_engine, update

    from bridge.store import bulk

    engine = create_engine("sqlite://")
    stmt = update(FHIR_TOKEN).where(FHIR_TOKEN.c.id == bindparam("_id"))
    with engine.begin() as conn, pytest.raises(ValueError, match="_id"):
        bulk.run(conn, [(stmt, [{"value": "x"}])])
    engine.dispose()


def test_bulk_keeps_a_bounded_number_of_plans() -> None:
    """Statements built per call (not the hot paths' constants) each compile, and the plans
    kept never pass ``MAX_PLANS``; the rows still land."""
    from sqlalchemy import create_engine, func

    from bridge.store import bulk

    engine = create_engine("sqlite://")
    FHIR_TOKEN.create(engine)
    n = bulk.MAX_PLANS + 40
    with engine.begin() as conn:
        for i in range(n):
            row = {
                "rtype": "Patient",
                "id": f"p{i}",
                "param": "identifier",
                "system": "",
                "value": "v",
            }
            bulk.executemany(conn, insert(FHIR_TOKEN), [row])
            assert len(bulk._PLANS) <= bulk.MAX_PLANS
        assert conn.execute(select(func.count()).select_from(FHIR_TOKEN)).scalar() == n
    engine.dispose()
