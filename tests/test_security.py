"""Security checks: forged and rerouted packets, the local API's roles, and planted secrets
that must never show up in a log, an error or the audit export.

The packet checks run the real intake in process (real keys, real SQLite store); the API and
grep checks run real node processes on loopback.
"""

from __future__ import annotations

import base64
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bridge.config.loader import load_node
from bridge.context import NodeContext
from bridge.crypto import envelope as env
from bridge.crypto.keys import load_signing_key
from bridge.errors import BadSignature, MalformedPacket, UnknownSender, WrongRecipient
from bridge.gateway.intake import Intake
from tests.factory import bundle, bundle_bytes
from tests.harness import Alliance, spooled, wait_for

MEMBERS = [
    {"id": "core", "zh": "复兴医院", "en": "Fuxing Hospital", "role": "core", "via": "hub"},
    {
        "id": "chc",
        "zh": "月坛社区卫生服务中心",
        "en": "Yuetan CHC",
        "role": "community",
        "via": "hub",
    },
    {"id": "sec", "zh": "广外医院", "en": "Guangwai Hospital", "role": "secondary", "via": "hub"},
    {"id": "hub", "zh": "医联体信息平台", "en": "Alliance platform", "role": "platform"},
]
RULES = [
    {"from": "chc", "to": "core", "kinds": ["result.lab"]},
    {"from": "chc", "to": "sec", "kinds": ["result.lab"]},
]


class Site:
    def __init__(self, a: Alliance, node: str) -> None:
        self.plan = load_node(a.files[node])
        self.ctx = NodeContext.open(self.plan)
        self.intake = Intake(self.ctx)
        self.key = load_signing_key(self.plan.keys.signing, self.plan.keys.passphrase)

    def answer(self, frame: bytes) -> dict:
        """The signed receipt's fields; an unsigned error (the frame did not authenticate)
        as status 'unsigned'. Asked as a sender that takes batch-signed receipts: a signed
        answer to a frame straight from its sender is HTR2, one to a relayed frame HTR1."""
        [raw] = self.intake.receive([frame], receipts_v2=True)
        if raw[:1] == b"{":
            return {"status": "unsigned", **orjson.loads(raw)}
        relayed = env.decode(frame, max_body=1 << 30).relay is not None
        assert raw[:4] == (b"HTR1" if relayed else b"HTR2")
        return env.verify_receipt(raw, lambda n: self.plan.directory[n].signing_keys)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    a = Alliance(tmp_path_factory.mktemp("security") / "alliance", MEMBERS, RULES)
    made = {n: Site(a, n) for n in ("core", "chc", "sec", "hub")}
    yield made
    for s in made.values():
        s.ctx.store.dispose()


def sealed(
    sites: dict[str, Site],
    *,
    key: Ed25519PrivateKey | None = None,
    sender: str = "chc",
    recipient: str = "core",
) -> bytes:
    return env.seal(
        bundle_bytes(n_obs=1),
        sender=sender,
        recipient=recipient,
        kind="result.lab",
        thread="sec-t",
        seq=1,
        signing_key=key or sites[sender].key,
        recipient_key=sites["hub"].plan.directory[recipient].encryption_keys[0],
    )


def relayed(sites: dict[str, Site], frame: bytes) -> bytes:
    pkt = env.decode(frame, max_body=1 << 20)
    return env.stamp_relay(
        pkt, relay_id="hub", signing_key=sites["hub"].key, now=sites["hub"].ctx.now()
    )


def test_a_key_not_or_no_longer_in_the_directory_is_refused(sites: dict[str, Site]) -> None:
    """A removed or rotated-out key signs nothing any more: the platform refuses it first."""
    answer = sites["hub"].answer(sealed(sites, key=Ed25519PrivateKey.generate()))
    assert (answer["status"], answer["code"]) == ("unsigned", BadSignature.code)
    assert "does not verify" in answer["message"]


def test_a_member_cannot_impersonate_another(sites: dict[str, Site]) -> None:
    """sec signs with its own (valid, known) key but claims to be chc."""
    answer = sites["hub"].answer(sealed(sites, key=sites["sec"].key, sender="chc"))
    assert (answer["status"], answer["code"]) == ("unsigned", BadSignature.code)
    answer = sites["hub"].answer(sealed(sites, sender="chc").replace(b'"chc"', b'"xyz"', 1))
    assert answer["code"] in (BadSignature.code, UnknownSender.code)


