"""The HL7 v2 kit (adapters/hl7v2) without sockets: MLLP framing fed byte by byte (as python-hl7
tests its stream reader), the MSH-18 table, charset mismatch, MSH-2, escapes after splitting,
the HL7 null, DTM at every precision, versions 2.1-2.8, ACKs by version; and bad input
(hypothesis): any chunking of any frames, edited fixtures and arbitrary bytes end in a frame,
a reading or a refusal naming a field, never a crash."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.hl7v2 import ack, build, charset, fields, mllp
from adapters.hl7v2.errors import (
    BadEncodingChars,
    BadValue,
    CharsetRefused,
    V2Error,
    VersionRefused,
)
from tests.fuzzkit import mutated

MSG = b"MSH|^~\\&|LIS|LAB|HUTONG|CORE|20261120||ORU^R01|C1|P|2.5.1\rPID|1||X1||Wang\r"


def frames(reader: mllp.FrameReader, data: bytes, step: int) -> list[mllp.Event]:
    out: list[mllp.Event] = []
    for i in range(0, len(data), step):
        out += reader.feed(data[i : i + step])
    return out


# -- framing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_frames_in_any_chunking(step: int) -> None:
    """Two frames, white space between, <FS> and <CR> split across reads: the same frames."""
    stream = b"\x0b" + MSG + b"\x1c\r\r\n" + b"\x0b" + MSG.replace(b"C1", b"C2") + b"\x1c\r"
    got = frames(mllp.FrameReader(), stream, step)
    assert got == [mllp.Frame(MSG), mllp.Frame(MSG.replace(b"C1", b"C2"))]


def test_vt_inside_a_frame_is_data() -> None:
    """UTF-16 下 is 0B 4E: a <VT> inside a frame does not start another one."""
    body = "MSH|^~\\&|A|B|||||ADT^A08|1|P|2.5||||||UNICODE UTF-16\rPID|1||X||下\r"
    raw = body.encode("utf-16-le")
    assert b"\x0b" in raw
    assert mllp.FrameReader().feed(b"\x0b" + raw + b"\x1c\r") == [mllp.Frame(raw)]


@pytest.mark.parametrize("step", [1, 5, 4096, 1 << 20])
def test_oversize_frame_keeps_prefix_and_digest_then_serves(step: int) -> None:
    big = b"\x0b" + MSG + b"Z" * 5000
    stream = big + b"\x1c\r" + b"\x0b" + MSG + b"\x1c\r"
    reader = mllp.FrameReader(max_bytes=1000, keep_bytes=100)
    got = frames(reader, stream, step)
    assert len(got) == 2 and got[1] == mllp.Frame(MSG)
    fault = got[0]
    assert isinstance(fault, mllp.Fault) and fault.kind == "oversize"
    assert fault.prefix == big[:100] and fault.size == len(big) + 2
    assert fault.sha256 == hashlib.sha256(big + b"\x1c\r").hexdigest()
    assert "frame limit of 1000 bytes" in fault.reason and not fault.whole
    assert fault.sha256 in fault.error().message and fault.error().ack_code == "AR"


def test_frame_exactly_at_the_limit_is_taken() -> None:
    payload = b"x" * 1000
    assert mllp.FrameReader(max_bytes=1000).feed(b"\x0b" + payload + b"\x1c\r") == [
        mllp.Frame(payload)
    ]
    [fault] = mllp.FrameReader(max_bytes=999).feed(b"\x0b" + payload + b"\x1c\r")
    assert isinstance(fault, mllp.Fault) and fault.kind == "oversize"


def test_truncated_and_slow_frames_and_stray_bytes() -> None:
    reader = mllp.FrameReader(keep_bytes=10)
    assert reader.feed(b"\x0b" + MSG[:40]) == [] and reader.in_frame
    fault = reader.eof()
    assert fault is not None and fault.kind == "truncated"
    assert fault.prefix == (b"\x0b" + MSG)[:10] and fault.size == 41
    assert reader.eof() is None  # between frames: nothing to report
    assert reader.feed(b"\x0bMSH|") == []
    slow = reader.abandon(3)
    assert slow is not None and slow.kind == "slow" and "within 3 s" in slow.reason
    [stray] = reader.feed(b"MSH|^~\\&|junk\x1c\r")
    assert isinstance(stray, mllp.Fault) and stray.kind == "no-start" and stray.size == 13
    assert reader.feed(b"\r\n  ") == [] and not reader.in_frame


def test_limits_are_finite() -> None:
    for bad in ({"idle_timeout_s": 0}, {"frame_timeout_s": float("inf")}, {"write_timeout_s": -1}):
        with pytest.raises(ValueError, match="must be a positive, finite number"):
            mllp.Limits(**bad)  # type: ignore[arg-type]
    assert mllp.Limits().max_bytes >= 10 * 1024 * 1024


# -- charsets ------------------------------------------------------------------------------------

#: a text each charset can hold, tried in order: Chinese first, then Latin-1, then the script
SAMPLES = [
    "张无忌",
    "張無忌",
    "Müller Zoë",
    "Łódź Żółw",
    "Ħal Għargħur",
    "Ąžuolas Ėglė",
    "Жуков",
    "مرحبا",
    "Ωμέγα",
    "שלום",
    "Gülşen",
    "ไทย",
    "Þórður",
    "Ŵyn",
    "Œuvre €",
    "Smith",
]


def sample_for(cs: charset.Charset) -> str:
    for text in SAMPLES:
        try:
            charset.encode(text, cs)
        except (UnicodeEncodeError, CharsetRefused):
            continue
        return text
    raise AssertionError(cs.name)


def test_table_holds_every_standard_and_vendor_name() -> None:
    for name in [
        "ASCII",
        "ISO IR6",
        "ISO IR100",
        "ISO IR192",
        "UNICODE",
        "UNICODE UTF-8",
        "UNICODE UTF-16",
        "UNICODE UTF-32",
        "GB 18030-2000",
        "GB18030",
        "GB-18030",
        "GBK",
        "CP936",
        "ISO IR58",
        "GB2312",
        "BIG-5",
        "KS X 1001",
        "ISO IR87",
        "ISO IR159",
        "ISO IR14",
        "CNS 11643-1992",
        *[f"8859/{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15)],
    ]:
        assert charset.lookup(name) is charset.lookup(name.lower())
    # GBK, CP936, GB2312 and ISO IR58 are read as GB 18030 (its superset), written as declared
    for name, enc in (
        ("GBK", "gbk"),
        ("CP936", "gbk"),
        ("GB2312", "gb2312"),
        ("ISO IR58", "gb2312"),
        ("GB-18030", "gb18030"),
    ):
        assert (charset.lookup(name).decoder, charset.lookup(name).encoder) == ("gb18030", enc)
    with pytest.raises(CharsetRefused, match="KOI8-R"):
        charset.lookup("KOI8-R")


@pytest.mark.parametrize("name", charset.NAMES)
def test_every_name_decodes_field_by_field(name: str) -> None:
    cs = charset.lookup(name)
    if cs.decoder is None:  # CNS 11643: a standard name without a decoder here: refused
        with pytest.raises(CharsetRefused, match="cannot be"):
            charset.decode(MSG.replace(b"2.5.1", b"2.5.1||||||" + name.encode()))
        return
    text = sample_for(cs)
    body = (
        f"MSH|^~\\&|LIS|LAB|||20261120||ADT^A08|C1|P|2.5||||||{name}\r"
        f"PID|1||X1||{text}^{text[:1]}||19500315\rNTE|1||{text}\\.br\\{text}\r"
    )
    raw = charset.encode(body, cs)
    decoded = charset.decode(raw)
    assert decoded.charset is cs
    msg = fields.parse(decoded.text, decoded.charset)
    pid = msg.segment("PID")
    assert (fields.value(pid, 5, 1), fields.value(pid, 5, 2), fields.value(pid, 3)) == (
        text,
        text[:1],
        "X1",
    )
    assert fields.value(msg.segment("NTE"), 3) == f"{text}\n{text}"
    assert fields.header(msg).charset == name


def test_gbk_trail_bytes_equal_to_delimiters_stay_inside_names() -> None:
    name = "億乗乛亊"  # 83 7C, 81 5C, 81 5E, 81 7E
    for declared in ("GBK", "GB 18030-2000", "CP936"):
        body = f"MSH|^~\\&|月坛億|LAB|||||ADT^A08|C1|P|2.5||||||{declared}\rPID|1||X||{name}\r"
        raw = body.encode("gb18030")
        text, cs = charset.decode(raw)
        assert fields.value(fields.parse(text, cs).segment("PID"), 5) == name
        assert fields.value(fields.parse(text, cs).segment("MSH"), 3) == "月坛億"


def test_utf8_under_a_single_byte_declaration_is_refused_or_overridden() -> None:
    body = "MSH|^~\\&|A|B|||||ADT^A08|C1|P|2.5||||||8859/1\rPID|1||X||张无忌\r"
    raw = body.encode("utf-8")
    with pytest.raises(CharsetRefused) as err:
        charset.decode(raw)
    assert err.value.field == "MSH-18" and "PID-5" in err.value.reason
    assert "张" not in err.value.message and "charset_override" in err.value.reason
    text, cs = charset.decode(raw, override="UNICODE UTF-8")
    assert cs.name == "UNICODE UTF-8"
    assert fields.value(fields.parse(text, cs).segment("PID"), 5) == "张无忌"
    # real Latin-1 under 8859/1 is read as such
    text, _ = charset.decode(body.replace("张无忌", "Müller").encode("latin-1"))
    assert text.endswith("Müller")


def test_utf8_under_a_two_byte_declaration() -> None:
    """UTF-8 中国人民医院 is also valid GB 18030 (as 涓浗浜烘皯鍖婚櫌): refused, not stored as
    that; a short real GB text that happens to be valid UTF-8 (隆隆 = C2 A1 C2 A1) is read as
    GB, since so few characters cannot tell the two apart."""
    body = "MSH|^~\\&|A|B|||||ADT^A08|C1|P|2.5||||||GB18030\rPID|1||X||{}\r"
    raw = body.format("中国人民医院").encode("utf-8")
    assert raw.decode("gb18030")  # it would decode: the mojibake the check prevents
    with pytest.raises(CharsetRefused) as err:
        charset.decode(raw)
    assert err.value.field == "MSH-18" and "PID-5" in err.value.reason
    assert "two-byte GB 18030-2000" in err.value.reason
    assert charset.decode(raw, override="UNICODE UTF-8").text.endswith("中国人民医院")
    short = body.format("隆隆").encode("gb18030")
    assert short.decode("utf-8") and charset.decode(short).text.endswith("隆隆")
    assert charset.decode(body.format("中国人民医院").encode("gb18030")).text.endswith("医院")


def test_bytes_invalid_in_the_declared_charset_name_the_field() -> None:
    body = "MSH|^~\\&|A|B|||||ADT^A08|C1|P|2.5||||||UNICODE UTF-8\rPID|1||X||王億\r"
    with pytest.raises(CharsetRefused) as err:
        charset.decode(body.encode("gb18030"))
    assert err.value.field == "MSH-18" and err.value.reason.startswith("PID-5 holds bytes")
    assert err.value.ack_code == "AR" and err.value.hl7_error == "102"


def test_empty_msh18_uses_the_default_and_wide_frames_are_known() -> None:
    body = "MSH|^~\\&|A|B|||||ADT^A08|C1|P|2.5\rPID|1||X||王\r"
    assert charset.decode(body.encode("gb18030"), "GB18030").text.endswith("王")
    for enc in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):
        wide = body.replace(
            "2.5", "2.5||||||UNICODE UTF-16" if "16" in enc else "2.5||||||UNICODE UTF-32"
        ).encode(enc)
        assert charset.decode(wide).text.endswith("王"), enc
    with pytest.raises(CharsetRefused, match="UTF-16"):
        charset.decode(body.replace("2.5", "2.5||||||8859/1").encode("utf-16"))


# -- fields --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msh2", ["^~ &", "^~\\", "^~\\&^", "^~\\&#!", "^A\\&", "^~\\\\&", "^~|&", "^~\\\t"]
)
def test_bad_msh2_is_refused(msh2: str) -> None:
    with pytest.raises(BadEncodingChars) as err:
        fields.parse(f"MSH|{msh2}|A|B|||||ADT^A08|1|P|2.5\rPID|1\r")
    assert err.value.ack_code == "AR" and err.value.field == "MSH-2"


def test_five_encoding_characters_and_other_delimiters() -> None:
    msg = fields.parse("MSH#$%*@!#A#B#####ADT$A08#1#P#2.7\rPID#1##X##a*F*b$c%d\r")
    assert msg.d == fields.Delimiters("#", "$", "%", "*", "@", "!")
    pid = msg.segment("PID")
    assert fields.value(pid, 5, 1, 1) == "a#b" and fields.value(pid, 5, 2) == "c"
    assert fields.value(pid, 5, 1, 2) == "d" and fields.reps(pid, 5) == 2
    assert fields.value(msg.segment("MSH"), 2) == "$%*@!"


def test_escapes_after_splitting() -> None:
    text = (
        "MSH|^~\\&|A|B|||||ORU^R01|1|P|2.5.1||||||GB 18030-2000\r"
        "NTE|1||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f^two~x\\.br\\y\\.sp2\\z|\\X837C\\|\\Zlocal\\|"
        "\\H\\bold\\N\\ \\.sk3\\end\r"
    )
    msg = fields.parse(text, charset.lookup("GB 18030-2000"))
    nte = msg.segment("NTE")
    assert fields.value(nte, 3, 1) == "a|b^c&d~e\\f"  # one component: escapes made no split
    assert fields.value(nte, 3, 2) == "two"
    assert fields.value(nte, 3, 1, 2) == "x\ny\n\nz"  # \.br\ is a newline, never CR
    assert fields.value(nte, 4) == "億"  # \Xhh\ bytes in the message's charset (GB 18030)
    assert fields.value(nte, 5) == "\\Zlocal\\"  # locally defined: kept as written
    assert fields.value(nte, 6) == "bold    end"
    for bad in ("a\\Fb", "\\\\", "\\X8\\", "\\C2842\\"):
        with pytest.raises(BadValue) as err:
            fields.value(
                fields.parse(f"MSH|^~\\&|A|B|||||X^Y|1|P|2.5\rNTE|1||{bad}\r").segment("NTE"), 3
            )
        assert err.value.field == "NTE-3"
    # writing: escape what needs it, newlines as \.br\, and read it back the same
    value = "a|b^c~d&e\\f\nsecond line"
    seg = fields.parse("MSH|^~\\&|A|B|||||X^Y|1|P|2.5\rNTE|1||" + build.esc(value) + "\r")
    assert fields.value(seg.segment("NTE"), 3, strip=False) == value


def test_hl7_null_is_not_empty() -> None:
    nte = fields.parse('MSH|^~\\&|A|B|||||X^Y|1|P|2.5\rNTE|1|""||x^""\r').segment("NTE")
    assert fields.is_null(fields.value(nte, 2)) and fields.value(nte, 2) == ""
    assert not fields.is_null(fields.value(nte, 3)) and fields.value(nte, 3) == ""
    assert not fields.is_null(fields.value(nte, 9))  # absent: not sent, not null
    assert fields.is_null(fields.value(nte, 4, 2)) and fields.value(nte, 4, 1) == "x"
    assert fields.dtm('""') is None


@pytest.mark.parametrize(
    ("text", "precision", "fhir"),
    [
        ("2026", "year", "2026"),
        ("202611", "month", "2026-11"),
        ("20261120", "day", "2026-11-20"),
        ("2026112009", "hour", "2026-11-20T09:00:00+08:00"),
        ("202611200930", "minute", "2026-11-20T09:30:00+08:00"),
        ("20261120093015", "second", "2026-11-20T09:30:15+08:00"),
        ("20261120093015.1", "fraction", "2026-11-20T09:30:15.1+08:00"),
        ("20261120093015.1234", "fraction", "2026-11-20T09:30:15.1234+08:00"),
        ("20261120093015-0500", "second", "2026-11-20T09:30:15-05:00"),
        ("202611200930+0000", "minute", "2026-11-20T09:30:00+00:00"),
        ("20261120+0100", "day", "2026-11-20"),
    ],
)
def test_dtm_at_every_precision(text: str, precision: str, fhir: str) -> None:
    t = fields.dtm(text, "OBX-14")
    assert t is not None and t.precision == precision
    assert fields.fhir_datetime(text, "OBX-14", "+0800") == fhir
    assert fields.fhir_datetime(text, "X", "+0800", instant=True) == (
        fhir if precision in ("second", "fraction") else None
    )
    if precision in ("minute", "second", "fraction"):
        at = datetime.fromisoformat(fields.read_ts(text, "RF1-7", timedelta(hours=8)))
        assert (at.year, at.month, at.day, at.hour, at.minute) == (2026, 11, 20, 9, 30)
    else:
        with pytest.raises(BadValue):
            fields.read_ts(text, "RF1-7", timedelta(hours=8))


@pytest.mark.parametrize(
    "bad",
    [
        "2026-11-20",
        "20261320",
        "20261131",
        "2026112",
        "202611200",
        "2026112025",
        "20261120093015.12345",
        "20261120+1500",
        "2026112009.5",
        "x",
    ],
)
def test_bad_dtm_names_the_field(bad: str) -> None:
    with pytest.raises(BadValue) as err:
        fields.dtm(bad, "OBR-7")
    assert err.value.field == "OBR-7"


def test_a_memoised_time_is_refused_every_time_and_names_each_callers_field() -> None:
    """``fhir_datetime`` is memoised (a lab message repeats its times): a bad value is refused
    on every call, each naming the field it was read from, and a good one is the same str."""
    for at in ("OBX-14", "OBR-7", "OBX-14"):
        with pytest.raises(BadValue) as err:
            fields.fhir_datetime("20261320", at, "+0800")
        assert err.value.field == at
    first = fields.fhir_datetime("202611200930", "OBX-14", "+0800")
    assert first == "2026-11-20T09:30:00+08:00"
    assert fields.fhir_datetime("202611200930", "OBX-14", "+0800") == first
    assert fields.fhir_datetime("202611200930", "OBX-14", "-0500") == "2026-11-20T09:30:00-05:00"


@pytest.mark.parametrize("version", fields.VERSIONS)
def test_versions_21_to_28_are_read(version: str) -> None:
    msg = fields.parse(f"MSH|^~\\&|A|B|||||ADT^A08|1|P|{version}\r")
    assert fields.header(msg).version == version


@pytest.mark.parametrize("version", ["2.0", "2.9", "3.0", "2.5.2", ""])
def test_other_versions_are_refused(version: str) -> None:
    with pytest.raises((VersionRefused, fields.V2Rejected)) as err:
        fields.header(fields.parse(f"MSH|^~\\&|A|B|||||ADT^A08|1|P|{version}\r"))
    assert err.value.field == "MSH-12" and err.value.ack_code == "AR"


# -- ACKs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", fields.VERSIONS)
def test_ack_err_follows_the_version(version: str) -> None:
    raw = MSG.replace(b"2.5.1", version.encode()).replace(b"|C1|", b"|C9|")
    to = ack.Answering.from_raw(raw)
    err = BadValue("not a valid date", field="OBX[2]-14")
    text = ack.build_ack(to, "AE", at=datetime(2026, 11, 20, tzinfo=UTC), error=err)
    msg = fields.parse(text)
    msh, msa, e = msg.segment("MSH"), msg.segment("MSA"), msg.segment("ERR")
    assert (fields.value(msh, 3), fields.value(msh, 5), fields.value(msh, 12)) == (
        "HUTONG",
        "LIS",
        version,
    )
    assert (fields.value(msa, 1), fields.value(msa, 2)) == ("AE", "C9")
    assert fields.value(msa, 3) == "OBX[2]-14: not a valid date"
    if version in ("2.1", "2.2", "2.3", "2.3.1", "2.4"):
        assert e[1] == "OBX^2^14^102&Data type error"
    else:
        assert (fields.value(e, 2, 1), fields.value(e, 2, 2), fields.value(e, 2, 3)) == (
            "OBX",
            "2",
            "14",
        )
        assert fields.value(e, 3) == "102" and fields.value(e, 4) == "E"
        assert fields.value(e, 8) == "OBX[2]-14: not a valid date"
    assert ack.read_ack(ack.encode(text, None)) == ("AE", "C9", "OBX[2]-14: not a valid date")


def test_ack_is_written_in_the_message_charset() -> None:
    raw = "MSH|^~\\&|月坛億|LAB|||||ORU^R01|C1|P|2.5||||||GBK\r".encode("gb18030")
    to = ack.Answering.from_raw(raw)
    assert to.charset == "GBK" and to.sending_app == ""  # non-ASCII MSH-3 not guessed
    text, cs = charset.decode(raw)
    to = ack.Answering.from_message(fields.parse(text, cs))
    out = ack.encode(ack.build_ack(to, "AA", at=datetime.now(UTC)), cs)
    assert "月坛億".encode("gbk") in out and ack.read_ack(out)[:2] == ("AA", "C1")


# -- bad input -----------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_PAYLOAD = st.binary(max_size=300).map(lambda b: b.replace(b"\x1c\r", b"\x1c"))


@FUZZ
@given(
    payloads=st.lists(_PAYLOAD.filter(lambda b: b.strip(b"\r\n\t ") != b""), max_size=5),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    limit=st.integers(1, 400),
)
@example(payloads=[b"\x00"], cuts=[3], limit=1)  # cut between <FS> and <CR> of a frame at the limit
def test_framing_is_the_same_whatever_the_chunks(
    payloads: list[bytes], cuts: list[int], limit: int
) -> None:
    """Any payloads, any split of the stream, any limit: each frame comes out once, whole if
    within the limit, else as an oversize fault with its digest; nothing else is invented."""
    stream = b"".join(b"\x0b" + p + b"\x1c\r" for p in payloads)
    reader = mllp.FrameReader(max_bytes=limit, keep_bytes=16)
    events: list[mllp.Event] = []
    last = 0
    for cut in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        events += reader.feed(stream[last:cut])
        last = cut
    assert reader.eof() is None and len(events) == len(payloads)
    for p, e in zip(payloads, events, strict=True):
        if len(p) <= limit:
            assert e == mllp.Frame(p)
        else:
            framed = b"\x0b" + p + b"\x1c\r"
            assert isinstance(e, mllp.Fault) and e.kind == "oversize"
            assert e.sha256 == hashlib.sha256(framed).hexdigest()
            assert e.prefix == (b"\x0b" + p)[:16] and e.size == len(framed)


KIT_FIXTURES = sorted((Path(__file__).parent / "fixtures" / "hl7").rglob("*.hl7"))


def read_everything(raw: bytes) -> None:
    """What a listener does with bytes before the adapter's own rules: only V2Error may stop
    it (AR/AE naming a field); anything else would be a crash."""
    try:
        text, cs = charset.decode(raw, "GB 18030-2000")
        msg = fields.parse(text, cs)
        fields.header(msg)
        ack.Answering.from_message(msg)
        for seg in msg:
            for f in range(1, len(seg)):
                for r in range(1, fields.reps(seg, f) + 1):
                    fields.rep_text(seg, f, r)
                    fields.dtm(fields.value(seg, f, 1, r), f"{seg.name}-{f}") if fields.value(
                        seg, f, 1, r
                    ).isdigit() else None
    except V2Error as exc:
        assert exc.field and exc.ack_code in ("AE", "AR")
    ack.Answering.from_raw(raw)


@pytest.mark.parametrize("fixture", KIT_FIXTURES, ids=[f.stem for f in KIT_FIXTURES])
def test_edited_fixtures_end_in_a_named_refusal_or_a_reading(fixture: Path) -> None:
    original = fixture.read_bytes()

    @FUZZ
    @given(raw=mutated(original))
    def run(raw: bytes) -> None:
        read_everything(raw)

    run()


@FUZZ
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_end_in_a_named_refusal_or_a_reading(raw: bytes) -> None:
    read_everything(b"MSH|^~\\&|" + raw)
    read_everything(raw)
