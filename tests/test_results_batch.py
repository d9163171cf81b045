"""Result packets of one dispatcher round are stored together, not a transaction each (issue 17,
item 2).

In process, on SQLite and PostgreSQL: a scaffolded alliance, core's NodeContext, packets sealed
by chc and taken in by core's real ``Intake``, delivered by the real ``Dispatcher`` with the
results inbox as its batched ``result.`` hook (as ``bridge.node.Node`` wires it) and the spool
handler. A transaction may take packets for ``HOLD_S``; here it is long enough for a whole
round, except where a test sets it to nothing. Checked where it lands, field by field:
``result_packet``, the FHIR rows and their write order (``fhir_history.seq``), the inbox
states, the quarantine, the audit rows, the spool files, and how many write transactions a
round took (``Store.write`` counted on the store).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import insert, select, update

from bridge import faults
from bridge.api import fhir_api
from bridge.api.fhir_search import parse_query
from bridge.audit.tables import AuditRecord
from bridge.config.loader import load_node
from bridge.config.scaffold import write_alliance
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.dispatcher import BatchHook, Dispatcher, _delivery
from bridge.delivery.handlers import load_handlers
from bridge.fhirstore import store
from bridge.fhirstore.tables import FHIR_HISTORY, FHIR_RESOURCE
from bridge.gateway.intake import Intake
from bridge.privacy import patient_hash
from bridge.referral.tables import REFERRAL
from bridge.results import inbox
from bridge.results.inbox import ResultsInbox
from bridge.results.recognition import results_for
from bridge.results.tables import RESULT_PACKET
from bridge.store.tables import INBOX, QUARANTINE
from tests.factory import bundle, observation

AUDIT = AuditRecord.__table__  # type: ignore[attr-defined]
NID = "110102195003151234"
MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core"},
    {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
]
RULES = [{"from": "chc", "to": "core", "kinds": ["result.lab"]}]


class Site:
    """core (the receiver, with its dispatcher; its store on ``dsn_ref`` if given) and chc
    (the sender's key)."""

    def __init__(self, root: Path, dsn_ref: str = "") -> None:
        files = write_alliance(root / "alliance", MEMBERS, RULES)
        if dsn_ref:
            text = files["core"].read_text()
            files["core"].write_text(
                text.replace("[keys]", f'storage_dsn = "{dsn_ref}"\n[keys]', 1)
            )
        self.core = NodeContext.open(load_node(files["core"]))
        self.chc = NodeContext.open(load_node(files["chc"]), create=False)
        self.results = ResultsInbox(self.core)
        self.dispatcher = Dispatcher(
            self.core,
            load_handlers({"*": "spool"}, {"spool_dir": self.core.plan.delivery.spool_dir}),
            hooks={"result.": BatchHook(self.results.apply_many)},
        )
        self.writes = 0
        store, original = self.core.store, self.core.store.write

        @contextmanager
        def counted() -> Iterator[Any]:
            self.writes += 1
            with original() as conn:
                yield conn

        store.write = counted  # type: ignore[method-assign]

    def receive(self, packets: list[tuple[str, int, dict[str, Any]]]) -> list[str]:
        """(thread, seq, bundle) sealed by chc and taken in by core's intake, in this order;
        returns the packet ids."""
        key = load_signing_key(self.chc.plan.keys.signing, self.chc.plan.keys.passphrase)
        pub = self.core.plan.directory["core"].encryption_keys[0]
        frames = [
            env.seal(
                orjson.dumps(b),
                sender="chc",
                recipient="core",
                kind="result.lab",
                thread=thread,
                seq=seq,
                signing_key=key,
                recipient_key=pub,
            )
            for thread, seq, b in packets
        ]
        ids = [env.decode(f, max_body=1 << 30).header.id for f in frames]
        receipts = Intake(self.core).receive(frames)
        verify_keys = {m: p.signing_keys for m, p in self.core.plan.directory.items()}
        got = [env.verify_receipt(r, lambda m: verify_keys[m]) for r in receipts]
        assert [(r["packet"], r["status"]) for r in got] == [(i, "accepted") for i in ids]
        return ids

    def round(self) -> tuple[int, int]:
        """One dispatcher round: (packets handed over, write transactions it took)."""
        before = self.writes
        n = self.dispatcher.run_once()
        return n, self.writes - before

    def rows(self, stmt: Any) -> list[Any]:
        with self.core.store.read() as conn:
            return list(conn.execute(stmt).all())

    def stored(self) -> dict[str, Any]:
        """packet id -> its result_packet row."""
        return {r.packet_id: r for r in self.rows(select(RESULT_PACKET))}

    def states(self, ids: list[str]) -> list[tuple[str, int]]:
        by_id = {
            r.packet_id: (r.state, r.attempts)
            for r in self.rows(select(INBOX.c.packet_id, INBOX.c.state, INBOX.c.attempts))
        }
        return [by_id[i] for i in ids]

    def audit(self, action: str) -> list[str]:
        return [
            r.packet_id
            for r in self.rows(
                select(AUDIT.c.packet_id).where(AUDIT.c.action == action).order_by(AUDIT.c.seq)
            )
        ]

    def observations(self) -> dict[str, Any]:
        """Observation id -> (its first history seq, body) as stored at core."""
        first = {
            r.id: r.seq
            for r in self.rows(
                select(FHIR_HISTORY.c.id, FHIR_HISTORY.c.seq).where(
                    FHIR_HISTORY.c.rtype == "Observation", FHIR_HISTORY.c.version == 1
                )
            )
        }
        return {
            r.id: (first[r.id], orjson.loads(r.body))
            for r in self.rows(
                select(FHIR_RESOURCE.c.id, FHIR_RESOURCE.c.body).where(
                    FHIR_RESOURCE.c.rtype == "Observation"
                )
            )
        }

    def spool(self) -> dict[str, bytes]:
        """packet id -> the bytes of its spool file."""
        root = Path(self.core.plan.delivery.spool_dir)
        return {p.stem.split("-", 1)[1]: p.read_bytes() for p in root.rglob("*.json")}

    def close(self) -> None:
        self.core.store.dispose()
        self.chc.store.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Site]:
    # a transaction takes every packet of these small rounds, however loaded the machine is
    monkeypatch.setattr(inbox, "HOLD_S", 60.0)
    monkeypatch.setattr(inbox, "HOLD_PG_S", 60.0)
    ref = ""
    if request.param == "postgres":
        monkeypatch.setenv("HUTONG_TEST_CORE_DSN", str(request.getfixturevalue("pg_db")))
        ref = "env:HUTONG_TEST_CORE_DSN"
    s = Site(tmp_path, ref)
    yield s
    s.close()


