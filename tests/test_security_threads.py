"""Issue 13, item 1: inside the alliance every member and every packet is untrusted.

Four real node processes: the Yuetan centre (``chc``) and Fuxing hospital (``core``) run a
referral through the platform (``hub``); the Guangwai centre (``gchc``) is a third member with
its own valid key and allowed routes to both. Packets are sent the way a hostile member would:
through its own node's API (``POST /local/v1/packets`` with a thread id read off a clear
header), or sealed with its own key and posted to the platform's peer port with any sequence
number. Each refusal is checked where it lands: the packet's inbox state, the quarantine row
with its code, the audit row, and both parties' referral row, Task and thread resources field
by field, unchanged.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import uuid
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import text

from adapters.pacs import fetch
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.delivery.transport import PeerConnection
from bridge.referral import resources as R
from bridge.referral.codes import step_codeable
from bridge.store.db import Store
from tests.harness import Alliance, NodeProcess, free_port_block, wait_for
from tests.referrals import referral

pytestmark = pytest.mark.slow

REFERRAL_KINDS = ["referral.request", "referral.status", "referral.cancel", "referral.return"]
RESULTS = ["result.lab", "result.imaging"]
MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core", "via": "hub"},
    {
        "id": "chc",
        "zh": "月坛社区卫生服务中心",
        "en": "Yuetan CHC",
        "role": "community",
        "via": "hub",
    },
    {
        "id": "gchc",
        "zh": "广外社区卫生服务中心",
        "en": "Guangwai CHC",
        "role": "community",
        "via": "hub",
    },
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": [*REFERRAL_KINDS, *RESULTS, "imaging.fetch-request"]},
    {"from": "core", "to": "chc", "kinds": [*REFERRAL_KINDS, *RESULTS, "imaging.fetch-response"]},
    # the third member may refer to, and send results to, both: every route is allowed
    {"from": "gchc", "to": "core", "kinds": [*REFERRAL_KINDS, *RESULTS]},
    {"from": "gchc", "to": "chc", "kinds": [*REFERRAL_KINDS, *RESULTS, "imaging.fetch-response"]},
    {"from": "core", "to": "gchc", "kinds": REFERRAL_KINDS},
]
STUDY = "1.2.826.0.1.3680043.8.498.7001"


@pytest.fixture(scope="module")
def al(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    port = free_port_block(1)
    members = [dict(m) for m in MEMBERS]
    members[1]["adapters"] = [
        {
            "name": "pacs",
            "type": "pacs-dicom",
            "receives": ["imaging.*"],
            "options": {"bind": f"127.0.0.1:{port}", "ae_title": "YUETAN"},
        }
    ]
    a = Alliance(tmp_path_factory.mktemp("threads") / "alliance", members, RULES)
    a.start("hub", "core", "chc", "gchc")
    yield a
    a.stop_all()


# -- reading a node's own store --------------------------------------------------------------


def sql(node: NodeProcess, query: str, **params: Any) -> list[dict[str, Any]]:
    s = Store(node.plan.storage_dsn)
    try:
        with s.read() as conn:
            return [dict(r._mapping) for r in conn.execute(text(query), params)]
    finally:
        s.dispose()


def resource(node: NodeProcess, rtype: str, rid: str) -> dict[str, Any] | None:
    rows = sql(node, "SELECT body FROM fhir_resource WHERE rtype = :t AND id = :i", t=rtype, i=rid)
    return orjson.loads(rows[0]["body"]) if rows else None


def snapshot(node: NodeProcess, thread: str) -> dict[str, Any]:
    """Everything a party keeps about a referral: row, Task, steps, the thread's resources."""
    [row] = sql(node, "SELECT * FROM referral WHERE thread = :t", t=thread)
    return {
        "row": row,
        "task": resource(node, "Task", row["task_id"]),
        "steps": sql(
            node,
            "SELECT event, packet_id, from_status, to_status, actor "
            "FROM referral_step WHERE thread = :t ORDER BY id",
            t=thread,
        ),
        "resources": sql(
            node,
            "SELECT rtype, id, version, origin FROM fhir_resource "
            "WHERE thread = :t ORDER BY rtype, id",
            t=thread,
        ),
    }


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for name in ("row", "task"):
        assert set(after[name]) == set(before[name])
        for field in before[name]:
            assert after[name][field] == before[name][field], (name, field)
    assert after["steps"] == before["steps"]
    assert after["resources"] == before["resources"]


