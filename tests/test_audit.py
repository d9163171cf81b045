"""Audit log: hash chain, signed checkpoints, tamper detection, FHIR validity, export, privacy."""

from __future__ import annotations

import base64
import csv
import io
import math
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import Engine, event, text
from sqlmodel import SQLModel, create_engine

from bridge.audit import (
    AUDIT_TABLES,
    GENESIS_HASH,
    AuditChain,
    AuditEntry,
    canonical,
    checkpoint_message,
    event_fields,
    export,
    link_hash,
    query,
    to_audit_event,
    unwrap,
)
from bridge.audit.chain import VERIFY_CHUNK
from bridge.audit.events import ACTIONS, PATIENT_HASH_SYSTEM
from bridge.audit.export import CSV_COLUMNS
from bridge.audit.watch import ChainWatch
from bridge.errors import StoreError
from bridge.store.db import Store

NODE = "node-a"
HASH_A = "a1" * 32  # stand-ins for bridge.privacy.patient_hash() output
HASH_B = "b2" * 32
BASE = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def immediate(engine: Engine) -> Engine:
    """Every transaction on this SQLite engine is BEGIN IMMEDIATE, as append expects."""

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@pytest.fixture
def engine(tmp_path) -> Iterator[Engine]:
    eng = immediate(create_engine(f"sqlite:///{tmp_path / 'audit.db'}"))
    SQLModel.metadata.create_all(eng, tables=AUDIT_TABLES)
    yield eng
    eng.dispose()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def entry(i: int, **kw) -> AuditEntry:  # type: ignore[no-untyped-def]
    values = {
        "action": "sent",
        "packet_id": f"pkt-{i}",
        "kind": "referral",
        "peer": "node-b",
        "thread": f"thr-{i % 7}",
        "patient_hash": HASH_A if i % 2 else HASH_B,
        "at": BASE + timedelta(seconds=i),
    }
    values.update(kw)
    return AuditEntry(**values)


def fill(engine: Engine, chain: AuditChain, n: int, batch: int = 10) -> None:
    done = 0
    while done < n:
        size = min(batch, n - done)
        with engine.begin() as conn:
            chain.append(conn, [entry(done + j + 1) for j in range(size)])
        done += size


@pytest.fixture
def chain50(engine: Engine, key: Ed25519PrivateKey) -> AuditChain:
    """50 rows, checkpoints signed at 10, 20, 30, 40, 50."""
    chain = AuditChain(NODE, key, checkpoint_every=10)
    fill(engine, chain, 50, batch=7)
    return chain


def verify(engine: Engine, chain: AuditChain, keys=()):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return chain.verify(conn, keys)


class Reads:
    """``open_read`` for ``verify_chunked``: each call opens a connection of ``open_read``
    (``engine.connect``, ``Store.read``), i.e. one read transaction, and counts it;
    ``before(n)`` runs before the n-th opens (an edit or an append between two chunks)."""

    def __init__(self, open_read, before=None) -> None:  # type: ignore[no-untyped-def]
        self.open_read = open_read
        self.before = before
        self.opened = 0
        self.in_transaction: list[bool] = []  # each connection's reads ran in its transaction

    @contextmanager
    def __call__(self):  # type: ignore[no-untyped-def]
        self.opened += 1
        if self.before is not None:
            self.before(self.opened)
        with self.open_read() as conn:
            yield conn
            self.in_transaction.append(conn.in_transaction())


#: chunk sizes the tamper cases also run ``verify_chunked`` with (None: only the single pass):
#: 1, a prime, the checkpoints (every 10) at chunk borders, 44 = 4 x 11 (the truncated tail),
#: the log's length, more than the log
CHUNKS = [None, 1, 3, 10, 11, 50, 1000]


@pytest.fixture(params=CHUNKS, ids=lambda c: "one-pass" if c is None else f"chunk-{c}")
def check(request):  # type: ignore[no-untyped-def]
    """``verify`` for the tamper cases: the single pass, or ``verify_chunked`` with the param's
    chunk size, which must answer as the single pass did, field for field."""
    chunk = request.param

    def run(engine: Engine, chain: AuditChain, keys=()):  # type: ignore[no-untyped-def]
        one = verify(engine, chain, keys)
        if chunk is None:
            return one
        reads = Reads(engine.connect)
        res = chain.verify_chunked(reads, keys, chunk=chunk)
        assert res == one
        assert all(reads.in_transaction)
        if res.ok:  # one read transaction a chunk, none more
            assert reads.opened == max(1, math.ceil(res.last_seq / chunk))
        return res

    return run


def sql(engine: Engine, statement: str, **params) -> None:  # type: ignore[no-untyped-def]
    with engine.begin() as conn:
        conn.execute(text(statement), params)


# -- chain -----------------------------------------------------------------------------------


def test_append_2500_in_several_calls_verifies_with_checkpoints(engine, key):
    chain = AuditChain(NODE, key)
    sizes = [1, 499, 700, 300, 1000]
    seq = 0
    for size in sizes:
        with engine.begin() as conn:
            seq = chain.append(conn, [entry(seq + j + 1) for j in range(size)])
    assert seq == 2500

    result = verify(engine, chain, [key.public_key()])
    assert (result.ok, result.checked, result.first_bad_seq) == (True, 2500, None)
    assert result.reason is None
    assert result.last_seq == 2500
    assert result.checkpoints_checked == 2

    with engine.connect() as conn:
        seqs = conn.execute(text("SELECT seq FROM audit ORDER BY seq")).scalars().all()
        first = conn.execute(
            text("SELECT prev_hash, hash, resource FROM audit WHERE seq = 1")
        ).one()
        head = conn.execute(text("SELECT hash FROM audit WHERE seq = 2500")).scalar_one()
        cps = conn.execute(
            text("SELECT seq, hash, at, key_id, signature FROM audit_checkpoint ORDER BY seq")
        ).all()
        hashes = dict(
            conn.execute(text("SELECT seq, hash FROM audit WHERE seq IN (1000, 2000)")).all()
        )
    assert seqs == list(range(1, 2501))
    assert first.prev_hash == GENESIS_HASH
    assert first.hash == link_hash(GENESIS_HASH, first.resource.encode())
    assert result.last_hash == head
    assert [cp.seq for cp in cps] == [1000, 2000]
    for cp in cps:
        assert cp.hash == hashes[cp.seq]
        at = datetime.fromisoformat(cp.at) if isinstance(cp.at, str) else cp.at
        key.public_key().verify(
            base64.b64decode(cp.signature), checkpoint_message(NODE, cp.seq, cp.hash, at)
        )

    # a verifier holding only some other key cannot vouch for these checkpoints
    other = Ed25519PrivateKey.generate().public_key()
    bad = verify(engine, chain, [other])
    assert (bad.ok, bad.first_bad_seq) == (False, 1000)
    assert "unknown key" in bad.reason