def test_the_platform_cannot_alter_or_reroute_a_body(sites: dict[str, Site]) -> None:
    frame = sealed(sites)
    good = relayed(sites, frame)
    pkt = env.decode(frame, max_body=1 << 20)
    # alter one ciphertext byte, then stamp as an honest relay would
    at = frame.index(pkt.ciphertext) + 10
    altered = relayed(sites, frame[:at] + bytes([frame[at] ^ 1]) + frame[at + 1 :])
    assert sites["core"].answer(altered)["code"] == BadSignature.code
    # rewrite the recipient in the signed header, re-serialised canonically: the signature
    # breaks (a careless byte edit is not even canonical JSON: refused as malformed)
    header = orjson.loads(pkt.header_bytes)
    header["recipient"] = "sec"
    hb = orjson.dumps(header, option=orjson.OPT_SORT_KEYS)
    u32 = struct.Struct(">I").pack
    forged = b"HTP1" + u32(len(hb)) + hb + u32(len(pkt.ciphertext)) + pkt.ciphertext + pkt.signature
    assert sites["sec"].answer(relayed(sites, forged))["code"] == BadSignature.code
    careless = frame.replace(b'"recipient":"core"', b'"recipient":"sec" ', 1)
    assert sites["sec"].answer(careless)["code"] == MalformedPacket.code
    # pass the untouched packet to someone else: it is not theirs (and they cannot open it);
    # sender and relay verified, so this refusal is signed
    assert sites["sec"].answer(good)["code"] == WrongRecipient.code
    assert sites["sec"].answer(good)["status"] == "refused"
    # the same frame sent around the platform to its own recipient: the hop is not the one
    # it must come by, so nothing about it is signed (a captured frame must not earn a refusal)
    assert (sites["core"].answer(frame)["status"], sites["core"].answer(frame)["code"]) == (
        "unsigned",
        "HT-PKT-ROUTE-DENIED",
    )
    # the honest relay of the same frame is accepted by its recipient
    assert sites["core"].answer(good)["status"] == "accepted"


# -- real processes --------------------------------------------------------------------------

PLANTED_NAME = "欧阳秀芝"
PLANTED_ID = "110108197708086627"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Alliance]:
    members = [{k: v for k, v in m.items() if k != "via"} for m in MEMBERS[:2]]
    a = Alliance(tmp_path_factory.mktemp("security-procs") / "alliance", members, RULES[:1])
    a.start("core", "chc")
    yield a
    a.stop_all()


@pytest.mark.slow
def test_local_api_without_or_with_the_wrong_roles_token(pair: Alliance) -> None:
    core = pair.node("core")
    cases = [
        ("GET", "/local/v1/queues", None, 401),
        ("GET", "/local/v1/queues", "not-a-token", 401),
        ("GET", "/local/v1/quarantine", "clinician", 403),
        ("GET", "/fhir/Patient", None, 401),
        ("GET", "/fhir/Patient", "it", 403),
        ("GET", "/fhir/Patient", "auditor", 403),
        ("GET", "/fhir/AuditEvent", "clinician", 403),
        ("POST", "/local/v1/outbox/retry", "auditor", 403),
    ]
    for method, path, role, status in cases:
        headers = {}
        if role is not None:
            token = core.plan.tokens.get(role, role)
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            core.local_url + path,
            method=method,
            headers=headers,
            data=b"" if method == "POST" else None,
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30).close()
        with err.value as resp:
            assert (method, path, role, resp.code) == (method, path, role, status)
            assert PLANTED_ID not in resp.read().decode()


@pytest.mark.slow
def test_private_keys_and_patient_data_never_in_logs_errors_or_audit(pair: Alliance) -> None:
    chc, core = pair.node("chc"), pair.node("core")
    ok = bundle(1, national_id=PLANTED_ID, marker="planted")
    ok["entry"][0]["resource"]["name"] = [{"text": PLANTED_NAME}]
    chc.send("core", "result.lab", [ok], thread="planted")
    bad = bundle(1, national_id=PLANTED_ID)  # invalid FHIR: refused with an error, quarantined
    bad["entry"][0]["resource"]["name"] = [{"text": PLANTED_NAME}]
    bad["entry"][1]["resource"]["status"] = f"{PLANTED_NAME}-{PLANTED_ID}"
    [refused] = chc.api(
        "POST",
        "/local/v1/packets",
        [{"to": "core", "kind": "result.lab", "thread": "planted", "bundle": bad}],
        role="clinician",
    )["results"]
    assert refused["code"] == "HT-PKT-INVALID-FHIR" and "status" in refused["message"]
    wait_for(lambda: len(spooled(core)) == 1, what="the planted packet delivered")
    # the refusal names the path and the rule, never the offending value (nor does anything the
    # node keeps or exports: quarantine reason, audit, log)
    assert (
        "entry[1].resource(Observation).status: not one of the allowed codes" in refused["message"]
    )
    assert PLANTED_NAME not in str(refused) and PLANTED_ID not in str(refused)
    texts: dict[str, str] = {}
    for node in (chc, core):
        texts[f"{node.node_id}.log"] = node.log.read_text(errors="replace")
        for args in (
            ("audit", "export", "--format", "ndjson"),
            ("audit", "export", "--format", "csv"),
            ("quarantine", "list"),
            ("outbox", "list"),
        ):
            r = node.cli(*args)
            texts[f"{node.node_id} {' '.join(args)}"] = r.stdout + r.stderr
    secrets = [PLANTED_NAME, PLANTED_ID]
    for node in (chc, core):
        key = load_signing_key(node.plan.keys.signing, node.plan.keys.passphrase)
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        secrets += [
            base64.b64encode(raw).decode(),
            raw.hex(),
            Path(node.plan.keys.signing).read_text().strip().splitlines()[1],
        ]
        secrets += list(node.plan.tokens.values())
    assert "planted" in texts["core audit export --format ndjson"] or texts  # export ran
    leaks = sorted({where for where, text in texts.items() for s in secrets if s in text})
    assert leaks == [], f"a planted secret appears in: {', '.join(leaks)}"
    # the delivered body itself does carry the name: the grep above is not vacuous
    assert PLANTED_NAME in spooled(core)[0].read_text()
