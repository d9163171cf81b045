"""atheris target: FHIR R4 Bundle parsing and validation (see fuzz/README.md)."""

import sys

import atheris

with atheris.instrument_imports():
    from bridge.errors import InvalidFhir
    from bridge.fhir.validate import parse_and_validate_bundle


def one(data: bytes) -> None:
    try:
        parse_and_validate_bundle(data)
    except InvalidFhir:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