def test_append_rows_match_entries_and_resource(engine):
    chain = AuditChain(NODE, None)
    with engine.begin() as conn:
        last = chain.append(
            conn,
            [entry(1, actor="dr.li", outcome="4", code="HT-TRANSPORT", message="peer timed out")],
        )
        assert chain.append(conn, []) == last == 1
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM audit")).one()
    assert (
        row.seq,
        row.action,
        row.outcome,
        row.packet_id,
        row.kind,
        row.peer,
        row.thread,
        row.patient_hash,
        row.actor,
    ) == (1, "sent", "4", "pkt-1", "referral", "node-b", "thr-1", HASH_A, "dr.li")
    resource = orjson.loads(row.resource)
    assert row.resource.encode() == canonical(resource)  # stored bytes are the canonical form
    assert resource["outcomeDesc"] == "HT-TRANSPORT: peer timed out"
    assert event_fields(resource) == {
        "seq": 1,
        "at": "2025-03-01T08:00:01.000000Z",
        "action": "sent",
        "outcome": "4",
        "packet_id": "pkt-1",
        "kind": "referral",
        "peer": "node-b",
        "thread": "thr-1",
        "patient_hash": HASH_A,
        "actor": "dr.li",
        "code": "HT-TRANSPORT",
        "message": "peer timed out",
    }


def test_checkpoint_forced_at_head(engine, key):
    with engine.begin() as conn:
        assert AuditChain(NODE, key).checkpoint(conn) is None  # empty log
    chain = AuditChain(NODE, key, checkpoint_every=1000)
    fill(engine, chain, 25)
    with engine.begin() as conn:
        assert AuditChain(NODE, None).checkpoint(conn) is None  # no key, nothing to sign
        cp = chain.checkpoint(conn)
        assert cp is not None and cp.id is not None
        again = chain.checkpoint(conn)  # head unchanged: the same checkpoint comes back
    assert cp.seq == 25 and again is not None and again.id == cp.id
    assert again.at == cp.at and again.signature == cp.signature
    assert verify(engine, chain).checkpoints_checked == 1
    with engine.connect() as conn:
        head = conn.execute(text("SELECT hash FROM audit WHERE seq = 25")).scalar_one()
    assert cp.hash == head


def test_edited_resource_json_is_caught(engine, chain50, check):
    assert check(engine, chain50).ok
    sql(engine, "UPDATE audit SET resource = replace(resource, 'pkt-17', 'pkt-71') WHERE seq = 17")
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq, result.checked, result.last_seq) == (False, 17, 16, 16)
    assert result.reason == "seq 17: hash mismatch, resource or hash was edited"


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("patient_hash", "c3" * 32),
        ("action", "read"),
        ("packet_id", "pkt-999"),
        ("peer", "node-z"),
        ("outcome", "12"),
        ("actor", "mallory"),
        ("at", "2024-01-01 00:00:00.000000"),
    ],
)
def test_edited_indexed_column_is_caught(engine, chain50, column, value, check):
    sql(engine, f"UPDATE audit SET {column} = :v WHERE seq = 23", v=value)
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq) == (False, 23)
    assert result.reason == f"seq 23: column {column} does not match the resource"


def test_deleted_middle_row_is_caught(engine, chain50, check):
    sql(engine, "DELETE FROM audit WHERE seq = 30")
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 31, 29)
    assert result.reason == "seq 31: follows seq 29, row 30 missing"


def test_deleted_row_renumbered_is_caught(engine, chain50, check):
    # hide the gap by shifting later rows down: the links no longer join
    sql(engine, "DELETE FROM audit WHERE seq = 30")
    for seq in range(31, 51):
        sql(engine, "UPDATE audit SET seq = :new WHERE seq = :old", new=seq - 1, old=seq)
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq) == (False, 30)
    assert "prev_hash does not link to seq 29" in result.reason


def test_swapped_rows_are_caught(engine, chain50, check):
    columns = (
        "at, action, outcome, packet_id, kind, peer, thread, patient_hash, actor, "
        "resource, prev_hash, hash"
    )
    with engine.begin() as conn:
        a = conn.execute(text(f"SELECT {columns} FROM audit WHERE seq = 12")).one()._asdict()
        b = conn.execute(text(f"SELECT {columns} FROM audit WHERE seq = 13")).one()._asdict()
        assign = ", ".join(f"{c} = :{c}" for c in a)
        conn.execute(text(f"UPDATE audit SET {assign} WHERE seq = 12"), b)
        conn.execute(text(f"UPDATE audit SET {assign} WHERE seq = 13"), a)
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq) == (False, 12)
    assert result.reason.startswith("seq 12: prev_hash does not link to seq 11")


def test_truncated_tail_is_caught_by_checkpoint(engine, key, check):
    chain = AuditChain(NODE, key, checkpoint_every=1000)
    fill(engine, chain, 45)
    with engine.begin() as conn:
        chain.checkpoint(conn)  # as on shutdown
    sql(engine, "DELETE FROM audit WHERE seq = 45")
    result = check(engine, chain)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 45, 44)
    assert result.reason == "truncated: checkpoint at seq 45 but the log ends at seq 44"


def test_truncated_tail_without_checkpoint_is_not_detectable(engine, check):
    # why checkpoints exist: a cut tail leaves a perfectly linked, shorter chain
    chain = AuditChain(NODE, None)
    fill(engine, chain, 20)
    sql(engine, "DELETE FROM audit WHERE seq > 15")
    result = check(engine, chain)
    assert (result.ok, result.checked, result.last_seq) == (True, 15, 15)


def test_forged_checkpoint_signature_is_caught(engine, chain50, check):
    forger = Ed25519PrivateKey.generate()
    with engine.begin() as conn:
        cp = conn.execute(text("SELECT hash, at FROM audit_checkpoint WHERE seq = 20")).one()
        at = datetime.fromisoformat(cp.at).replace(tzinfo=UTC)
        forged = base64.b64encode(forger.sign(checkpoint_message(NODE, 20, cp.hash, at))).decode()
        conn.execute(
            text("UPDATE audit_checkpoint SET signature = :s WHERE seq = 20"), {"s": forged}
        )
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq, result.checkpoints_checked) == (False, 20, 1)
    assert result.reason.startswith("checkpoint at seq 20: signature does not verify")