def lab(i: int) -> dict[str, Any]:
    """A result bundle: the sender's Patient and two Observations (about ``Patient/<its id>``)
    whose values carry ``i``."""
    b = bundle(n_obs=2, national_id=NID, marker=f"lab-{i}")
    ref = f"Patient/{b['entry'][0]['resource']['id']}"
    for e in b["entry"][1:]:
        e["resource"]["subject"] = {"reference": ref}
    b["entry"][1]["resource"]["valueQuantity"]["value"] = float(i)
    b["entry"][2]["resource"]["valueQuantity"]["value"] = float(i) + 0.5
    return b


def no_results(i: int) -> dict[str, Any]:
    """A result packet that carries no DiagnosticReport, Observation or ImagingStudy."""
    b = lab(i)
    b["entry"] = b["entry"][:1]
    return b


def check_stored(site: Site, ids: list[str], bundles: list[dict[str, Any]]) -> None:
    """Each packet's result_packet row and its Observations, field by field, under core's one
    Patient of the hash. The first packet registered the sender's Patient (none was known
    here) and keeps its references as sent; every later one is named to that record."""
    phash = patient_hash(site.core.plan.patient_hash_key, NID)
    stored = site.stored()
    for pid in ids:
        row = stored[pid]
        assert (row.sender, row.kind, row.thread, row.patient_hash) == (
            "chc",
            "result.lab",
            None,  # no referral known for the thread here
            phash,
        )
    patients = site.rows(
        select(FHIR_RESOURCE.c.id, FHIR_RESOURCE.c.patient_hash).where(
            FHIR_RESOURCE.c.rtype == "Patient"
        )
    )
    assert [(p.id, p.patient_hash) for p in patients] == [
        (bundles[0]["entry"][0]["resource"]["id"], phash)
    ]
    mine = f"Patient/{patients[0].id}"
    obs = site.observations()
    for k, b in enumerate(bundles):
        for o in (e["resource"] for e in b["entry"][1:]):
            _, got = obs[o["id"]]
            assert got["code"] == o["code"]
            assert got["valueQuantity"] == o["valueQuantity"]
            assert got["effectiveDateTime"] == o["effectiveDateTime"]
            assert got.get("note") == o.get("note")  # the marker, on the first one
            assert got["subject"] == (o["subject"] if k == 0 else {"reference": mine})
            assert got["meta"]["versionId"] == "1"


