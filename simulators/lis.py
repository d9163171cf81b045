"""A hospital LIS (检验信息系统) that reports results as HL7 v2 ORU^R01 over MLLP.

It is a separate process on the hospital side of the ``lis-hl7`` adapter and uses python-hl7's
``MLLPClient`` (never Hutong's own code) to send::

    python -m simulators.lis send --port 2575 msg1.hl7 msg2.hl7        # prints each MSA-1
    python -m simulators.lis send-dir --port 2575 exports/              # an export-only LIS
    python -m simulators.lis generate --count 100 --out exports/         # realistic messages

Generated messages look like a Chinese LIS's: a CBC and a biochemistry panel per message,
local item codes (WBC, GLU ...), printed units ("10^9/L" escaped as ``10\\S\\9/L``), Chinese
names and comments, reference ranges and H/L flags, charset UTF-8 or GB18030 per MSH-18.
"""

from __future__ import annotations

import argparse
import random
import ssl
import sys
from datetime import datetime, timedelta
from pathlib import Path

from adapters.hl7v2.ack import ack_code_of
from adapters.lis.sender import send_folder, send_messages

#: (code, name, unit (v2-escaped), low, high, decimals)
PANEL_CBC = [
    ("WBC", "白细胞计数", "10\\S\\9/L", 3.5, 9.5, 1),
    ("RBC", "红细胞计数", "10\\S\\12/L", 3.8, 5.1, 2),
    ("HGB", "血红蛋白", "g/L", 115, 150, 0),
    ("PLT", "血小板计数", "10\\S\\9/L", 125, 350, 0),
]
#: a full blood count as analysers report it (16 items): with PANEL_BIO a 20-OBX message
PANEL_CBC_FULL = PANEL_CBC + [
    ("HCT", "红细胞压积", "%", 35, 45, 1),
    ("MCV", "平均红细胞体积", "fL", 82, 100, 1),
    ("MCH", "平均红细胞血红蛋白含量", "pg", 27, 34, 1),
    ("MCHC", "平均红细胞血红蛋白浓度", "g/L", 316, 354, 0),
    ("RDW", "红细胞分布宽度", "%", 11.5, 14.5, 1),
    ("MPV", "平均血小板体积", "fL", 7.4, 12.5, 1),
    ("NEUT%", "中性粒细胞百分比", "%", 40, 75, 1),
    ("LYMPH%", "淋巴细胞百分比", "%", 20, 50, 1),
    ("MONO%", "单核细胞百分比", "%", 3, 10, 1),
    ("EOS%", "嗜酸性粒细胞百分比", "%", 0.4, 8, 1),
    ("BASO%", "嗜碱性粒细胞百分比", "%", 0, 1, 1),
    ("NEUT#", "中性粒细胞绝对值", "10\\S\\9/L", 1.8, 6.3, 2),
]
#: LOINC of the items PANEL_CBC_FULL adds (for a site map; tests.lis_site maps the others)
FULL_CBC_LOINC = {
    "HCT": "4544-3",
    "MCV": "787-2",
    "MCH": "785-6",
    "MCHC": "786-4",
    "RDW": "788-0",
    "MPV": "32623-1",
    "NEUT%": "770-8",
    "LYMPH%": "736-9",
    "MONO%": "5905-5",
    "EOS%": "713-8",
    "BASO%": "706-2",
    "NEUT#": "751-8",
}
PANEL_BIO = [
    ("GLU", "葡萄糖", "mmol/L", 3.9, 6.1, 2),
    ("CREA", "肌酐", "μmol/L", 41, 73, 0),
    ("ALT", "丙氨酸氨基转移酶", "U/L", 7, 40, 0),
    ("TC", "总胆固醇", "mmol/L", 2.8, 5.2, 2),
]