def test_garbage_checkpoint_signature_is_caught(engine, chain50, check):
    sql(engine, "UPDATE audit_checkpoint SET signature = 'not base64!' WHERE seq = 40")
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq) == (False, 40)


def test_rewritten_chain_is_caught_by_checkpoint(engine, chain50, check):
    # the attacker edits row 15 and recomputes every later hash: only the signed checkpoint knows
    with engine.begin() as conn:
        rows = conn.execute(
            text("SELECT seq, resource, prev_hash FROM audit WHERE seq >= 15 ORDER BY seq")
        ).all()
        prev = rows[0].prev_hash
        for row in rows:
            resource = orjson.loads(row.resource)
            if row.seq == 15:
                resource["outcome"] = "8"
            body = canonical(resource)
            digest = link_hash(prev, body)
            conn.execute(
                text(
                    "UPDATE audit SET resource = :r, prev_hash = :p, hash = :h, "
                    "outcome = :o WHERE seq = :s"
                ),
                {
                    "r": body.decode(),
                    "p": prev,
                    "h": digest,
                    "o": resource["outcome"],
                    "s": row.seq,
                },
            )
            prev = digest
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 20, 19)
    assert result.reason == "checkpoint at seq 20: hash differs from the row's"


def test_forged_checkpoint_beyond_tail_is_a_bad_signature(engine, chain50, check):
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_checkpoint (seq, hash, at, key_id, signature) "
                "SELECT 60, hash, at, key_id, signature FROM audit_checkpoint "
                "WHERE seq = 50"
            )
        )
    result = check(engine, chain50)
    assert (result.ok, result.first_bad_seq) == (False, 60)
    assert "signature does not verify" in result.reason


def test_append_into_missing_table_is_a_store_error(tmp_path):
    eng = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(StoreError) as info, eng.begin() as conn:
            AuditChain(NODE, None).append(conn, [entry(1)])
        assert info.value.code == "HT-STORE"
    finally:
        eng.dispose()