def first_seq(site: Site, b: dict[str, Any]) -> int:
    obs = site.observations()
    return min(obs[e["resource"]["id"]][0] for e in b["entry"][1:])


def test_a_round_of_two_threads_is_stored_once_each_in_order_in_two_commits(site: Site) -> None:
    bundles = [lab(i) for i in range(6)]
    # interleaved as they arrive: t1 seq 1, t2 seq 1, t1 seq 2, ...
    order = [("t1", 1), ("t2", 1), ("t1", 2), ("t2", 2), ("t1", 3), ("t2", 3)]
    ids = site.receive([(t, s, b) for (t, s), b in zip(order, bundles, strict=True)])
    assert site.round() == (6, 2)  # the 6 packets' results in one commit, the round's in one
    assert site.states(ids) == [("delivered", 1)] * 6
    assert sorted(site.stored()) == sorted(ids)
    check_stored(site, ids, bundles)
    assert [site.stored()[i].resources for i in ids] == [3, 2, 2, 2, 2, 2]
    for thread in ("t1", "t2"):  # each thread's packets written in its seq order
        mine = [b for (t, _), b in zip(order, bundles, strict=True) if t == thread]
        seqs = [first_seq(site, b) for b in mine]
        assert seqs == sorted(seqs)
    assert site.audit("results") == ids  # one row a packet, in the order applied
    assert site.audit("delivered") == ids
    spool = site.spool()
    assert {i: orjson.loads(spool[i]) for i in ids} == dict(zip(ids, bundles, strict=True))
    assert site.round() == (0, 0)  # nothing left: no transaction at all


def test_a_bad_packet_fails_alone_and_its_thread_waits_behind_it(site: Site) -> None:
    bundles = [lab(0), no_results(1), lab(2), lab(3), lab(4), lab(5)]
    order = [("t1", 1), ("t1", 2), ("t1", 3), ("t2", 1), ("t2", 2), ("t2", 3)]
    ids = site.receive([(t, s, b) for (t, s), b in zip(order, bundles, strict=True)])
    assert site.round() == (4, 2)
    # t1 seq 2 is refused for good (dead letter); t1 seq 3 was not stored past it this round
    assert site.states(ids) == [
        ("delivered", 1),
        ("failed", 1),
        ("received", 0),
        ("delivered", 1),
        ("delivered", 1),
        ("delivered", 1),
    ]
    assert sorted(site.stored()) == sorted([ids[0], *ids[3:]])
    q = site.rows(select(QUARANTINE))
    assert [(r.source, r.code, r.packet_id, r.kind, r.thread, r.sender) for r in q] == [
        ("delivery", "HT-FHIR-INVALID", ids[1], "result.lab", "t1", "chc")
    ]
    assert orjson.loads(q[0].raw) == bundles[1]
    assert site.audit("dead-lettered") == [ids[1]]
    # the thread moved on past the dead letter: seq 3 is stored and handed over next round
    assert site.round() == (1, 2)
    assert site.states(ids)[2] == ("delivered", 1)
    good = [i for k, i in enumerate(ids) if k != 1]
    assert sorted(site.stored()) == sorted(good)
    check_stored(site, good, [b for k, b in enumerate(bundles) if k != 1])
    assert first_seq(site, bundles[0]) < first_seq(site, bundles[2])
    assert site.audit("results") == [ids[0], *ids[3:], ids[2]]
    assert sorted(site.spool()) == sorted(good)


