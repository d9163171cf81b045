"""Shared set-up for LIS tests: a site mapping folder (lab map), a self-signed TLS certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

LOCAL = "http://hutong.dev/CodeSystem/fxlab/lab"
LAB_ROWS = [
    ("WBC", "白细胞计数", "6690-2"),
    ("HGB", "血红蛋白", "718-7"),
    ("PLT", "血小板计数", "777-3"),
    ("NEUT%", "中性粒细胞百分比", "770-8"),
    ("CBC", "血常规", "58410-2"),
    ("BIOCHEM", "生化全套", "24323-8"),
    ("CRP", "C反应蛋白", "1988-5"),
    ("HBSAG", "乙肝表面抗原", "5196-1"),
    ("GLU", "葡萄糖", "2345-7"),
    ("RBC", "红细胞计数", "789-8"),
    ("CREA", "肌酐", "2160-0"),
    ("ALT", "丙氨酸氨基转移酶", "1742-6"),
    ("TC", "总胆固醇", "2093-3"),
    ("HBA1C", "糖化血红蛋白", "4548-4"),
]


def write_site(folder: Path) -> Path:
    codes = folder / "codes"
    codes.mkdir(parents=True, exist_ok=True)
    (codes / "maps.csv").write_text(
        "map,title_zh,title_en,source_system,target_system\n"
        f"lab,检验科项目→LOINC,Lab items to LOINC,{LOCAL},http://loinc.org\n",
        encoding="utf-8",
    )
    (codes / "lab.csv").write_text(
        "source_code,source_display,target_code,target_display,equivalence\n"
        + "".join(f"{c},{d},{t},,equivalent\n" for c, d, t in LAB_ROWS),
        encoding="utf-8",
    )
    return folder


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key, PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hutong-lis-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "lis.crt", folder / "lis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