def test_concurrent_writers_on_sqlite_stay_contiguous(engine, key):
    chain = AuditChain(NODE, key, checkpoint_every=50)
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(20):
                with engine.begin() as conn:
                    chain.append(conn, [entry(offset + i * 10 + j) for j in range(10)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n * 1000,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    result = verify(engine, chain)
    assert (result.ok, result.checked, result.checkpoints_checked) == (True, 600, 12)


def test_append_1000_entries_per_call_links_and_checkpoints(engine, key):
    # speed belongs to bench/; here: three 1000-row executemany calls chain as one log
    chain = AuditChain(NODE, key)
    for run in range(3):
        with engine.begin() as conn:
            head = chain.append(conn, [entry(run * 1000 + i + 1) for i in range(1000)])
        assert head == (run + 1) * 1000
    result = verify(engine, chain, [key.public_key()])
    assert (result.ok, result.checked, result.last_seq, result.checkpoints_checked) == (
        True,
        3000,
        3000,
        3,
    )


# -- FHIR and privacy --------------------------------------------------------------------------


@pytest.mark.parametrize("action", [*ACTIONS, "custom-thing"])
def test_every_action_is_a_valid_r4_audit_event(action):
    full = AuditEntry(
        action,
        outcome="8",
        packet_id="pkt-1",
        kind="lab-result",
        peer="node-b",
        thread="thr-1",
        patient_hash=HASH_A,
        actor="role:admin",
        code="HT-PKT-BAD-SIGNATURE",
        message="signature does not verify",
        extra={
            "attempt": 3,
            "bytes": 2**40,
            "late": True,
            "ratio": 0.5,
            "route": "a->b\nc",
            "none": None,
            "nan": float("nan"),
            "blank": " ",
        },
    )
    bare = AuditEntry(action)
    for item in (full, bare):
        resource = to_audit_event(item, NODE, 2**40)
        model = AuditEvent.model_validate(resource)
        assert model.recorded is not None
        fields = event_fields(resource)
        assert fields["action"] == action and fields["seq"] == 2**40
    resource = to_audit_event(full, NODE, 7)
    assert resource["action"] == ACTIONS.get(action, "E")
    assert resource["type"]["code"] == {
        "read": "110112",
        "sent": "110106",
        "received": "110107",
    }.get(action, "110100")
    assert resource["agent"][0] == {
        "who": {"identifier": {"system": "urn:hutong:node", "value": NODE}},
        "requestor": True,
    }
    assert resource["source"]["observer"]["identifier"]["value"] == NODE
    patients = [
        e
        for e in resource["entity"]
        if e["what"].get("identifier", {}).get("system") == PATIENT_HASH_SYSTEM
    ]
    assert patients == [
        {
            "what": {"identifier": {"system": PATIENT_HASH_SYSTEM, "value": HASH_A}},
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "1",
            },
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
        }
    ]
    assert "entity" not in to_audit_event(bare, NODE, 1)


@pytest.mark.parametrize(
    "raw", ["张三", "11010519491231002X", "110105194912310021", "Zhang San", "A1" * 32, ""]
)
def test_patient_hash_refuses_anything_but_hmac_hex(raw):
    with pytest.raises(ValueError, match="patient_hash must be") as info:
        AuditEntry("received", patient_hash=raw)
    if raw:
        assert raw not in str(info.value)  # the refused value is not echoed into logs


def test_entry_validation():
    with pytest.raises(ValueError, match="audit outcome"):
        AuditEntry("sent", outcome="1")
    with pytest.raises(ValueError, match="audit action"):
        AuditEntry("Sent")
    with pytest.raises(ValueError, match="audit time must be timezone-aware"):
        AuditEntry("sent", at=datetime(2025, 1, 1))  # naive
    with pytest.raises(ValueError, match="audit peer"):
        AuditEntry("sent", peer=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="audit extra 'obj'"):
        AuditEntry("sent", extra={"obj": object()})
    e = AuditEntry(
        "sent",
        message="line one\n  line two\t",
        at=datetime(2025, 1, 1, 8, tzinfo=ZoneInfo("Asia/Shanghai")),
    )
    assert e.message == "line one line two"
    assert e.at == datetime(2025, 1, 1, 0, tzinfo=UTC) and e.at.tzinfo is UTC
    assert AuditEntry("sent").at.tzinfo is UTC


def test_hostile_header_text_is_cleaned_not_refused(engine):
    # a refused packet's header fields come from the peer: they must not stop the audit write
    item = AuditEntry(
        "refused",
        outcome="4",
        packet_id="pkt\n\x00evil  id ",
        kind="k" * 5000,
        peer="\t",
        thread="",
        code=" HT-PKT-MALFORMED\r\n",
        message="a\x1bb\u3000c",
    )
    assert (item.packet_id, item.kind, item.peer, item.thread, item.code, item.message) == (
        "pkt evil id",
        "k" * 256,
        None,
        None,
        "HT-PKT-MALFORMED",
        "a b c",
    )
    AuditEvent.model_validate(to_audit_event(item, NODE, 1))
    chain = AuditChain(NODE, None)
    with engine.begin() as conn:
        chain.append(conn, [item])
    assert verify(engine, chain).ok


def test_export_carries_exactly_the_fields_given(engine):
    # the name and ID number below exist only here: no entry carries them, so no export may
    name, id_number = "张三", "11010519491231002X"
    given = [
        AuditEntry(
            "received",
            packet_id="pkt-x",
            kind="referral",
            peer="node-b",
            thread="t-9",
            patient_hash=HASH_A,
            at=BASE,
        ),
        AuditEntry(
            "rejected",
            outcome="8",
            packet_id="pkt-y",
            peer="node-c",
            code="HT-PKT-INVALID-FHIR",
            message="Bundle.entry[2] missing resource",
            at=BASE + timedelta(seconds=1),
        ),
        AuditEntry(
            "read", actor="user:wang.clerk", patient_hash=HASH_B, at=BASE + timedelta(seconds=2)
        ),
    ]
    chain = AuditChain(NODE, None)
    with engine.begin() as conn:
        chain.append(conn, given)
    ndjson, table = io.StringIO(), io.StringIO()
    with engine.connect() as conn:
        assert export(conn, ndjson, fmt="ndjson") == 3
        assert export(conn, table, fmt="csv") == 3
    for blob in (ndjson.getvalue(), table.getvalue()):
        assert name not in blob and id_number not in blob

    lines = [orjson.loads(line) for line in ndjson.getvalue().splitlines()]
    for seq, (line, item) in enumerate(zip(lines, given, strict=True), start=1):
        resource, _prev, _hash = unwrap(line)
        expected = {
            "seq": seq,
            "at": item.at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "action": item.action,
            "outcome": item.outcome,
            "packet_id": item.packet_id,
            "kind": item.kind,
            "peer": item.peer,
            "thread": item.thread,
            "patient_hash": item.patient_hash,
            "actor": item.actor,
            "code": item.code,
            "message": item.message,
        }
        assert event_fields(resource) == expected
        assert resource == to_audit_event(item, NODE, seq)  # nothing added, nothing lost
        # every string in the exported event is either given or a fixed FHIR/Hutong constant
        strings = set(_strings(resource))
        free = strings - {
            NODE,
            *(v for v in expected.values() if isinstance(v, str)),
            f"{item.code}: {item.message}",
            str(seq),
        }
        assert free <= FIXED_VOCABULARY, free - FIXED_VOCABULARY

    rows = list(csv.DictReader(io.StringIO(table.getvalue())))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert rows[1]["code"] == "HT-PKT-INVALID-FHIR"
    assert rows[1]["message"] == "Bundle.entry[2] missing resource"
    assert rows[2]["actor"] == "user:wang.clerk" and rows[2]["patient_hash"] == HASH_B
    assert rows[0]["at"] == "2025-03-01T08:00:00.000000Z"


#: every string an AuditEvent may hold that the caller did not give: FHIR/DICOM codes and names
FIXED_VOCABULARY = {
    "AuditEvent",
    "C",
    "R",
    "U",
    "D",
    "E",
    "1",
    "2",
    "4",
    "kind",
    "thread",
    "peer",
    "110100",
    "110106",
    "110107",
    "110112",
    "Application Activity",
    "Export",
    "Import",
    "Query",
    "urn:hutong:node",
    "urn:hutong:actor",
    "urn:hutong:packet",
    "urn:hutong:patient-hash",
    "http://dicom.nema.org/resources/ontology/DCM",
    "http://hutong.dev/CodeSystem/audit-action",
    "http://hutong.dev/StructureDefinition/audit-seq",
    "http://hutong.dev/StructureDefinition/audit-error-code",
    "http://terminology.hl7.org/CodeSystem/audit-entity-type",
    "http://terminology.hl7.org/CodeSystem/object-role",
    "http://terminology.hl7.org/CodeSystem/security-source-type",
}


def _strings(value):  # type: ignore[no-untyped-def]
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


# -- export and query ------------------------------------------------------------------------


@pytest.fixture
def timeline(engine) -> Engine:
    """20 rows one minute apart from BASE; seq n is at BASE + (n-1) min."""
    chain = AuditChain(NODE, None)
    items = [
        AuditEntry(
            "sent" if n % 3 else "refused",
            outcome="0" if n % 3 else "8",
            packet_id=f"pkt-{n}",
            peer="node-b" if n <= 10 else "node-c",
            patient_hash=HASH_A if n % 4 == 0 else None,
            at=BASE + timedelta(minutes=n - 1),
        )
        for n in range(1, 21)
    ]
    with engine.begin() as conn:
        chain.append(conn, items)
    return engine


def _ndjson_seqs(conn, **filters) -> list[int]:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    count = export(conn, out, fmt="ndjson", **filters)
    seqs = [event_fields(orjson.loads(line))["seq"] for line in out.getvalue().splitlines()]
    assert count == len(seqs)
    return seqs


def _csv_seqs(conn, **filters) -> list[int]:  # type: ignore[no-untyped-def]
    out = io.StringIO()
    export(conn, out, fmt="csv", **filters)
    return [int(row["seq"]) for row in csv.DictReader(io.StringIO(out.getvalue()))]


def test_export_time_window(timeline):
    window = {"since": BASE + timedelta(minutes=5), "until": BASE + timedelta(minutes=10)}
    with timeline.connect() as conn:
        assert _ndjson_seqs(conn, **window) == [6, 7, 8, 9, 10]
        assert _csv_seqs(conn, **window) == [6, 7, 8, 9, 10]
        assert _ndjson_seqs(conn, since=BASE + timedelta(minutes=18)) == [19, 20]
        assert _csv_seqs(conn, until=BASE + timedelta(minutes=2)) == [1, 2]
        # same instant given in Beijing time selects the same rows
        cst = ZoneInfo("Asia/Shanghai")
        assert _csv_seqs(
            conn,
            since=(BASE + timedelta(minutes=5)).astimezone(cst),
            until=(BASE + timedelta(minutes=10)).astimezone(cst),
        ) == [6, 7, 8, 9, 10]
        with pytest.raises(ValueError, match="since must be timezone-aware"):
            export(conn, io.StringIO(), since=datetime(2025, 1, 1))
        with pytest.raises(ValueError, match="export format must be"):
            export(conn, io.StringIO(), fmt="xml")  # type: ignore[arg-type]


def test_export_filters(timeline):
    with timeline.connect() as conn:
        assert _ndjson_seqs(conn, patient_hash=HASH_A) == [4, 8, 12, 16, 20]
        assert _csv_seqs(conn, patient_hash=HASH_A, peer="node-c") == [12, 16, 20]
        assert _csv_seqs(conn, action="refused") == [3, 6, 9, 12, 15, 18]
        assert _ndjson_seqs(conn, outcome="8", until=BASE + timedelta(minutes=8)) == [3, 6]
        assert _ndjson_seqs(conn, patient_hash="f0" * 32) == []


def test_ndjson_export_rehashes_offline_and_validates(timeline):
    out = io.StringIO()
    with timeline.connect() as conn:
        export(conn, out)
        expected_head = AuditChain(NODE, None).verify(conn).last_hash
    prev = GENESIS_HASH
    for line in out.getvalue().splitlines():
        exported = orjson.loads(line)
        AuditEvent.model_validate(exported)
        resource, prev_hash, hash_ = unwrap(exported)
        assert prev_hash == prev
        assert link_hash(prev, canonical(resource)) == hash_
        prev = hash_
    assert prev == expected_head


def test_query_pages(timeline):
    with timeline.connect() as conn:
        page = query(conn, limit=5)
        assert [r["seq"] for r in page] == [20, 19, 18, 17, 16]
        assert [r["seq"] for r in query(conn, limit=5, offset=5)] == [15, 14, 13, 12, 11]
        oldest = query(conn, limit=3, newest_first=False, peer="node-b", action="sent")
        assert [r["seq"] for r in oldest] == [1, 2, 4]
        assert list(page[0]) == list(CSV_COLUMNS)
        assert page[0]["at"] == "2025-03-01T08:19:00.000000Z"
        assert page[0]["patient_hash"] == HASH_A and page[0]["packet_id"] == "pkt-20"
        assert [r["seq"] for r in query(conn, packet_id="pkt-7")] == [7]
        with pytest.raises(ValueError, match="limit must be"):
            query(conn, limit=0)


# -- PostgreSQL ------------------------------------------------------------------------------


def _pg_url(dsn: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    return dsn


@pytest.fixture
def pg_engine(pg_db: str) -> Iterator[Engine]:
    """A schema in a fresh database of the suite's real PostgreSQL (tests/conftest.py)."""
    dsn = pg_db
    schema = f"hutong_audit_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_pg_url(dsn))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    eng = create_engine(_pg_url(dsn), connect_args={"options": f"-c search_path={schema}"})
    try:
        SQLModel.metadata.create_all(eng, tables=AUDIT_TABLES)
        yield eng
    finally:
        eng.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _both(engine: Engine, chain: AuditChain, keys=(), chunks=(7, 1000)):  # type: ignore[no-untyped-def]
    """The single pass, and verify_chunked with each chunk size answering the same."""
    one = verify(engine, chain, keys)
    for chunk in chunks:
        assert chain.verify_chunked(Reads(engine.connect), keys, chunk=chunk) == one
    return one


@pytest.mark.postgres
def test_postgres_append_verify_and_concurrency(pg_engine, key):
    chain = AuditChain(NODE, key)
    seq = 0
    for size in (1, 499, 700, 300, 1000):
        with pg_engine.begin() as conn:
            seq = chain.append(conn, [entry(seq + j + 1) for j in range(size)])
    result = _both(pg_engine, chain, [key.public_key()])
    assert (result.ok, result.checked, result.checkpoints_checked) == (True, 2500, 2)

    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(10):
                with pg_engine.begin() as conn:
                    chain.append(conn, [entry(offset + i * 10 + j) for j in range(10)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n * 1000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with pg_engine.begin() as conn:
        cp = chain.checkpoint(conn)
    assert cp is not None and cp.seq == 2900
    result = _both(pg_engine, chain)
    assert (result.ok, result.checked, result.checkpoints_checked) == (True, 2900, 3)

    sql(pg_engine, "UPDATE audit SET patient_hash = :v WHERE seq = 1234", v="c3" * 32)
    result = _both(pg_engine, chain)
    assert (result.ok, result.first_bad_seq) == (False, 1234)
    assert result.reason == "seq 1234: column patient_hash does not match the resource"
    sql(pg_engine, "DELETE FROM audit WHERE seq = 2900")
    sql(
        pg_engine, "UPDATE audit SET patient_hash = :v WHERE seq = 1234", v=HASH_B
    )  # entry(1234) is even: HASH_B, restored
    result = _both(pg_engine, chain)
    assert (result.ok, result.first_bad_seq) == (False, 2900)
    assert result.reason.startswith("truncated: checkpoint at seq 2900")


# -- incremental verification (verify(after=...), ChainWatch: the auditor page, alerts) -----


def _after(engine: Engine, chain: AuditChain, seq: int):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        head = conn.execute(text("SELECT hash FROM audit WHERE seq = :s"), {"s": seq}).scalar_one()
        return chain.verify(conn, after=(seq, head))


def test_after_checks_only_newer_rows_and_checkpoints(engine, chain50):
    res = _after(engine, chain50, 30)
    assert (res.ok, res.checked, res.last_seq, res.checkpoints_checked) == (True, 20, 50, 2)
    # an edit at or before the confirmed row is not read by an incremental check ...
    sql(engine, "UPDATE audit SET resource = replace(resource, 'pkt-12', 'pkt-21') WHERE seq = 12")
    assert _after(engine, chain50, 30).ok
    # ... a full run catches it
    with engine.connect() as conn:
        full = chain50.verify(conn)
    assert (full.ok, full.first_bad_seq) == (False, 12)


def test_after_catches_edits_deletes_and_a_changed_base(engine, chain50):
    with engine.connect() as conn:
        base = conn.execute(text("SELECT hash FROM audit WHERE seq = 30")).scalar_one()
    sql(engine, "UPDATE audit SET resource = replace(resource, 'pkt-41', 'pkt-14') WHERE seq = 41")
    with engine.connect() as conn:
        res = chain50.verify(conn, after=(30, base))
    assert (res.ok, res.first_bad_seq, res.checked) == (False, 41, 10)
    assert res.reason == "seq 41: hash mismatch, resource or hash was edited"
    sql(engine, "DELETE FROM audit WHERE seq = 30")
    with engine.connect() as conn:
        res = chain50.verify(conn, after=(30, base))
    assert (res.ok, res.first_bad_seq, res.checked) == (False, 30, 0)
    assert res.reason == ("seq 30: the row confirmed by the last verification is gone or changed")


@dataclass
class _Ctx:
    """What ChainWatch reads of a NodeContext: a clock, the store's read(), the chain."""

    engine: Engine
    audit: AuditChain
    clock: list[datetime] = field(default_factory=lambda: [BASE])
    reads: int = 0  # read transactions opened

    def now(self) -> datetime:
        return self.clock[0]

    @property
    def store(self) -> _Ctx:
        return self

    @contextmanager
    def read(self):  # type: ignore[no-untyped-def]
        self.reads += 1
        with self.engine.connect() as conn:
            yield conn


@pytest.mark.parametrize("chunk", [3, VERIFY_CHUNK])
def test_watch_runs_full_then_incremental_then_full_again(engine, key, chunk):
    chain = AuditChain(NODE, key, checkpoint_every=10)
    fill(engine, chain, 25)
    ctx = _Ctx(engine, chain)
    watch = ChainWatch(ctx, lambda conn: [key.public_key()], full_every_s=300, chunk=chunk)
    first = watch.check()
    assert ctx.reads == math.ceil(25 / chunk) + 1  # a read a chunk, one for the anchor
    assert (
        first.ok,
        first.ran_full,
        first.full_at,
        first.full_checked,
        first.new_checked,
        first.head_seq,
        first.checkpoints_checked,
    ) == (True, True, BASE, 25, 0, 25, 2)
    with engine.begin() as conn:
        chain.append(conn, [entry(26 + i) for i in range(7)])
    ctx.clock[0] = BASE + timedelta(seconds=60)
    ctx.reads = 0
    second = watch.check()
    assert ctx.reads == math.ceil(7 / chunk) + 1
    assert (
        second.ok,
        second.ran_full,
        second.full_at,
        second.full_checked,
        second.new_checked,
        second.head_seq,
        second.checkpoints_checked,
    ) == (True, False, BASE, 25, 7, 32, 3)
    # an old row edited after the full run: unseen until the next full run, which catches it
    sql(engine, "UPDATE audit SET resource = replace(resource, 'pkt-3', 'pkt-9') WHERE seq = 3")
    assert watch.check().ok
    forced = watch.check(full=True)
    assert (forced.ok, forced.ran_full, forced.first_bad_seq, forced.full_at) == (
        False,
        True,
        3,
        None,
    )
    # a failed run is never a base: the next look recomputes everything again
    again = watch.check()
    assert (again.ok, again.ran_full, again.first_bad_seq) == (False, True, 3)


@pytest.mark.parametrize("chunk", [2, VERIFY_CHUNK])
def test_watch_reads_only_what_was_appended_since_its_last_check(engine, key, chunk):
    """Each check that holds moves the confirmed row forward: the next reads only newer rows
    (not all since the full run), and rows it confirmed are left to the next full run."""
    chain = AuditChain(NODE, key, checkpoint_every=10)
    fill(engine, chain, 12)
    ctx = _Ctx(engine, chain)
    watch = ChainWatch(ctx, lambda conn: [key.public_key()], full_every_s=300, chunk=chunk)
    assert watch.check().ran_full
    with engine.begin() as conn:
        chain.append(conn, [entry(13 + i) for i in range(5)])
    ctx.clock[0] = BASE + timedelta(seconds=30)
    first = watch.check()
    assert (first.ok, first.ran_full, first.full_checked, first.new_checked, first.head_seq) == (
        True,
        False,
        12,
        5,
        17,
    )
    # a row the first incremental check confirmed is edited, then 4 rows are appended
    sql(engine, "UPDATE audit SET resource = replace(resource, 'pkt-14', 'pkt-99') WHERE seq = 14")
    with engine.begin() as conn:
        chain.append(conn, [entry(18 + i) for i in range(4)])
    ctx.clock[0] = BASE + timedelta(seconds=60)
    second = watch.check()  # reads seq 18-21 only (counts: 5 + 4 since the full run)
    assert (second.ok, second.ran_full, second.new_checked, second.head_seq) == (
        True,
        False,
        9,
        21,
    )
    # the row confirmed last is pinned: changing it is seen at once
    sql(engine, "UPDATE audit SET hash = 'x' || substr(hash, 2) WHERE seq = 21")
    third = watch.check()
    assert (third.ok, third.ran_full, third.first_bad_seq) == (False, False, 21)
    forced = watch.check(full=True)  # the full run finds the first edit
    assert (forced.ok, forced.ran_full, forced.first_bad_seq) == (False, True, 14)


def test_watch_recomputes_when_the_full_run_is_old(engine, key):
    chain = AuditChain(NODE, key, checkpoint_every=10)
    fill(engine, chain, 12)
    ctx = _Ctx(engine, chain)
    watch = ChainWatch(ctx, lambda conn: [key.public_key()], full_every_s=300)
    assert watch.check().ran_full
    ctx.clock[0] = BASE + timedelta(seconds=299)
    assert not watch.check().ran_full
    ctx.clock[0] = BASE + timedelta(seconds=300)
    late = watch.check()
    assert (late.ran_full, late.full_at, late.full_checked) == (
        True,
        BASE + timedelta(seconds=300),
        12,
    )


def test_a_scheduled_full_run_is_paced_and_one_asked_for_is_not(engine, key, monkeypatch):
    """The node's scheduled full run sleeps between chunks as long as each chunk took (it
    shares the GIL with intake and delivery); the auditor's "verify now" does not; neither
    sleeps after the last chunk."""
    import bridge.audit.chain as chain_module

    slept: list[float] = []
    monkeypatch.setattr(chain_module.time, "sleep", slept.append)
    chain = AuditChain(NODE, key, checkpoint_every=10)
    fill(engine, chain, 25)
    ctx = _Ctx(engine, chain)
    watch = ChainWatch(ctx, lambda conn: [key.public_key()], full_every_s=300, chunk=10)
    first = watch.check()  # scheduled: rows 1-10, 11-20, 21-25
    assert (first.ok, first.ran_full, first.full_checked) == (True, True, 25)
    assert len(slept) == 2 and all(s > 0 for s in slept)
    slept.clear()
    asked = watch.check(full=True)
    assert (asked.ok, asked.ran_full, asked.full_checked, slept) == (True, True, 25, [])
    with engine.begin() as conn:
        chain.append(conn, [entry(26 + i) for i in range(15)])
    ctx.clock[0] = BASE + timedelta(seconds=30)
    new = watch.check()  # incremental: rows 26-35, 36-40, not paced
    assert (new.ok, new.ran_full, new.new_checked, slept) == (True, False, 15, [])


# -- the whole chain in chunks of short read transactions (verify_chunked) ---------------------


@pytest.fixture
def store(dsn: str) -> Iterator[Store]:
    """A node's real store (SQLite in WAL mode, or PostgreSQL): ``read`` is the factory the
    node gives ``verify_chunked``."""
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def append(store: Store, chain: AuditChain, first: int, n: int) -> None:
    with store.write() as conn:
        chain.append(conn, [entry(first + i) for i in range(n)])


def head_hash(store: Store, seq: int) -> str:
    with store.read() as conn:
        return str(conn.execute(text("SELECT hash FROM audit WHERE seq = :s"), {"s": seq}).one()[0])


def test_chunks_each_read_in_a_transaction_of_their_own(store, key):
    chain = AuditChain(NODE, key, checkpoint_every=10)
    reads = Reads(store.read)
    empty = chain.verify_chunked(reads, chunk=3)
    assert (empty.ok, empty.checked, empty.last_seq, empty.last_hash, reads.opened) == (
        True,
        0,
        0,
        GENESIS_HASH,
        1,
    )
    append(store, chain, 1, 50)
    for chunk, transactions in [(1, 50), (7, 8), (10, 5), (49, 2), (50, 1), (51, 1), (2000, 1)]:
        reads = Reads(store.read)
        res = chain.verify_chunked(reads, [key.public_key()], chunk=chunk)
        assert (res.ok, res.checked, res.checkpoints_checked, res.last_seq, res.at_end) == (
            True,
            50,
            5,
            50,
            True,
        ), chunk
        assert res.last_hash == head_hash(store, 50)
        assert (reads.opened, reads.in_transaction) == (transactions, [True] * transactions)
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chain.verify_chunked(store.read, chunk=0)


def test_one_chunk_stops_before_the_end_and_says_so(store, key):
    chain = AuditChain(NODE, key, checkpoint_every=10)
    append(store, chain, 1, 25)
    with store.read() as conn:
        first = chain.verify(conn, limit=10)
        rest = chain.verify(conn, after=(first.last_seq, first.last_hash), limit=20)
        with pytest.raises(ValueError, match="limit must be at least 1"):
            chain.verify(conn, limit=0)
    assert (first.ok, first.checked, first.last_seq, first.checkpoints_checked, first.at_end) == (
        True,
        10,
        10,
        1,
        False,
    )
    assert (rest.ok, rest.checked, rest.last_seq, rest.checkpoints_checked, rest.at_end) == (
        True,
        15,
        25,
        1,
        True,
    )


def test_rows_appended_between_chunks_are_verified_and_counted(store, key):
    chain = AuditChain(NODE, key, checkpoint_every=10)
    append(store, chain, 1, 50)

    def before(n: int) -> None:
        if n == 3:  # chunks 1-10 and 11-20 are done
            append(store, chain, 51, 15)  # a checkpoint at 60

    reads = Reads(store.read, before)
    res = chain.verify_chunked(reads, [key.public_key()], chunk=10)
    assert (res.ok, res.checked, res.last_seq, res.checkpoints_checked, reads.opened) == (
        True,
        65,
        65,
        6,
        7,
    )
    assert res.last_hash == head_hash(store, 65)


@pytest.mark.parametrize(
    ("edit", "bad", "reason", "checked"),
    [
        # the row the chunk before confirmed (the next chunk continues from it)
        (
            "UPDATE audit SET hash = 'f' || substr(hash, 2) WHERE seq = 20",
            20,
            "seq 20: gone or changed while the chain was being verified",
            20,
        ),
        (
            "DELETE FROM audit WHERE seq = 20",
            20,
            "seq 20: gone or changed while the chain was being verified",
            20,
        ),
        # rows no chunk has read yet
        (
            "UPDATE audit SET resource = replace(resource, 'pkt-35', 'pkt-53') WHERE seq = 35",
            35,
            "seq 35: hash mismatch, resource or hash was edited",
            34,
        ),
        ("DELETE FROM audit WHERE seq = 35", 36, "seq 36: follows seq 34, row 35 missing", 34),
    ],
    ids=["border-edited", "border-deleted", "ahead-edited", "ahead-deleted"],
)
def test_a_row_edited_or_deleted_between_chunks_is_caught(store, key, edit, bad, reason, checked):
    chain = AuditChain(NODE, key, checkpoint_every=10)
    append(store, chain, 1, 50)
    confirmed = head_hash(store, 20)

    def before(n: int) -> None:
        if n == 3:  # chunks 1-10 and 11-20 are done
            with store.write() as conn:
                conn.execute(text(edit))

    res = chain.verify_chunked(Reads(store.read, before), [key.public_key()], chunk=10)
    assert (res.ok, res.first_bad_seq, res.reason, res.checked) == (False, bad, reason, checked)
    # the last row confirmed, and the checkpoints 10 and 20 (30 too once seq 30 was read)
    last = 20 if bad == 20 else 34
    assert (res.last_seq, res.checkpoints_checked) == (last, 2 if bad == 20 else 3)
    if bad == 20:
        assert res.last_hash == confirmed


def test_checkpoints_at_chunk_borders_are_checked_once(engine, key):
    chain = AuditChain(NODE, key, checkpoint_every=5)
    fill(engine, chain, 40)  # checkpoints 5, 10, ... 40: every chunk of 5 ends at one
    reads = Reads(engine.connect)
    res = chain.verify_chunked(reads, chunk=5)
    assert (res.ok, res.checked, res.checkpoints_checked, reads.opened) == (True, 40, 8, 8)
    # a checkpoint that disagrees with the row at a border, and one at the first row of a chunk
    sql(engine, "UPDATE audit_checkpoint SET hash = :h WHERE seq = 25", h="0" * 64)
    res = chain.verify_chunked(Reads(engine.connect), chunk=5)
    assert (res.ok, res.first_bad_seq, res.checkpoints_checked) == (False, 25, 4)
    assert res.reason == "checkpoint at seq 25: hash differs from the row's"
    res = chain.verify_chunked(Reads(engine.connect), chunk=4)  # 25 is the first row of 25-28
    assert (res.ok, res.first_bad_seq, res.checked) == (False, 25, 24)


def test_truncated_tail_is_reported_in_chunks(store, key):
    chain = AuditChain(NODE, key, checkpoint_every=1000)
    append(store, chain, 1, 45)
    with store.write() as conn:
        chain.checkpoint(conn)  # as on shutdown: a checkpoint at 45
    with store.write() as conn:
        conn.execute(text("DELETE FROM audit WHERE seq = 45"))
    for chunk in (1, 4, 11, 44, 45, 1000):  # 44 = 4 x 11: the last chunk full, the log ends
        res = chain.verify_chunked(Reads(store.read), chunk=chunk)
        assert (res.ok, res.first_bad_seq, res.checked, res.last_seq) == (False, 45, 44, 44)
        assert res.reason == "truncated: checkpoint at seq 45 but the log ends at seq 44"


def test_a_checkpoint_committed_after_the_last_chunk_read_its_rows_is_no_cut_tail(store, key):
    """PostgreSQL reads each statement at a snapshot of its own: rows and their checkpoint
    committed after the last chunk's rows were read show in its query of the checkpoints past
    the end. The log went on: a later chunk verifies them (SQLite's chunk reads one snapshot
    and sees neither; the next run does)."""
    chain = AuditChain(NODE, key, checkpoint_every=10)
    append(store, chain, 1, 50)
    appended: list[int] = []

    def append_after_rows(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        if "prev_hash" in statement and not appended:  # the rows of the chunk, now being read
            append(store, chain, 51, 10)  # rows 51-60 and the checkpoint at 60
            appended.append(60)

    @contextmanager
    def open_read():  # type: ignore[no-untyped-def]
        with store.read() as conn:
            event.listen(conn, "after_cursor_execute", append_after_rows)
            yield conn

    res = chain.verify_chunked(open_read, [key.public_key()], chunk=100)
    assert appended == [60]
    seen = 50 if store.is_sqlite else 60
    assert (res.ok, res.first_bad_seq, res.checked, res.last_seq) == (True, None, seen, seen)
    again = chain.verify_chunked(Reads(store.read), [key.public_key()], chunk=100)
    assert (again.ok, again.checked, again.checkpoints_checked) == (True, 60, 6)


def test_chunked_after_answers_as_verify_after(engine, chain50):
    base = _after(engine, chain50, 30)
    with engine.connect() as conn:
        confirmed = conn.execute(text("SELECT hash FROM audit WHERE seq = 30")).scalar_one()
    reads = Reads(engine.connect)
    res = chain50.verify_chunked(reads, after=(30, confirmed), chunk=3)
    assert res == base
    assert (res.ok, res.checked, res.checkpoints_checked, reads.opened) == (True, 20, 2, 7)
    sql(engine, "UPDATE audit SET resource = replace(resource, 'pkt-41', 'pkt-14') WHERE seq = 41")
    res = chain50.verify_chunked(Reads(engine.connect), after=(30, confirmed), chunk=3)
    assert (res.ok, res.first_bad_seq, res.checked) == (False, 41, 10)
    assert res.reason == "seq 41: hash mismatch, resource or hash was edited"
    sql(engine, "DELETE FROM audit WHERE seq = 30")
    res = chain50.verify_chunked(Reads(engine.connect), after=(30, confirmed), chunk=3)
    assert (res.ok, res.first_bad_seq, res.checked) == (False, 30, 0)
    assert res.reason == "seq 30: the row confirmed by the last verification is gone or changed"


@dataclass
class _StoreCtx:
    """A NodeContext for ChainWatch on a real Store; ``during`` runs once, right after the
    first statement that reads chain rows has executed (a commit while a check reads)."""

    node_store: Store
    audit: AuditChain
    during: Callable[[], None] | None = None

    def now(self) -> datetime:
        return BASE

    @property
    def store(self) -> _StoreCtx:
        return self

    @contextmanager
    def read(self):  # type: ignore[no-untyped-def]
        def rows_read(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
            if "prev_hash" in statement and self.during is not None:
                during, self.during = self.during, None
                during()

        with self.node_store.read() as conn:
            event.listen(conn, "after_cursor_execute", rows_read)
            yield conn


def test_watch_checks_the_anchor_after_the_chunks_in_a_read_of_its_own(store, key):
    """A checkpoint committed while the check reads moves the node's latest anchor past what
    the chunks read; the anchor check reads after them and finds its row (in the chunks' one
    read transaction SQLite's snapshot lacked it: a false 'truncated')."""
    chain = AuditChain(NODE, key, checkpoint_every=10)
    append(store, chain, 1, 50)
    assert chain.latest is not None and chain.latest.seq == 50
    ctx = _StoreCtx(store, chain, during=lambda: append(store, chain, 51, 10))
    watch = ChainWatch(ctx, lambda conn: [key.public_key()], full_every_s=300)  # type: ignore[arg-type]
    res = watch.check()
    assert ctx.during is None and chain.latest.seq == 60
    assert (res.ok, res.first_bad_seq, res.reason) == (True, None, None)
    assert res.head_seq == (50 if store.is_sqlite else 60)
    # the anchor check still catches a tail cut with its checkpoints under the running node
    with store.write() as conn:
        conn.execute(text("DELETE FROM audit_checkpoint WHERE seq > 50"))
        conn.execute(text("DELETE FROM audit WHERE seq > 55"))
    cut = watch.check(full=True)
    assert (cut.ok, cut.first_bad_seq) == (False, 56)
    assert cut.reason is not None and cut.reason.startswith(
        "truncated: the node's latest anchor records seq 60"
    )
