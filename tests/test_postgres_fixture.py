"""The PostgreSQL fixtures (tests/conftest.py) give a working, UTF-8, per-test database."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url


def connect(dsn: str) -> psycopg.Connection:
    url = make_url(dsn)
    assert url.drivername == "postgresql+psycopg"
    return psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))


@pytest.mark.postgres
def test_round_trip_chinese_text(pg_db: str, pg_dsn: str):
    text = "互通：华溪县人民医院检验科 → 血常规（白细胞 11.2×10⁹/L）"
    assert make_url(pg_db).database.startswith("hutong_")
    assert make_url(pg_db).database != make_url(pg_dsn).database
    with connect(pg_db) as conn:
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        conn.execute("CREATE TABLE note (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO note (body) VALUES (%s)", (text,))
        conn.commit()
    with connect(pg_db) as conn:
        assert conn.execute("SELECT body, char_length(body) FROM note").fetchall() == [
            (text, len(text))
        ]