def inbox(node: NodeProcess, packet_id: str) -> dict[str, Any] | None:
    rows = sql(
        node,
        "SELECT sender, thread, seq, state, last_error FROM inbox WHERE packet_id = :p",
        p=packet_id,
    )
    return rows[0] if rows else None


def quarantined(node: NodeProcess, packet_id: str) -> dict[str, Any] | None:
    rows = sql(
        node,
        "SELECT source, code, sender, kind, thread FROM quarantine WHERE packet_id = :p",
        p=packet_id,
    )
    return rows[0] if rows else None


def audited(node: NodeProcess, packet_id: str, action: str) -> list[dict[str, Any]]:
    rows = sql(
        node,
        "SELECT action, outcome, peer, thread, resource FROM audit "
        "WHERE packet_id = :p AND action = :a",
        p=packet_id,
        a=action,
    )
    return [dict(r, resource=orjson.loads(r["resource"])) for r in rows]


def refused(node: NodeProcess, packet_id: str, code: str, sender: str) -> dict[str, Any]:
    """Wait for the packet's refusal; check quarantine and audit name the code and sender."""
    q = wait_for(
        lambda: quarantined(node, packet_id),
        timeout=40,
        what=f"{packet_id} quarantined at {node.node_id}",
    )
    assert (q["code"], q["sender"]) == (code, sender)
    assert inbox(node, packet_id)["state"] in ("refused", "failed")
    rows = [
        r
        for r in sql(
            node,
            "SELECT action, outcome, peer, resource FROM audit WHERE packet_id = :p",
            p=packet_id,
        )
        if r["action"] in ("refused", "dead-lettered")
    ]
    assert rows, "the refusal is audited"
    assert rows[-1]["peer"] == sender and rows[-1]["outcome"] in ("4", "8")
    assert code in rows[-1]["resource"]
    return q


# -- referrals and packets -------------------------------------------------------------------


def state(node: NodeProcess, thread: str) -> dict[str, Any] | None:
    rows = [r for r in node.api("GET", "/local/v1/referrals") if r["thread"] == thread]
    return rows[0] if rows else None


def both_at(a: Alliance, thread: str, status: str) -> None:
    wait_for(
        lambda: all(
            (state(a.node(n), thread) or {}).get("status") == status for n in ("chc", "core")
        ),
        timeout=40,
        what=f"both at {status}",
    )


def new_referral(a: Alliance, nid: str) -> str:
    chc = a.node("chc")
    before = {r["thread"] for r in chc.api("GET", "/local/v1/referrals")}
    chc.api(
        "POST",
        "/local/v1/referrals",
        referral("up-inpatient", "core", national_id=nid),
        role="clinician",
    )
    [thread] = [
        r["thread"] for r in chc.api("GET", "/local/v1/referrals") if r["thread"] not in before
    ]
    both_at(a, thread, "received")
    return thread


