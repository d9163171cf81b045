"""atheris target: the packet, receipt and batch decoders (see fuzz/README.md)."""

import sys

import atheris

with atheris.instrument_imports():
    from bridge.crypto import envelope as env
    from bridge.errors import PacketRefused


def one(data: bytes) -> None:
    for call in (
        lambda: env.decode_batch(data, max_items=50, max_total=1 << 20),
        lambda: env.decode(data, max_body=1 << 20),
        lambda: env.verify_receipt(data, lambda _n: ()),
        lambda: env.receipt_fields(data),
        lambda: env.frame_kind(data),
    ):
        try:
            call()
        except PacketRefused:
            pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
