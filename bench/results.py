"""Results benchmark: ORU^R01 -> validated FHIR, messages per second, beside its parts.

Run ``.venv/bin/python bench/results.py [--quick] [--count N]``. On the same machine, same run:

1. **Bare library parse**: ``hl7.parse`` of a decoded message (python-hl7 alone).
2. **Bare resource construction**: ``adapters.lis.oru.to_fhir`` on an already parsed message
   (Patient, 2 DiagnosticReports, 2 Specimens, 8 Observations, LOINC mapping, as dicts).
3. **Schema validation**: ``bridge.fhir.validate.validate_bundle`` of that Bundle (once).
4. **In-process pipeline**: decode by MSH-18 + parse + MSH checks + construct + validate: the
   adapter's CPU per message without the store.
5. **End to end, real process**: a node (``hutong run``) with the ``lis-hl7`` adapter, N
   messages sent over one MLLP connection by python-hl7's ``MLLPClient``, each answered only
   after its resources, raw message and ACK are durably committed (SQLite WAL,
   synchronous=FULL): ORU -> validated, stored FHIR, messages per second as the LIS sees it.

Each message is realistic (``simulators.lis.oru_message``: 2 OBR groups, 8 OBX, SPM, NTE,
Chinese text, about 1.6 KB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hl7
from hl7.client import MLLPClient

from adapters.lis.intake import decode
from adapters.lis.oru import Settings, header, parse, to_fhir
from bridge.fhir.validate import validate_bundle
from bridge.mapping import load_site
from simulators.lis import oru_message
from tests.harness import Alliance, free_port_block
from tests.lis_site import write_site


def per_second(func: Callable[[Any], Any], items: list[Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            func(x)
        best = min(best, time.perf_counter() - t0)
    return len(items) / best


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer messages (under a minute)")
    p.add_argument("--count", type=int, help="messages end to end (default 2000, quick 300)")
    args = p.parse_args()
    r = measure(args.count or (300 if args.quick else 2000))
    return 0 if r["refused"] == 0 else 1


def measure(n: int) -> dict[str, Any]:
    """Every figure of the module docstring; prints them and returns them (msg/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        site = write_site(root / "mappings" / "fxlab")
        raws = [oru_message(i) for i in range(1, min(n, 500) + 1)]
        decoded = [decode(r, "UTF-8") for r in raws]
        texts = [t for t, _ in decoded]
        msgs = [parse(t, cs) for t, cs in decoded]
        heads = [header(m) for m in msgs]
        cfg = Settings(
            node_id="core",
            hash_key=bytes(32),
            national_id_system="urn:oid:2.16.156.10011.1.3",
            local_system="http://hutong.dev/CodeSystem/fxlab/lab",
            translator=load_site(site).translator(),
        )
        bundles = [to_fhir(m, h, cfg).bundle for m, h in zip(msgs, heads, strict=True)]
        size = sum(map(len, raws)) / len(raws)

        def pipeline(raw: bytes) -> None:
            text, cs = decode(raw, "UTF-8")
            msg = parse(text, cs)
            validate_bundle(to_fhir(msg, header(msg), cfg).bundle)

        validate_bundle(bundles[0])  # compile the schema before timing
        rates = {
            "bare python-hl7 parse": per_second(hl7.parse, texts),
            "bare resource construction (to_fhir)": per_second(
                lambda mh: to_fhir(mh[0], mh[1], cfg), list(zip(msgs, heads, strict=True))
            ),
            "schema validation of the Bundle": per_second(validate_bundle, bundles),
            "in-process ORU -> validated FHIR (no store)": per_second(pipeline, raws),
        }
        port = free_port_block(1)
        members = [
            {
                "id": "core",
                "zh": "复兴医院",
                "en": "Fuxing Hospital",
                "role": "core",
                "adapters": [
                    {
                        "name": "lis",
                        "type": "lis-hl7",
                        "mappings": str(site),
                        "options": {
                            "port": port,
                            "rate_limit": {"per_second": 100000, "burst": 100000, "hold_s": 0},
                        },
                    }
                ],
            },
            {"id": "chc", "zh": "月坛社区卫生服务中心", "en": "Yuetan CHC", "role": "community"},
        ]
        a = Alliance(
            root / "alliance", members, [{"from": "core", "to": "chc", "kinds": ["result.lab"]}]
        )
        try:
            a.start("core")
            with MLLPClient("127.0.0.1", port) as client:
                client.socket.settimeout(60)
                client.send_message(oru_message(10_000_000))  # warm-up (schema, connections)
                t0 = time.perf_counter()
                refused = 0
                for i in range(1, n + 1):
                    if b"MSA|AA" not in client.send_message(oru_message(i)):
                        refused += 1
                elapsed = time.perf_counter() - t0
        finally:
            a.stop_all()
    print(f"ORU^R01 -> FHIR R4 ({size:.0f} bytes/message, 8 OBX in 2 OBR groups)")
    for name, rate in rates.items():
        print(f"  {name:<48} {rate:9.0f} msg/s  ({1e6 / rate:7.0f} µs)")
    e2e = n / elapsed
    print(
        f"  {'end to end over MLLP, durable, one connection':<48} {e2e:9.0f} msg/s  "
        f"({1e6 / e2e:7.0f} µs)  [{n} messages, {refused} not AA]"
    )
    return {
        "bytes_per_message": size,
        "rates": rates,
        "end_to_end_per_s": e2e,
        "n": n,
        "refused": refused,
    }


if __name__ == "__main__":
    sys.exit(main())