def oru_message(
    n: int,
    *,
    national_id: str = "110102195003151234",
    mrn: str = "FX0012345",
    name: tuple[str, str] = ("王", "秀英"),
    charset: str = "UNICODE UTF-8",
    facility: str = "FXLAB",
    version: str = "2.5.1",
    status: str = "F",
    seed: int | None = None,
    at: datetime | None = None,
    full_cbc: bool = False,
) -> bytes:
    """One realistic ORU^R01 with two OBR groups (CBC + biochemistry), encoded per MSH-18:
    8 OBX, or 20 with ``full_cbc`` (the 16 items of a full blood count)."""
    rnd = random.Random(n if seed is None else seed)
    at = at or datetime(2026, 11, 20, 9, 30)
    ts = (at + timedelta(minutes=n)).strftime("%Y%m%d%H%M%S")
    drawn = (at - timedelta(hours=1)).strftime("%Y%m%d%H%M%S")
    segs = [
        (
            f"MSH|^~\\&|LIS|{facility}|HUTONG|HOSPITAL|{ts}||ORU^R01^ORU_R01|{facility}-{n:08d}|P|"
            f"{version}|||AL|NE|CHN|{charset}"
        ),
        (
            f"PID|1||{mrn}^^^{facility}^MR~{national_id}^^^2.16.156.10011.1.3^NI||"
            f"{name[0]}^{name[1]}||19500315|F"
        ),
    ]
    cbc = PANEL_CBC_FULL if full_cbc else PANEL_CBC
    for g, (panel, pcode, pname) in enumerate(
        ((cbc, "CBC", "血常规"), (PANEL_BIO, "BIOCHEM", "生化全套")), start=1
    ):
        filler = f"{facility}-{n:08d}-{g}"
        segs.append(
            f"OBR|{g}|ORD-{n}-{g}|{filler}|{pcode}^{pname}^L|||{drawn}|||||||{drawn}||"
            f"DR001^李^明||||||{ts}|||{status}"
        )
        for i, (code, cname, unit, low, high, dec) in enumerate(panel, start=1):
            value = round(rnd.uniform(low * 0.7, high * 1.3), dec)
            text = f"{value:.{dec}f}"
            flag = "H" if value > high else "L" if value < low else "N"
            segs.append(
                f"OBX|{i}|NM|{code}^{cname}^L||{text}|{unit}|{low}-{high}|{flag}|||{status}|||{ts}"
            )
        segs.append(f"NTE|1||{pname}已审核")
        segs.append(
            f"SPM|1|SP{n:06d}{g}^SP{n:06d}{g}||{'BLD^全血' if g == 1 else 'SER^血清'}"
            f"^HL70487|||||||||||||{drawn}|{drawn}"
        )
    codec = "gb18030" if "GB" in charset.upper() else "utf-8"
    return ("\r".join(segs) + "\r").encode(codec)


def _tls(ca: str | None) -> ssl.SSLContext | None:
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.lis", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("send", "send-dir"):
        s = sub.add_parser(name)
        s.add_argument("--host", default="127.0.0.1")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--tls-ca", help="trust this CA for the listener's TLS certificate")
        s.add_argument("paths", nargs="+" if name == "send" else 1)
    g = sub.add_parser("generate")
    g.add_argument("--count", type=int, default=10)
    g.add_argument("--out", required=True)
    g.add_argument("--charset", default="UNICODE UTF-8")
    args = p.parse_args(argv)
    if args.cmd == "send":
        acks = send_messages(
            args.host, args.port, [Path(x).read_bytes() for x in args.paths], tls=_tls(args.tls_ca)
        )
        for path, ack in zip(args.paths, acks, strict=True):
            print(path, ack_code_of(ack))
        return 0
    if args.cmd == "send-dir":
        counts = send_folder(Path(args.paths[0]), args.host, args.port, tls=_tls(args.tls_ca))
        print(counts)
        return 0 if counts["refused"] == 0 else 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in range(1, args.count + 1):
        (out / f"oru-{n:06d}.hl7").write_bytes(oru_message(n, charset=args.charset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