def step_message(
    event: str,
    sender: str,
    receiver: str,
    task: dict[str, Any],
    extra: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return R.message(
        event,
        sender=sender,
        receiver=receiver,
        task=task,
        resources=extra or [],
        at=datetime.now(UTC),
    )


def forged_task(thread: str, status: str, step: str, reason: str | None = None) -> dict[str, Any]:
    """What a third party can make of a referral it knows only by its thread id."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": thread,
        "status": status,
        "intent": "order",
        "businessStatus": step_codeable(step),
    }
    if reason:
        task["statusReason"] = {"text": reason}
    return task


def seal_and_post(
    a: Alliance, sender: str, recipient: str, kind: str, thread: str, seq: int, body: dict[str, Any]
) -> str:
    """Seal with the sender's own key and any seq, post to the platform as its node would."""
    plan = a.node(sender).plan
    key = load_signing_key(plan.keys.signing, plan.keys.passphrase)
    packet_id = str(uuid.uuid4())
    frame = env.seal(
        orjson.dumps(body),
        sender=sender,
        recipient=recipient,
        kind=kind,
        thread=thread,
        seq=seq,
        signing_key=key,
        packet_id=packet_id,
        recipient_key=plan.directory[recipient].encryption_keys[0],
    )
    conn = PeerConnection(a.node("hub").peer_url)
    try:
        answer = conn.post_batch(env.encode_batch([frame]))
    finally:
        conn.close()
    [receipt] = env.decode_batch(answer, max_total=len(answer))
    fields = env.verify_receipt(receipt, lambda n: plan.directory[n].signing_keys)
    assert fields["status"] == "relayed", fields
    return packet_id


def next_seq(node: NodeProcess, thread: str) -> int:
    rows = sql(
        node,
        "SELECT max(seq) AS s FROM outbox WHERE thread = :t AND sender = :n",
        t=thread,
        n=node.node_id,
    )
    return int(rows[0]["s"] or 0) + 1


def receivers_task(
    a: Alliance, thread: str, status: str, step: str, outputs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The receiver's Task as its node would send it after a step (same id, subject, focus)."""
    task = copy.deepcopy(resource(a.node("core"), "Task", thread))
    assert task is not None
    task.pop("meta", None)
    task["status"], task["businessStatus"] = status, step_codeable(step)
    if outputs:
        task["output"] = [*(task.get("output") or []), *outputs]
    return task


# -- a third member against another pair's referral -------------------------------------------


def test_a_third_member_cannot_cancel_return_or_add_results(al: Alliance) -> None:
    chc, core, gchc = al.node("chc"), al.node("core"), al.node("gchc")
    thread = new_referral(al, "110102195003150011")
    before = {"chc": snapshot(chc, thread), "core": snapshot(core, thread)}
    # cancel at the receiver, as if gchc were the referrer
    [cancel] = gchc.send(
        "core",
        "referral.cancel",
        [
            step_message(
                "cancel",
                "gchc",
                "core",
                forged_task(thread, "requested", "cancel-requested", "家属要求撤回"),
            )
        ],
        thread=thread,
    )
    # "cancelled" and a return at the referrer, as if gchc were the receiver
    [cancelled] = gchc.send(
        "chc",
        "referral.status",
        [
            step_message(
                "cancelled",
                "gchc",
                "chc",
                forged_task(thread, "cancelled", "cancelled", "床位已满"),
            )
        ],
        thread=thread,
    )
    invented = {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": "final",
        "code": {"text": "血钾"},
        "valueQuantity": {"value": 2.1, "unit": "mmol/L"},
        "subject": before["chc"]["task"]["for"],
    }
    [returned] = gchc.send(
        "chc",
        "referral.return",
        [
            step_message(
                "return",
                "gchc",
                "chc",
                forged_task(thread, "completed", "completed"),
                [copy.deepcopy(invented)],
            )
        ],
        thread=thread,
    )
    # a result on the referral's thread, to both parties
    lab = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{invented['id']}", "resource": invented}],
    }
    [lab_chc] = gchc.send("chc", "result.lab", [lab], thread=thread)
    [lab_core] = gchc.send("core", "result.lab", [lab], thread=thread)
    for node, pid in (
        (core, cancel),
        (chc, cancelled),
        (chc, returned),
        (chc, lab_chc),
        (core, lab_core),
    ):
        q = refused(node, pid, "HT-THREAD-PARTY", "gchc")
        assert q["source"] == "thread" and q["thread"] == thread
        assert inbox(node, pid)["state"] == "refused"
    # nothing moved on either side, field by field; the invented Observation is nowhere
    for n, node in (("chc", chc), ("core", core)):
        assert_unchanged(before[n], snapshot(node, thread))
        assert resource(node, "Observation", invented["id"]) is None
    # the genuine parties still move their referral: the refusals held nothing up
    core.api("POST", f"/local/v1/referrals/{thread}/steps/accept", {}, role="clinician")
    both_at(al, thread, "accepted")


# -- sequence numbers: the next expected one, gaps held ----------------------------------------


def test_a_huge_seq_is_held_and_the_genuine_next_step_applies(al: Alliance) -> None:
    chc, core = al.node("chc"), al.node("core")
    thread = new_referral(al, "110102195003150022")
    # a "cancelled" signed with the receiver's own key, seq far ahead
    huge = seal_and_post(
        al,
        "core",
        "chc",
        "referral.status",
        thread,
        2**62,
        step_message(
            "cancelled", "core", "chc", receivers_task(al, thread, "cancelled", "cancelled")
        ),
    )
    wait_for(
        lambda: (inbox(chc, huge) or {}).get("state") == "held",
        timeout=40,
        what="the huge-seq packet held",
    )
    assert state(chc, thread)["status"] == "received"
    # the receiver's genuine next step still applies, on both sides
    core.api("POST", f"/local/v1/referrals/{thread}/steps/accept", {}, role="clinician")
    both_at(al, thread, "accepted")
    row = sql(chc, "SELECT status, step, accepted_at FROM referral WHERE thread = :t", t=thread)[0]
    assert (row["status"], row["step"]) == ("accepted", "scheduled")
    assert row["accepted_at"] is not None
    # the thread moved on: held packets go back to the queue and the dispatcher holds this
    # one again (not its turn); wait for that rather than read it in between
    wait_for(
        lambda: (inbox(chc, huge) or {}).get("state") == "held",
        timeout=40,
        what="the huge-seq packet held again after the thread moved on",
    )
    held = inbox(chc, huge)
    assert (held["state"], held["seq"], held["sender"]) == ("held", 2**62, "core")
    assert audited(chc, huge, "held"), "holding is audited"
    assert quarantined(chc, huge) is None  # held, not refused: it waits for its turn


def test_an_out_of_order_pair_is_applied_in_order(al: Alliance) -> None:
    chc = al.node("chc")
    thread = new_referral(al, "110102195003150033")
    seq = next_seq(al.node("core"), thread)
    slip = [{"type": {"text": "bed"}, "valueString": "心内科 8床"}]
    accept = step_message(
        "accept", "core", "chc", receivers_task(al, thread, "accepted", "scheduled", slip)
    )
    arrive = step_message(
        "arrive", "core", "chc", receivers_task(al, thread, "in-progress", "arrived", slip)
    )
    second = seal_and_post(al, "core", "chc", "referral.status", thread, seq + 1, arrive)
    wait_for(
        lambda: (inbox(chc, second) or {}).get("state") == "held",
        timeout=40,
        what="the later step held until the earlier one arrives",
    )
    assert state(chc, thread)["status"] == "received"
    first = seal_and_post(al, "core", "chc", "referral.status", thread, seq, accept)
    wait_for(
        lambda: (inbox(chc, second) or {}).get("state") == "delivered",
        timeout=40,
        what="both steps applied",
    )
    assert inbox(chc, first)["state"] == "delivered"
    steps = [
        (s["event"], s["from_status"], s["to_status"], s["packet_id"])
        for s in snapshot(chc, thread)["steps"]
    ]
    assert steps[-2:] == [
        ("accept", "received", "accepted", first),
        ("arrive", "accepted", "in-progress", second),
    ]
    row = sql(chc, "SELECT status, step, accepted_at FROM referral WHERE thread = :t", t=thread)[0]
    assert (row["status"], row["step"]) == ("in-progress", "arrived")
    assert row["accepted_at"] is not None
    # a packet behind the expected seq (its slot is taken) is refused
    stale = seal_and_post(al, "core", "chc", "referral.status", thread, seq, accept)
    refused(chc, stale, "HT-THREAD-SEQ", "core")
    assert state(chc, thread)["status"] == "in-progress"


# -- peer steps go through the same state machine as local ones --------------------------------


def test_peer_steps_take_the_transition_check(al: Alliance) -> None:
    chc, core = al.node("chc"), al.node("core")
    thread = new_referral(al, "110102195003150044")
    core.api("POST", f"/local/v1/referrals/{thread}/steps/accept", {}, role="clinician")
    both_at(al, thread, "accepted")
    before = {"chc": snapshot(chc, thread), "core": snapshot(core, thread)}
    # the referrer's node (its own key, the next seq) notes a return that never happened
    note = seal_and_post(
        al,
        "chc",
        "core",
        "referral.status",
        thread,
        next_seq(chc, thread),
        step_message(
            "return-received", "chc", "core", forged_task(thread, "accepted", "return-received")
        ),
    )
    refused(core, note, "HT-REF-TRANSITION", "chc")
    # the receiver's node "returns" a patient who never arrived
    ret = seal_and_post(
        al,
        "core",
        "chc",
        "referral.return",
        thread,
        next_seq(core, thread),
        step_message("return", "core", "chc", receivers_task(al, thread, "completed", "completed")),
    )
    refused(chc, ret, "HT-REF-TRANSITION", "core")
    for n in ("chc", "core"):
        assert_unchanged(before[n], snapshot(al.node(n), thread))


# -- imaging fetch responses ----------------------------------------------------------------


def dicom(study: str, series: str, sop: str) -> bytes:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    with warnings.catch_warnings():  # pydicom warns of a UID that is not one: that's the point
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def response(
    task_id: str, study: str, instances: list[tuple[str, bytes]], *, status: str = "completed"
) -> dict[str, Any]:
    """An imaging.fetch-response Bundle as a (hostile) holder builds it: the manifest names
    each instance by its title, the Binary carries the Part-10 bytes."""
    outputs: list[dict[str, Any]] = [
        {"type": {"coding": [{"system": fetch.TASK_SYSTEM, "code": "part"}]}, "valueString": "1/1"},
        {
            "type": {"coding": [{"system": fetch.TASK_SYSTEM, "code": "instances-total"}]},
            "valueUnsignedInt": max(len(instances), 1),
        },
    ]
    entries = []
    for i, (sop, data) in enumerate(instances):
        outputs.append(
            {
                "type": {"coding": [{"system": fetch.TASK_SYSTEM, "code": "dicom-instance"}]},
                "valueAttachment": {
                    "contentType": "application/dicom",
                    "url": f"Binary/b{i}",
                    "size": len(data),
                    "title": sop,
                    "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(),
                },
            }
        )
        entries.append(
            {
                "resource": {
                    "resourceType": "Binary",
                    "id": f"b{i}",
                    "contentType": "application/dicom",
                    "data": base64.b64encode(data).decode(),
                }
            }
        )
    task = {
        "resourceType": "Task",
        "id": f"{task_id}-1",
        "status": status,
        "intent": "order",
        "groupIdentifier": {"system": fetch.FETCH_GROUP, "value": task_id},
        "input": [{"type": {"text": "StudyInstanceUID"}, "valueOid": f"urn:oid:{study}"}],
        "output": outputs,
    }
    if status == "failed":
        task["statusReason"] = {"text": "study not held here"}
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": task}, *entries]}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def ask(chc: NodeProcess, study: str = STUDY) -> dict[str, Any]:
    return chc.api(
        "POST",
        "/local/v1/adapters/pacs/fetches",
        {"from": "core", "study_uid": study},
        role="clinician",
    )


def fetch_task(chc: NodeProcess, task_id: str) -> dict[str, Any]:
    task = resource(chc, "Task", task_id)
    assert task is not None
    return task


def test_a_traversal_uid_in_a_fetch_response_writes_nothing_outside(al: Alliance) -> None:
    chc, core = al.node("chc"), al.node("core")
    data_dir = chc.plan.data_dir
    outside = data_dir.parent
    before = files_under(outside)
    asked = ask(chc)
    escape = f"{uuid.uuid4()}"
    sop_up = "../../../../" + escape  # fetched/<study>/<series>/ -> the data folder's parent
    tries = {
        "sop": [(sop_up, dicom(STUDY, STUDY + ".1", sop_up))],
        "series": [(STUDY + ".1.1", dicom(STUDY, "../../../../" + escape, STUDY + ".1.1"))],
        "study": [(STUDY + ".1.1", dicom("../../../../" + escape, STUDY + ".1", STUDY + ".1.1"))],
    }
    sent = {}
    for what, instances in tries.items():
        [sent[what]] = core.send(
            "chc",
            "imaging.fetch-response",
            [response(asked["task_id"], STUDY, instances)],
            thread=asked["thread"],
        )
    for what, pid in sent.items():
        q = wait_for(
            lambda pid=pid: quarantined(chc, pid), timeout=40, what=f"{what} traversal refused"
        )
        assert q["code"] == "HT-UNSAFE-PATH", (what, q)
        assert q["sender"] == "core"
        assert inbox(chc, pid)["state"] in ("failed", "refused")
        assert [
            r
            for r in sql(chc, "SELECT action, resource FROM audit WHERE packet_id = :p", p=pid)
            if q["code"] in r["resource"]
        ], what
    # nothing was written anywhere: not beside the data folder, not under fetched/
    assert not list(outside.parent.rglob(f"*{escape}*"))
    assert files_under(outside) - before <= {
        p for n in ("core", "gchc", "hub") for p in files_under(al.node(n).plan.data_dir)
    }
    assert not (chc.plan.data_dir / "fetched" / STUDY).exists()
    assert fetch_task(chc, asked["task_id"])["status"] == "requested"


def test_a_fetch_response_for_a_task_not_opened_here_is_refused(al: Alliance) -> None:
    chc, core, gchc = al.node("chc"), al.node("core"), al.node("gchc")
    fetched = chc.plan.data_dir / "fetched"
    study, sop = "1.2.826.0.1.3680043.8.498.7002", "1.2.826.0.1.3680043.8.498.7002.1.1"
    good = [(sop, dicom(study, study + ".1", sop))]
    asked = ask(chc, study)
    before = files_under(fetched)
    # 1. a Task id nobody asked for, on a thread of the sender's own making
    [unknown] = core.send(
        "chc", "imaging.fetch-response", [response(str(uuid.uuid4()), study, good)]
    )
    # 2. chc's real open Task, answered on another thread than the one it was asked on
    [elsewhere] = core.send(
        "chc", "imaging.fetch-response", [response(asked["task_id"], study, good)]
    )
    # 3. the same, from a member that was never asked
    [stranger] = gchc.send(
        "chc",
        "imaging.fetch-response",
        [response(asked["task_id"], study, good)],
        thread=asked["thread"],
    )
    for pid, sender, codes in (
        (unknown, "core", ("HT-IMAGING-FETCH",)),
        (elsewhere, "core", ("HT-IMAGING-FETCH",)),
        (stranger, "gchc", ("HT-THREAD-PARTY",)),
    ):
        q = wait_for(lambda pid=pid: quarantined(chc, pid), timeout=40, what="refusal")
        assert q["code"] in codes and q["sender"] == sender, q
        assert [
            r
            for r in sql(chc, "SELECT resource FROM audit WHERE packet_id = :p", p=pid)
            if q["code"] in r["resource"]
        ]
    assert files_under(fetched) == before
    assert fetch_task(chc, asked["task_id"])["status"] == "requested"
    # 4. a Task that is closed: the holder said "failed", then sends instances anyway
    [failed] = core.send(
        "chc",
        "imaging.fetch-response",
        [response(asked["task_id"], study, [], status="failed")],
        thread=asked["thread"],
    )
    wait_for(
        lambda: fetch_task(chc, asked["task_id"])["status"] == "failed",
        timeout=40,
        what="the fetch failed",
    )
    assert inbox(chc, failed)["state"] == "delivered"
    [late] = core.send(
        "chc",
        "imaging.fetch-response",
        [response(asked["task_id"], study, good)],
        thread=asked["thread"],
    )
    q = wait_for(lambda: quarantined(chc, late), timeout=40, what="late response refused")
    assert q["code"] == "HT-IMAGING-FETCH" and q["sender"] == "core"
    assert files_under(fetched) == before
    assert fetch_task(chc, asked["task_id"])["status"] == "failed"


# -- the file store itself (in process) -------------------------------------------------------


def test_the_instance_store_refuses_symlinks_out_and_non_uids(tmp_path: Path) -> None:
    from adapters.pacs.files import InstanceStore
    from bridge.errors import UnsafePath

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    store = InstanceStore(tmp_path / "data" / "fetched")
    data = dicom(STUDY, STUDY + ".1", STUDY + ".1.1")
    # a study folder that is a symlink out of the root
    (store.root / STUDY).symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePath):
        store.write(STUDY, STUDY + ".1", STUDY + ".1.1", data)
    # a series folder that is one, under a real study folder
    other = "1.2.826.0.1.3680043.8.498.7003"
    (store.root / other).mkdir()
    (store.root / other / (other + ".1")).symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePath):
        store.write(other, other + ".1", other + ".1.1", data)
    # an instance file that is a symlink to a file outside: not followed, not replaced
    third = "1.2.826.0.1.3680043.8.498.7004"
    (store.root / third / (third + ".1")).mkdir(parents=True)
    target = outside / "victim.txt"
    target.write_bytes(b"keep me")
    (store.root / third / (third + ".1") / (third + ".1.1.dcm")).symlink_to(target)
    with pytest.raises(UnsafePath):
        store.write(third, third + ".1", third + ".1.1", data)
    assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    # only digits-and-dots UIDs of at most 64 characters become a path, never a glob (a
    # component with a leading zero, outside PS3.5 9.1 but written by real PACS, is taken)
    store.write("1.02.3", "1.02.3.1", "1.02.3.1.1", data)
    assert [p.name for p in store.study_files("1.02.3")] == ["1.02.3.1.1.dcm"]
    for bad in ("../" + STUDY, STUDY + "/..", "1..2", ".1", "1.2.", "1" * 65, "", "1.2 3"):
        with pytest.raises(UnsafePath):
            store.write(bad, STUDY + ".1", STUDY + ".1.1", data)
        with pytest.raises(UnsafePath):
            store.write(STUDY, STUDY + ".1", bad, data)
        assert store.study_files(bad) == []
    assert store.study_files("..") == [] and store.study_files("*") == []
    # a fetch request naming a study that is not a UID is refused before any file is looked at
    task = fetch.request_task("t-1", STUDY, "chc", "core", "2026-11-20T10:00:00+08:00")
    task["input"][0]["valueOid"] = "urn:oid:../../../etc"
    with pytest.raises(UnsafePath):
        fetch.parse_request(fetch.request_bundle(task, None))
    # a good one still lands where it belongs
    fine = "1.2.826.0.1.3680043.8.498.7005"
    path = store.write(fine, fine + ".1", fine + ".1.1", data)
    assert path == store.root.resolve() / fine / (fine + ".1") / (fine + ".1.1.dcm")
    assert path.read_bytes() == data
    assert [p.resolve() for p in store.study_files(fine)] == [path]


