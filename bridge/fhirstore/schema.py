"""Bring an existing FHIR store up to the current schema when a node opens it, once.

``SQLModel.metadata.create_all`` makes missing tables (with their indexes) but never adds an
index to a table that already exists. Stores made before ``fhir_token`` and the page-order
indexes (see ``tables``) get, in one transaction on open:

1. ``ix_fhir_type_newest`` and ``ix_fhir_type_patient_newest`` (``IF NOT EXISTS``), and the
   indexes they replace dropped;
2. ``fhir_token`` filled from every stored resource's identifiers (the backfill), and
   ``fhir_date`` from every Encounter's period (schema 3); schema 4: the codes and references
   of ``store.CODED``, the dates of ``store.DATED``, ``fhir_string`` from ``store.STRINGS``;
3. schema 5: ``ix_fhir_type_patient_hash`` (rtype, patient_hash, ...) instead of
   ``ix_fhir_resource_patient_hash`` on the hash alone (an index, no backfill: a store at 4
   is not read through);
4. the marker ``node_state['schema.fhirstore'] = SCHEMA_VERSION``.

With the marker in place, opening costs one primary-key read. Several processes opening one
PostgreSQL store at once: the marker row is inserted first, so the second waits on it and then
finds the work done (its insert fails and it rolls back).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, delete, insert, select, text, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.schema import CreateIndex

from bridge.fhirstore.store import CODED, DATED, STRINGS, date_rows, string_rows, token_rows
from bridge.fhirstore.tables import (
    FHIR_DATE,
    FHIR_RESOURCE,
    FHIR_STRING,
    FHIR_TOKEN,
    IX_NEWEST,
    IX_PATIENT_HASH,
    IX_PATIENT_NEWEST,
    OLD_INDEXES,
)
from bridge.store import state
from bridge.store.tables import NODE_STATE

if TYPE_CHECKING:
    from bridge.store.db import Store

log = logging.getLogger(__name__)

MARKER = "schema.fhirstore"
#: 2: fhir_token + page-order indexes; 3: Encounter class tokens, fhir_date; 4: codes, reference
#: tokens, Observation/DiagnosticReport/Patient dates, fhir_string (the search parameters of #19);
#: 5: ix_fhir_type_patient_hash replaces the index on patient_hash alone (issue 17)
SCHEMA_VERSION = "5"
#: the last version whose upgrade rewrote the side tables (later ones only add indexes)
BACKFILLED_AT = 4
BACKFILL_CHUNK = 5_000
T = FHIR_RESOURCE


def upgrade(store: Store) -> int:
    """Upgrade the store if it has not been; the number of token rows backfilled (0 if none)."""
    with store.read() as conn:
        if state.get(conn, MARKER) == SCHEMA_VERSION:
            return 0
    try:
        with store.write() as conn:
            have = state.get(conn, MARKER)
            if have == SCHEMA_VERSION:
                return 0
            now = datetime.now(UTC)
            if have is None:
                conn.execute(
                    insert(NODE_STATE).values(key=MARKER, value=SCHEMA_VERSION, updated_at=now)
                )
            else:
                state.put(conn, MARKER, SCHEMA_VERSION, now)
            for ix in (IX_NEWEST, IX_PATIENT_NEWEST, IX_PATIENT_HASH):
                conn.execute(CreateIndex(ix, if_not_exists=True))
            for name in OLD_INDEXES:
                conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
            n = 0
            if have is None or not have.isdigit() or int(have) < BACKFILLED_AT:
                n = backfill_tokens(conn)
                backfill_dates(conn)
                backfill_strings(conn)
    except IntegrityError:
        return 0  # another process inserted the marker and did the work
    if n:
        log.info(
            "fhir store upgraded to schema %s: %d identifier tokens backfilled", SCHEMA_VERSION, n
        )
    return n


def backfill_dates(conn: Connection) -> int:
    """(Re)make every ``fhir_date`` row from the stored bodies of the types that have one."""
    return _backfill(conn, FHIR_DATE, DATED, date_rows)


def backfill_strings(conn: Connection) -> int:
    """(Re)make every ``fhir_string`` row (the names of ``STRINGS`` types)."""
    return _backfill(conn, FHIR_STRING, STRINGS, string_rows)


def _backfill(conn: Connection, table: Any, types: Any, rows_of: Any) -> int:
    conn.execute(delete(table))
    made = 0
    for rtype in types:
        after: str | None = None
        while True:
            stmt = select(T.c.id, T.c.body).where(T.c.rtype == rtype)
            if after is not None:
                stmt = stmt.where(T.c.id > after)
            chunk = conn.execute(stmt.order_by(T.c.id).limit(BACKFILL_CHUNK)).all()
            if not chunk:
                break
            rows = [d for r in chunk for d in rows_of(orjson.loads(r.body))]
            if rows:
                conn.execute(insert(table), rows)
                made += len(rows)
            after = chunk[-1].id
    return made


def backfill_tokens(conn: Connection) -> int:
    """(Re)make every ``fhir_token`` row from the stored bodies, in chunks by primary key."""
    conn.execute(delete(FHIR_TOKEN))
    after: tuple[str, str] | None = None
    made = 0
    while True:
        stmt = select(T.c.rtype, T.c.id, T.c.body).where(
            T.c.identifiers.is_not(None) | T.c.rtype.in_(list(CODED))
        )
        if after is not None:
            stmt = stmt.where(tuple_(T.c.rtype, T.c.id) > tuple_(*after))
        chunk = conn.execute(stmt.order_by(T.c.rtype, T.c.id).limit(BACKFILL_CHUNK)).all()
        if not chunk:
            return made
        rows = [tok for r in chunk for tok in token_rows(orjson.loads(r.body))]
        if rows:
            conn.execute(insert(FHIR_TOKEN), rows)
            made += len(rows)
        after = (chunk[-1].rtype, chunk[-1].id)


HISTORY_MARKER = "schema.fhirhistory"
#: 1: ix_fhir_history_type_seq (GET /fhir/Type/_history); 2: ix_fhir_history_rtype dropped (the
#: index on rtype alone, which (rtype, seq) covers: one B-tree fewer per version written)
HISTORY_VERSION = "2"
HISTORY_OLD_INDEXES = ("ix_fhir_history_rtype",)


def upgrade_history(store: Store) -> None:
    """The history indexes of older stores (versions were always kept: nothing to backfill)."""
    from bridge.fhirstore.tables import IX_HISTORY_TYPE_SEQ

    with store.read() as conn:
        if state.get(conn, HISTORY_MARKER) == HISTORY_VERSION:
            return
    try:
        with store.write() as conn:
            have = state.get(conn, HISTORY_MARKER)
            if have == HISTORY_VERSION:
                return
            now = datetime.now(UTC)
            if have is None:
                conn.execute(
                    insert(NODE_STATE).values(
                        key=HISTORY_MARKER, value=HISTORY_VERSION, updated_at=now
                    )
                )
            else:
                state.put(conn, HISTORY_MARKER, HISTORY_VERSION, now)
            conn.execute(CreateIndex(IX_HISTORY_TYPE_SEQ, if_not_exists=True))
            for name in HISTORY_OLD_INDEXES:
                conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
    except IntegrityError:
        return  # another process did it
