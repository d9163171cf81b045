"""Third-party HL7 v2 messages (tests/fixtures/hl7v2-corpus: LinuxForHealth's and HAPI's test
messages) through the kit: each is read to its last leaf, or refused naming the field for a
reason the message itself gives (pinned below, one by one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.hl7v2 import charset, fields
from adapters.hl7v2.errors import (
    BadEncodingChars,
    CharsetRefused,
    V2Error,
    V2Rejected,
    VersionRefused,
)

CORPUS = Path(__file__).parent / "fixtures" / "hl7v2-corpus"

#: (file, message index in the file) -> (error, field): why a careful receiver refuses it
REFUSED: dict[tuple[str, int], tuple[type[V2Error], str]] = {
    # MSH-2 ``^~\\&``: the escape character twice (as written in Java source, and in two
    # LinuxForHealth resource files): five characters that are not distinct
    **{
        (name, 0): (BadEncodingChars, "MSH-2")
        for name in (
            *(f"Hl7MedicationRequestFHIRConversionTest_0{n}.hl7" for n in range(24, 41, 2)),
            "Hl7ORUMessageTest_001.hl7",
            "Hl7ORUMessageTest_002.hl7",
            "Hl7ORUMessageTest_004.hl7",
            "Hl7ORUMessageTest_005.hl7",
            "SegmentUtilTest_007.hl7",
            "sample_unix.hl7",
            "sample_win.hl7",
            # three encoding characters (``~\&``, ``^~}``: HAPI's non-standard delimiter tests),
            # and a U+FFFD inside MSH-2
            "EncodingCharactersTest_001.hl7",
            "messages_04.hl7",
            "ExtendedMinLowerLayerProtocolTest_001.hl7",
        )
    },
    ("NewPipeParserTest_047.hl7", 0): (VersionRefused, "MSH-12"),  # 2.999 (HAPI: invalid)
    ("ParserTest_005.hl7", 0): (VersionRefused, "MSH-12"),  # 2.999
    ("NewPipeParserTest_021.hl7", 0): (VersionRefused, "MSH-12"),  # "12" (fields numbered)
    ("NewPipeParserTest_011.hl7", 0): (V2Rejected, "MSH-12"),  # MSH ends after MSH-3
    ("NewPipeParserTest_015.hl7", 0): (V2Rejected, "segment 3"),  # a CR inside OBX-5
    ("NewPipeParserTest_046.hl7", 0): (V2Rejected, "segment 2"),  # segment id "I"
    ("MessageQueryTest_001.hl7", 0): (CharsetRefused, "MSH-18"),  # MSH-18 "x~y"
    ("MessageQueryTest_002.hl7", 0): (CharsetRefused, "MSH-18"),  # MSH-18 "x~y"
}


def messages_of(path: Path) -> list[bytes]:
    """One message per MSH, segments ended by CR, as a sender puts them on the wire."""
    raw = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    out: list[list[bytes]] = []
    for seg in raw.split(b"\r"):
        seg = seg.removeprefix(b"\xef\xbb\xbf")
        if seg.startswith(b"MSH"):
            out.append([])
        if out and seg.strip() and not seg.startswith((b"FHS", b"BHS", b"BTS", b"FTS")):
            out[-1].append(seg)
    return [b"\r".join(m) + b"\r" for m in out]


def read_all(raw: bytes) -> fields.Header:
    text, cs = charset.decode(raw)
    msg = fields.parse(text, cs)
    head = fields.header(msg)
    for seg in msg:
        for f in range(1, len(seg)):
            for r in range(1, fields.reps(seg, f) + 1):
                fields.rep_text(seg, f, r)
                for c in range(1, seg[f].split(seg.d.repetition)[r - 1].count(seg.d.component) + 2):
                    fields.value(seg, f, c, r)
    return head


FILES = sorted(CORPUS.rglob("*.hl7"))


def test_corpus_is_there() -> None:
    assert len(FILES) > 400
    names = {p.name for p in FILES}
    assert {name for name, _ in REFUSED} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_message_is_read_or_refused_for_its_own_reason(path: Path) -> None:
    found = messages_of(path)
    assert found, "no MSH in the file"
    for i, raw in enumerate(found):
        expected = REFUSED.get((path.name, i))
        if expected is None:
            head = read_all(raw)
            assert head.version in fields.VERSIONS
            assert head.message_type, "MSH-9 read"
            continue
        cls, field = expected
        with pytest.raises(cls) as err:
            read_all(raw)
        assert err.value.field == field and err.value.ack_code == "AR"
