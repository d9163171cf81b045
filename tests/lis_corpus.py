"""The third-party HL7 v2 corpus (tests/fixtures/hl7v2-corpus) split as a sender would send it,
and the LIS outcome table that pins what the LIS listener does with each ORU^R01.

Splitting (the corpus README): a UTF-8 BOM is dropped, CR, LF and CRLF all end a segment and a
sender ends them with CR, a message starts at each ``MSH`` line and goes in its own MLLP frame;
batch envelopes (FHS/BHS/BTS/FTS), blank lines and the text files' comment lines (``//``,
``/*``, `` *``) are not sent. Every other line is sent as it is, even one that is no proper
segment (a sender does not repair its messages), and the bytes are otherwise unchanged.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).parent / "fixtures" / "hl7v2-corpus"
OUTCOMES = CORPUS / "outcomes-lis.tsv"
COLUMNS = (
    "file",
    "index",
    "control_id",
    "version",
    "outcome",
    "ack",
    "reports",
    "observations",
    "code",
    "justification",
)
_BATCH = (b"FHS", b"BHS", b"BTS", b"FTS")
_NOTES = (b"//", b"/*", b"*")  # comment lines of the text files, between their messages


@dataclass(frozen=True)
class CorpusMessage:
    file: str  # path under CORPUS
    index: int  # 0-based position of the message in its file
    raw: bytes  # as sent: segments ended by CR

    @property
    def msh(self) -> list[str]:
        first = self.raw.split(b"\r", 1)[0].decode("latin-1")
        return first.split(first[3]) if len(first) > 3 else [first]

    def msh_field(self, n: int) -> str:
        """MSH-n as written (MSH-1 is the separator itself)."""
        f = self.msh
        return f[n - 1] if 0 < n - 1 < len(f) else ""

    @property
    def message_type(self) -> str:
        parts = self.msh_field(9).split("^")
        return f"{parts[0]}^{parts[1] if len(parts) > 1 else ''}"


def split(data: bytes) -> list[bytes]:
    """One file's bytes -> the messages a sender would frame, segments ended by CR."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    messages: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in lines:
        if line.startswith(b"MSH") and len(line) > 3:
            current = [line]
            messages.append(current)
        elif line[:3] in _BATCH:
            current = None
        elif current is not None and line.strip() and not line.lstrip().startswith(_NOTES):
            current.append(line)
    return [b"\r".join(m) + b"\r" for m in messages]


def messages() -> list[CorpusMessage]:
    """Every message of the corpus, files in path order."""
    out = []
    for path in sorted(CORPUS.rglob("*")):
        if (
            not path.is_file()
            or path.suffix not in (".hl7", ".txt")
            or path.name.startswith(("LICENSE", "README"))
        ):
            continue
        rel = path.relative_to(CORPUS).as_posix()
        out += [CorpusMessage(rel, i, raw) for i, raw in enumerate(split(path.read_bytes()))]
    return out


def oru_messages() -> list[CorpusMessage]:
    """The ORU^R01 messages (MSH-9 ``ORU^R01``, also ``ORU`` with the trigger left out)."""
    return [m for m in messages() if m.message_type in ("ORU^R01", "ORU^")]


def read_outcomes(path: Path = OUTCOMES) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_outcomes(rows: list[dict[str, str]], path: Path = OUTCOMES) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
