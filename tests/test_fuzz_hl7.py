"""Bad-input suite, HL7 v2 intake (the LIS ORU^R01 path of ``adapters/lis``): bytes -> charset
-> the HL7 v2 kit's parse -> MSH checks -> FHIR -> R4 validation, as the adapter runs it.

Arbitrary bytes and the shipped fixtures with one to three edits may only end in the adapter's
own refusal tree (``LisMessageError``, answered AE/AR) or ``InvalidFhir`` (which the adapter
turns into AE); anything else is a crash the listener would turn into a dropped connection."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapters.lis.errors import LisMessageError
from adapters.lis.intake import decode
from adapters.lis.oru import Settings, header, parse, to_fhir
from bridge.errors import InvalidFhir
from bridge.fhir.validate import validate_bundle
from tests.fuzzkit import mutated

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIXTURES = sorted((Path(__file__).parent / "fixtures" / "hl7" / "lis").glob("*.hl7"))
SETTINGS = Settings(
    node_id="core",
    hash_key=bytes(range(32)),
    national_id_system="urn:oid:2.16.156.10011.1.3",
    local_system="http://hutong.dev/CodeSystem/fxlab/lab",
)


def intake(raw: bytes) -> dict | None:
    """The adapter's chain; the FHIR Bundle when the message is taken, None when refused."""
    try:
        text, cs = decode(raw, "UTF-8")
        msg = parse(text, cs)
        results = to_fhir(msg, header(msg), SETTINGS)
        validate_bundle(results.bundle)
    except (LisMessageError, InvalidFhir) as exc:
        assert exc.message
        return None
    return results.bundle


def test_fixtures_are_taken() -> None:
    """The control: every unedited fixture becomes a valid Bundle."""
    assert FIXTURES
    for f in FIXTURES:
        assert intake(f.read_bytes()) is not None, f.name


@FUZZ
@given(raw=st.binary(max_size=400))
@example(raw=b"MSH|^~\\&|")
@example(raw=b"MSH")
@example(raw=b"MSH|^~\\&|LIS|FX|||20261120||ORU^R01|1|P|2.5.1\rOBX|1|NM|" + b"^" * 2000)
def test_arbitrary_bytes(raw: bytes) -> None:
    intake(b"MSH|^~\\&|" + raw)
    intake(raw)


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.stem for f in FIXTURES])
def test_edited_fixtures(fixture: Path) -> None:
    original = fixture.read_bytes()

    @FUZZ
    @given(raw=mutated(original))
    def run(raw: bytes) -> None:
        intake(raw)

    run()