# -- the gate's bookkeeping on both databases (in process) -------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    dsn = (
        f"sqlite:///{tmp_path / 'node.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_db"))
    )
    s = Store(dsn)
    s.create_all()
    yield s
    s.dispose()


def test_the_gate_keeps_parties_and_turns_on_sqlite_and_postgresql(store: Store) -> None:
    from collections import namedtuple

    from sqlalchemy import insert, select

    from bridge.delivery.threads import HOLD, TAKE, ThreadGate, open_threads
    from bridge.errors import NotThreadParty, StaleSequence
    from bridge.store.tables import INBOX, THREAD_PARTY

    Row = namedtuple("Row", "thread sender seq")
    now = datetime.now(UTC)
    with store.write() as conn:  # chc sends on t-ours to core (twice: one party row)
        open_threads(conn, "chc", [("t-ours", "core"), ("t-ours", "core")], now)
        open_threads(conn, "chc", [("t-ours", "core")], now)
        conn.execute(
            insert(INBOX).values(
                packet_id="p-held",
                sender="core",
                kind="result.lab",
                thread="t-ours",
                seq=3,
                digest="0" * 64,
                size=1,
                state="held",
                created_at=now,
                received_at=now,
                next_try_at=now,
                body=b"{}",
                receipt=b"r",
            )
        )
    gate = ThreadGate("chc")
    with store.read() as conn:
        gate.load(conn, ["t-ours", "t-new"])
    assert gate.judge(Row("t-ours", "core", 2)) == HOLD and gate.due(Row("t-ours", "core", 2)) == 1
    assert gate.judge(Row("t-ours", "core", 1)) == TAKE
    gate.taken(Row("t-ours", "core", 1))
    assert gate.judge(Row("t-ours", "core", 2)) == TAKE
    gate.taken(Row("t-ours", "core", 2))
    with pytest.raises(NotThreadParty):
        gate.judge(Row("t-ours", "gchc", 1))
    with pytest.raises(StaleSequence):
        gate.judge(Row("t-ours", "core", 2))
    # a thread new here: held until its seq 1 arrives, which opens it for that sender only
    assert gate.judge(Row("t-new", "gchc", 2)) == HOLD
    assert gate.judge(Row("t-new", "gchc", 1)) == TAKE
    gate.taken(Row("t-new", "gchc", 1))
    with pytest.raises(NotThreadParty):
        gate.judge(Row("t-new", "core", 1))
    with store.write() as conn:
        gate.commit(conn, now)
        open_threads(conn, "chc", [("t-new", "gchc")], now)  # our reply keeps the turn
    with store.read() as conn:
        parties = {
            (r.thread, r.peer, r.next_seq, r.opened_by) for r in conn.execute(select(THREAD_PARTY))
        }
        held = conn.execute(select(INBOX.c.state).where(INBOX.c.packet_id == "p-held")).scalar()
    assert parties == {("t-ours", "core", 3, "chc"), ("t-new", "gchc", 2, "gchc")}
    assert held == "received"  # its thread moved: back in the queue, now due
    again = ThreadGate("chc")
    with store.read() as conn:
        again.load(conn, ["t-ours"])
    assert again.judge(Row("t-ours", "core", 3)) == TAKE
