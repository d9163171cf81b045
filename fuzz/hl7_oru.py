"""atheris target: the LIS ORU^R01 intake chain of adapters/lis (see fuzz/README.md)."""

import sys

import atheris

with atheris.instrument_imports():
    from adapters.lis.errors import LisMessageError
    from adapters.lis.intake import decode
    from adapters.lis.oru import Settings, header, parse, to_fhir
    from bridge.errors import InvalidFhir
    from bridge.fhir.validate import validate_bundle

SETTINGS = Settings(
    node_id="core",
    hash_key=bytes(range(32)),
    national_id_system="urn:oid:2.16.156.10011.1.3",
    local_system="http://hutong.dev/CodeSystem/fxlab/lab",
)


def one(data: bytes) -> None:
    try:
        text, cs = decode(data, "UTF-8")
        msg = parse(text, cs)
        validate_bundle(to_fhir(msg, header(msg), SETTINGS).bundle)
    except (LisMessageError, InvalidFhir):
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