def test_a_packet_that_breaks_the_transaction_costs_only_itself(site: Site) -> None:
    """A packet whose writes fail inside the shared transaction (here: a stored body whose
    Observation id is not a string, which the store's write raises on) rolls the round's
    transaction back; the packets before it are applied again together, it alone, the rest
    together again, and only it fails and is retried."""
    bundles = [lab(i) for i in range(5)]
    order = [("t1", 1), ("t2", 1), ("t1", 2), ("t2", 2), ("t1", 3)]
    ids = site.receive([(t, s, b) for (t, s), b in zip(order, bundles, strict=True)])
    broken = copy.deepcopy(bundles[1])
    broken["entry"][1]["resource"]["id"] = ["not", "an", "id"]
    with site.core.store.write() as conn:  # as if stored so (the gateway would refuse it)
        conn.execute(
            update(INBOX).where(INBOX.c.packet_id == ids[1]).values(body=orjson.dumps(broken))
        )
    site.writes = 0
    # all 5 (rolled back at the 2nd), the 1st again, from the 2nd (rolled back at once: its
    # own error), the 3rd to 5th (t2 seq 2 not applied: behind its failed seq 1), the round's
    assert site.round() == (3, 5)
    states = site.states(ids)
    assert states[0] == states[2] == states[4] == ("delivered", 1)
    assert states[1] == ("received", 1)  # an unexpected error: ambiguous, retried with backoff
    assert states[3] == ("received", 0)  # waits behind it, untouched
    assert sorted(site.stored()) == sorted([ids[0], ids[2], ids[4]])
    check_stored(site, [ids[0], ids[2], ids[4]], [bundles[0], bundles[2], bundles[4]])
    assert site.audit("results") == [ids[0], ids[2], ids[4]]
    assert site.rows(select(QUARANTINE)) == []


def test_a_packet_that_does_not_decode_later_in_the_round_costs_only_itself(site: Site) -> None:
    """The results inbox reads ahead for a window of packets (their Bundles decoded first): a
    later packet whose Bundle cannot be taken apart (an entry that is not an object) is not
    the error of the packet being applied when the window was read; it breaks the
    transaction when its own turn comes, and only it fails and is retried."""
    bundles = [lab(i) for i in range(5)]
    order = [("t1", 1), ("t2", 1), ("t1", 2), ("t2", 2), ("t1", 3)]
    ids = site.receive([(t, s, b) for (t, s), b in zip(order, bundles, strict=True)])
    broken = copy.deepcopy(bundles[3])
    broken["entry"].append(5)
    with site.core.store.write() as conn:  # as if stored so (the gateway would refuse it)
        conn.execute(
            update(INBOX).where(INBOX.c.packet_id == ids[3]).values(body=orjson.dumps(broken))
        )
    site.writes = 0
    # all 5 (rolled back at the 4th), the first 3 again, from the 4th (rolled back at once:
    # its own error), the 5th, the round's
    assert site.round() == (4, 5)
    states = site.states(ids)
    assert [states[k] for k in (0, 1, 2, 4)] == [("delivered", 1)] * 4
    assert states[3] == ("received", 1)  # an unexpected error: ambiguous, retried with backoff
    good = [ids[k] for k in (0, 1, 2, 4)]
    assert sorted(site.stored()) == sorted(good)
    check_stored(site, good, [bundles[k] for k in (0, 1, 2, 4)])
    assert site.audit("results") == good
    assert site.rows(select(QUARANTINE)) == []


def test_a_crash_after_the_results_commit_stores_nothing_twice(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the round's results are committed and before anything is handed over or
    marked delivered (the fault suite does it with SIGKILL): the next round redelivers every
    packet, and the results inbox stores none of them again."""
    bundles = [lab(i) for i in range(4)]
    order = [("t1", 1), ("t1", 2), ("t2", 1), ("t2", 2)]
    ids = site.receive([(t, s, b) for (t, s), b in zip(order, bundles, strict=True)])

    class Killed(BaseException):
        pass

    kills = ["dispatcher.after_batch_applied"]  # once, as the SIGKILL the fault suite sends

    def point(name: str) -> None:
        if name in kills:
            kills.remove(name)
            raise Killed

    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(Killed):
        site.dispatcher.run_once()
    assert site.states(ids) == [("received", 0)] * 4
    assert sorted(site.stored()) == sorted(ids)
    before = site.observations()
    assert site.round() == (4, 2)
    assert site.states(ids) == [("delivered", 1)] * 4
    assert site.observations() == before  # no second version, no second copy
    assert sorted(site.stored()) == sorted(ids)
    assert site.audit("results") == ids  # stored once each
    assert site.audit("delivered") == ids
    check_stored(site, ids, bundles)
    assert sorted(site.spool()) == sorted(ids)


def test_a_packet_delivered_again_is_not_stored_again(site: Site) -> None:
    """The inbox alone (the dispatcher's hook): the same packet applied twice, alone and with
    a new one, gives the same event and writes nothing the second time."""
    ids = site.receive([("t1", 1, lab(0))])
    assert site.round() == (1, 2)
    (row,) = site.rows(select(INBOX).where(INBOX.c.packet_id == ids[0]))
    again = site.results.apply_many
    first = site.stored()[ids[0]]
    before = site.observations()
    patient = site.rows(select(FHIR_RESOURCE.c.id).where(FHIR_RESOURCE.c.rtype == "Patient"))
    new = site.receive([("t2", 1, lab(1))])
    (new_row,) = site.rows(select(INBOX).where(INBOX.c.packet_id == new[0]))
    writes = site.writes
    for got in (again([_delivery(row)]), again([_delivery(row), _delivery(new_row)])):
        ev = got[0]
        assert ev.packet == _delivery(row)
        assert ev.view is None
        assert ev.patient == f"Patient/{patient[0].id}"
        assert ev.bundle == orjson.loads(row.body)
    assert site.writes == writes + 2  # one transaction per call
    assert site.stored()[ids[0]] == first
    assert {k: v for k, v in site.observations().items() if k in before} == before
    assert site.audit("results") == [*ids, *new]  # the new one once, the old one not again


def test_a_transaction_holds_the_writer_about_hold_s(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no time to hold the writer, each transaction takes one packet (and commits): the
    intake never waits behind more than one; nothing changes in what is stored. (PostgreSQL's
    bound, ``HOLD_PG_S``, the same.)"""
    monkeypatch.setattr(inbox, "HOLD_S", 0.0)
    monkeypatch.setattr(inbox, "HOLD_PG_S", 0.0)
    bundles = [lab(i) for i in range(4)]
    order = [("t1", 1), ("t2", 1), ("t1", 2), ("t2", 2)]
    ids = site.receive([(t, s, b) for (t, s), b in zip(order, bundles, strict=True)])
    assert site.round() == (4, 4 + 1)
    assert site.states(ids) == [("delivered", 1)] * 4
    assert sorted(site.stored()) == sorted(ids)
    check_stored(site, ids, bundles)
    assert site.audit("results") == ids


def linked() -> dict[str, Any]:
    """A result bundle whose entries refer to each other by ``fullUrl`` only (as a FHIR
    transaction or collection Bundle commonly does): the Patient and two Observations by
    ``urn:uuid`` (the second Observation has no id at all), the DiagnosticReport by an absolute
    URL; the report also names a specimen by an urn that is no entry's and an order by
    ``Type/id``, neither of them in the bundle."""
    b = bundle(n_obs=1, national_id=NID, marker="linked")
    p = b["entry"][0]["resource"]
    first = b["entry"][1]["resource"]
    second = observation(1, f"urn:uuid:{p['id']}", value=9.4)
    second_url = f"urn:uuid:{second.pop('id')}"
    dr_id = str(uuid.uuid4())
    dr_url = f"https://lis.chc.example/fhir/DiagnosticReport/{dr_id}"
    report = {
        "resourceType": "DiagnosticReport",
        "id": dr_id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24323-8"}], "text": "生化"},
        "subject": {"reference": f"urn:uuid:{p['id']}"},
        "effectiveDateTime": "2026-11-20T08:30:00+08:00",
        "issued": "2026-11-20T10:00:00+08:00",
        "basedOn": [{"reference": "ServiceRequest/chc-order-1"}],
        "specimen": [{"reference": f"urn:uuid:{uuid.uuid4()}"}],
        "result": [{"reference": f"urn:uuid:{first['id']}"}, {"reference": second_url}],
    }
    b["entry"] += [
        {"fullUrl": second_url, "resource": second},
        {"fullUrl": dr_url, "resource": report},
    ]
    return b


def found(site: Site, rtype: str, patient: str) -> list[str]:
    """``<rtype>?patient=<patient>`` through the FHIR API's own parser and page: the ids."""
    with site.core.store.read() as conn:
        rows = fhir_api._page(conn, parse_query(rtype, [("patient", patient)], FHIR_RESOURCE))[0]
    return sorted(r.id for r in rows)


def check_linked(site: Site, b: dict[str, Any], mine: str) -> None:
    """The packet's resources as stored at core, their references to one another made the
    stored ``Type/id`` and the patient ``mine``; found by the patient's searches and shown
    with its values in the patient's results view."""
    first, second, report = (e["resource"] for e in b["entry"][1:])
    obs = {k: body for k, (_, body) in site.observations().items()}
    (second_id,) = set(obs) - {first["id"]}  # the id-less one got an id of its own
    assert obs[first["id"]]["subject"] == {"reference": mine}
    assert obs[first["id"]]["valueQuantity"] == first["valueQuantity"]
    assert obs[first["id"]]["note"] == [{"text": "linked"}]
    assert obs[second_id]["subject"] == {"reference": mine}
    assert obs[second_id]["valueQuantity"] == second["valueQuantity"]
    assert obs[second_id]["code"] == second["code"]
    (dr,) = site.rows(
        select(FHIR_RESOURCE.c.id, FHIR_RESOURCE.c.body, FHIR_RESOURCE.c.patient_hash).where(
            FHIR_RESOURCE.c.rtype == "DiagnosticReport"
        )
    )
    got = orjson.loads(dr.body)
    assert dr.id == report["id"]
    assert dr.patient_hash == patient_hash(site.core.plan.patient_hash_key, NID)
    assert got["subject"] == {"reference": mine}
    assert got["result"] == [
        {"reference": f"Observation/{first['id']}"},
        {"reference": f"Observation/{second_id}"},
    ]
    assert got["basedOn"] == report["basedOn"]  # not in the bundle: as sent
    assert got["specimen"] == report["specimen"]
    assert got["code"] == report["code"]
    assert found(site, "Observation", mine) == sorted([first["id"], second_id])
    assert found(site, "DiagnosticReport", mine) == [report["id"]]
    with site.core.store.read() as conn:
        items, total, _ = results_for(conn, dr.patient_hash, node_id="core")
    assert total == 1
    assert items[0]["report"] == f"DiagnosticReport/{report['id']}"
    assert [(o["id"], o["status"]) for o in items[0]["observations"]] == [
        (first["id"], "final"),
        (second_id, "final"),
    ]


def test_references_by_full_url_are_stored_as_the_entries_type_and_id(site: Site) -> None:
    """No patient known here: the sender's Patient is registered, and every reference that
    names an entry's fullUrl (urn:uuid or absolute) becomes that entry's stored Type/id."""
    b = linked()
    (pid,) = site.receive([("t1", 1, b)])
    assert site.round() == (1, 2)
    assert site.states([pid]) == [("delivered", 1)]
    patients = site.rows(select(FHIR_RESOURCE.c.id).where(FHIR_RESOURCE.c.rtype == "Patient"))
    assert [r.id for r in patients] == [b["entry"][0]["resource"]["id"]]
    check_linked(site, b, f"Patient/{patients[0].id}")
    assert site.stored()[pid].resources == 4
    assert orjson.loads(site.spool()[pid]) == b  # the packet's body as it came
    # the local side (a HIS adapter looks a report's results up by Type/id) gets the Bundle
    # with the references stored and the id-less entry's stored id, the same when the packet
    # is applied again; the rest as it came
    (row,) = site.rows(select(INBOX).where(INBOX.c.packet_id == pid))
    (second_id,) = set(site.observations()) - {b["entry"][1]["resource"]["id"]}
    patient = f"Patient/{patients[0].id}"
    first = b["entry"][1]["resource"]
    for _ in range(2):
        (ev,) = site.results.apply_many([_delivery(row)])
        got = [e["resource"] for e in ev.bundle["entry"]]
        assert [e["fullUrl"] for e in ev.bundle["entry"]] == [e["fullUrl"] for e in b["entry"]]
        assert got[0] == b["entry"][0]["resource"]
        assert got[1] == {**first, "subject": {**first["subject"], "reference": patient}}
        assert got[2]["id"] == second_id and got[2]["subject"]["reference"] == patient
        assert got[3]["subject"]["reference"] == patient
        assert [r["reference"] for r in got[3]["result"]] == [
            f"Observation/{first['id']}",
            f"Observation/{second_id}",
        ]


@pytest.mark.parametrize("known", ["by-hash", "by-thread"])
def test_references_by_full_url_name_the_patient_known_here(site: Site, known: str) -> None:
    """A patient with the same keyed hash is known here, or the packet is on a referral thread
    core opened for its own patient: the references by fullUrl to the sender's Patient name
    ours, and the sender's Patient is not stored."""
    ours = {"resourceType": "Patient", "id": "core-p1", "name": [{"text": "王秀英"}]}
    phash = patient_hash(site.core.plan.patient_hash_key, NID)
    now = site.core.now()
    with site.core.store.write() as conn:
        store.put(conn, ours, at=now, origin="core", patient_hash=phash)
        if known == "by-thread":
            task = {
                "resourceType": "Task",
                "id": "core-task-1",
                "status": "accepted",
                "intent": "order",
                "for": {"reference": "Patient/core-p1"},
            }
            store.put(conn, task, at=now, thread="t1", origin="core", patient_hash=phash)
            conn.execute(
                insert(REFERRAL).values(
                    thread="t1",
                    side="referrer",
                    kind="referral",
                    referrer="core",
                    receiver="chc",
                    status="accepted",
                    step="accepted",
                    patient_hash=phash,
                    task_id="core-task-1",
                    sr_id="core-sr-1",
                    created_at=now,
                    updated_at=now,
                )
            )
    b = linked()
    (pid,) = site.receive([("t1", 1, b)])
    assert site.round() == (1, 2)
    assert site.states([pid]) == [("delivered", 1)]
    patients = site.rows(select(FHIR_RESOURCE.c.id).where(FHIR_RESOURCE.c.rtype == "Patient"))
    assert [r.id for r in patients] == ["core-p1"]
    check_linked(site, b, "Patient/core-p1")
    row = site.stored()[pid]
    assert (row.resources, row.thread) == (3, "t1" if known == "by-thread" else None)
    assert found(site, "Observation", f"Patient/{b['entry'][0]['resource']['id']}") == []
