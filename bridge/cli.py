"""`hutong`: run a node and operate it. Every error is one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from bridge.errors import HutongError
from bridge.mapping.cli import mapping_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Hutong (互通) node and tools",
)
outbox_app = typer.Typer(no_args_is_help=True, help="What waits to leave, and retries")
quarantine_app = typer.Typer(no_args_is_help=True, help="Refused inputs: inspect and replay")
audit_app = typer.Typer(no_args_is_help=True, help="Verify and export the audit chain")
keys_app = typer.Typer(no_args_is_help=True, help="Node keys")
config_app = typer.Typer(no_args_is_help=True, help="Site configuration")
app.add_typer(outbox_app, name="outbox")
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")
app.add_typer(mapping_app, name="mapping")
from bridge.people_cli import register as _register_people  # noqa: E402 - users, tokens, messages

_register_people(app, audit_app)

out = Console()
# errors: one line each, exactly as written (no hard wrap at 80 columns, no markup parsing)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="the node's config file")]


def _plan(config: Path) -> Any:
    from bridge.config.loader import load_node

    return load_node(config)


def _ctx(config: Path) -> Any:
    from bridge.context import NodeContext

    return NodeContext.open(_plan(config))


def _when(text: str | None, ctx: Any = None) -> datetime | None:
    """A typed time by the one rule of bridge.timeinput: an offset, a date alone or a relative
    form (-2h, yesterday); without an offset, the node's display zone (as on the pages)."""
    if not text:
        return None
    from bridge.people_cli import when

    if ctx is None:
        from bridge.timeinput import TIME_RULE, parse_when, zone

        try:
            return parse_when(text, zone(None))
        except ValueError:
            raise HutongError(TIME_RULE) from None
    return when(text, ctx)


def _shown(value: datetime | None, ctx: Any) -> str:
    """A time for people: the node's display zone, with its offset."""
    from bridge.timeinput import show, zone

    return show(value, zone(ctx.plan.web.display_zone)) if value is not None else "-"


@app.command()
def run(config: ConfigOpt) -> None:
    """Run a node: peer gateway, local API and delivery jobs, until Ctrl-C."""
    from bridge.filemodes import describe, open_to_others, private_umask
    from bridge.node import Node
    from bridge.startup import check_sqlite, lock_data_dir

    private_umask()  # database, WAL, spool, DICOM files, logs: 0600/0700 from the first byte
    plan = _plan(config)
    lock_data_dir(plan.data_dir)  # one 'hutong run' per data folder (workers take none)
    from bridge.portcheck import RUN_HINT, check_free

    for host, port in ((plan.peer_host, plan.peer_port), (plan.local_host, plan.local_port)):
        check_free({port}, host, RUN_HINT)  # one line naming the port, not a uvicorn log
    check_sqlite(plan)  # PRAGMA quick_check; a deleted store that an anchor remembers
    for path, mode in open_to_others([plan.data_dir], limit=20):
        err.print(f"warning: {describe(path, mode)}")
    node = Node(plan)
    p = node.plan
    err.print(
        f"hutong node {p.node_id}: peer port {p.peer_host}:{p.peer_port}, "
        f"local port {p.local_host}:{p.local_port}"
    )
    node.run()


@app.command()
def worker(config: ConfigOpt) -> None:
    """Run an extra send/deliver process of a node on its shared PostgreSQL store (no ports)."""
    from bridge.filemodes import private_umask
    from bridge.worker import check_store, run_worker

    private_umask()
    plan = _plan(config)
    check_store(plan)
    err.print(f"hutong worker of {plan.node_id}: send and deliver jobs on the shared store")
    run_worker(plan)


@app.command()
def send(
    config: ConfigOpt,
    to: Annotated[str, typer.Option(help="recipient member id")],
    kind: Annotated[str, typer.Option(help="packet kind, e.g. referral.request")],
    bundles: Annotated[list[Path], typer.Argument(help="FHIR R4 Bundle JSON files")],
    thread: Annotated[str | None, typer.Option(help="thread (referral) id")] = None,
) -> None:
    """Queue packets (one per bundle file); the running node sends them."""
    from bridge.delivery.queue import Outgoing, queue_packets

    ctx = _ctx(config)
    items = [Outgoing(to, kind, b.read_bytes(), thread) for b in bundles]
    with ctx.store.write() as conn:
        results = queue_packets(ctx, conn, items, actor="cli")
    failed = 0
    for path, r in zip(bundles, results, strict=True):
        if r.error is None:
            out.print(f"queued {r.packet_id}  {path.name}")
        else:
            failed += 1
            err.print(f"refused {path.name}: {r.error}")
    raise typer.Exit(1 if failed else 0)


@outbox_app.command("list")
def outbox_list(
    config: ConfigOpt,
    state: Annotated[str | None, typer.Option(help="queued|sent|acknowledged|dead|refused")] = None,
    peer: Annotated[str | None, typer.Option(help="next hop")] = None,
    limit: Annotated[int, typer.Option(help="rows per page (1..1000)")] = 100,
    after: Annotated[str | None, typer.Option(help="next-page token of a previous list")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """What waits, for how long, and why: oldest first, one page, with how many match in all
    and the next page's --after (--json: the rows on stdout, that line on stderr)."""
    from bridge import ops
    from bridge.store.tables import OUTBOX

    ctx = _ctx(config)
    stmt, where = ops.outbox_query(state=state, peer=peer)
    rows, total, nxt = _page(ctx, stmt, where, [OUTBOX.c.id], desc=False, limit=limit, after=after)
    rows = ops.with_age(ctx, rows)
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        _count_line(total, len(rows), nxt, "packets", as_json)
        return
    summary = ops.queue_summary(ctx)
    t = Table(title=f"outbox of {ctx.node_id}: per peer")
    for col in ("peer", "queued", "sent", "dead", "refused", "acknowledged", "oldest waiting s"):
        t.add_column(col)
    for p in summary["outbox"]:
        t.add_row(
            p["peer"],
            *(str(p.get(k, 0)) for k in ("queued", "sent", "dead", "refused", "acknowledged")),
            str(p["oldest_waiting_s"] or "-"),
        )
    out.print(t)
    t = Table(title="waiting and failed packets")
    for col in ("id", "packet", "to", "via", "kind", "seq", "state", "tries", "age s", "why"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r["id"]),
            r["packet_id"][:8],
            r["recipient"],
            r["next_hop"],
            r["kind"],
            str(r["seq"]),
            r["state"],
            str(r["attempts"]),
            str(r["age_s"]),
            (r["last_error"] or "")[:60],
        )
    out.print(t)
    _count_line(total, len(rows), nxt, "packets", as_json)


def _page(
    ctx: Any,
    stmt: Any,
    where: list[Any],
    order: list[Any],
    *,
    desc: bool,
    limit: int,
    after: str | None,
) -> tuple[list[dict[str, Any]], int, str | None]:
    """One keyset page of a list, as ``/local/v1`` pages it (bridge/api/paging.py)."""
    from bridge.api import paging

    with ctx.store.read() as conn:
        return paging.page(
            conn, stmt, where=where, order=order, desc=desc, limit=limit, after=after
        )


def _count_line(total: int, shown: int, nxt: str | None, what: str, as_json: bool) -> None:
    """How many match in all and how to get the next page: no list stops silently."""
    line = f"{total:,} {what} in all, {shown} shown" + (
        f"; next page: --after {nxt}" if nxt else ""
    )
    (err if as_json else out).print(line, soft_wrap=True)


@outbox_app.command("retry")
def outbox_retry(
    config: ConfigOpt,
    ids: Annotated[
        list[int] | None, typer.Argument(help="outbox row ids (default: all dead)")
    ] = None,
    peer: Annotated[str | None, typer.Option()] = None,
    waiting: Annotated[bool, typer.Option(help="also retry queued rows now")] = False,
) -> None:
    """Re-queue dead packets (or those backing off, with --waiting) for sending now."""
    from bridge import ops

    states = ("dead", "queued") if waiting else ("dead",)
    n = ops.outbox_retry(_ctx(config), ids=ids or None, peer=peer, states=states, actor="cli")
    out.print(f"re-queued {n} packet(s)")


@quarantine_app.command("list")
def quarantine_list(
    config: ConfigOpt,
    state: Annotated[str, typer.Option(help="held|replayed|all")] = "held",
    limit: Annotated[int, typer.Option(help="items per page (1..1000)")] = 100,
    after: Annotated[str | None, typer.Option(help="next-page token of a previous list")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Refused inputs, newest first, one page, with how many there are in all and the next
    page's --after (--json: the headers on stdout, that line on stderr; no bytes, no body)."""
    from bridge.store import quarantine
    from bridge.store.tables import QUARANTINE

    ctx = _ctx(config)
    stmt, where = quarantine.list_query(state=None if state == "all" else state)
    rows, total, nxt = _page(
        ctx, stmt, where, [QUARANTINE.c.id], desc=True, limit=limit, after=after
    )
    what = "items" if state == "all" else f"{state} items"
    if as_json:
        out.print_json(json.dumps(rows, default=str, ensure_ascii=False))
        _count_line(total, len(rows), nxt, what, as_json)
        return
    t = Table(title=f"quarantine of {ctx.node_id}")
    for col in ("id", "at", "source", "code", "from", "kind", "state", "reason"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r["id"]),
            _shown(r["at"], ctx),
            r["source"],
            r["code"],
            r["sender"] or "-",
            r["kind"] or "-",
            r["state"],
            r["message"][:70],
        )
    out.print(t)
    _count_line(total, len(rows), nxt, what, as_json)


@quarantine_app.command("show")
def quarantine_show(config: ConfigOpt, item_id: int) -> None:
    from bridge.store import quarantine

    ctx = _ctx(config)
    with ctx.store.read() as conn:
        item = quarantine.get_item(conn, item_id)
    raw, body = item.pop("raw"), item.pop("body")
    item["raw_bytes"] = len(raw)
    item["body_bytes"] = len(body) if body else None
    out.print_json(json.dumps(item, default=str, ensure_ascii=False))
    if body:
        out.print("readable body (kept for IT on this node only):")
        out.print(body.decode("utf-8", "replace")[:4000])


@quarantine_app.command("replay")
def quarantine_replay(config: ConfigOpt, item_id: int) -> None:
    """Run a held item through intake again, e.g. after adding a rule or a key."""
    from bridge import ops
    from bridge.gateway.intake import Intake
    from bridge.store import quarantine

    ctx = _ctx(config)
    with ctx.store.read() as conn:
        source = str(quarantine.get_item(conn, item_id)["source"])
    if source.startswith("adapter:"):  # the adapter lives in the running node
        ok, result = _replay_on_node(ctx.plan, item_id)
    else:
        ok, result = ops.quarantine_replay(ctx, Intake(ctx), item_id, actor="cli")
    (out if ok else err).print(f"{'replayed' if ok else 'still refused'}: {result}")
    raise typer.Exit(0 if ok else 1)


def _replay_on_node(plan: Any, item_id: int) -> tuple[bool, str]:
    """POST /local/v1/quarantine/{id}/replay to this node with its IT token."""
    import urllib.error
    import urllib.request

    url = f"http://{plan.local_host}:{plan.local_port}/local/v1/quarantine/{item_id}/replay"
    req = urllib.request.Request(
        url, data=b"", method="POST", headers={"Authorization": f"Bearer {plan.tokens['it']}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return False, f"the node answered HTTP {exc.code}"
    except OSError:
        return False, (
            f"the node is not running at {plan.local_host}:{plan.local_port}: "
            "an adapter's items are replayed by the running node"
        )
    return bool(answer["ok"]), str(answer["result"])


@audit_app.command("verify")
def audit_verify(
    config: ConfigOpt,
    anchor: Annotated[
        list[Path] | None,
        typer.Option(
            "--anchor", help="an anchor a peer holds for this node (hutong audit anchor-export)"
        ),
    ] = None,
) -> None:
    """Recompute the hash chain and checkpoints, and check it against its anchors (the local
    anchor file and any --anchor FILE); exit 1 naming the first bad record."""
    from bridge.audit import anchor as anchors
    from bridge.node import own_signing_keys
    from bridge.startup import sqlite_path

    plan = _plan(config)
    local = plan.data_dir / anchors.ANCHOR_NAME
    db = sqlite_path(plan.storage_dsn)

    def broken(seq: int | None, reason: str) -> None:
        at = f" at record {seq}" if seq is not None else ""
        err.print(f"audit chain of {plan.node_id} is BROKEN{at}: {reason}")
        raise typer.Exit(1)

    held: list[tuple[str, anchors.Anchor]] = []
    for path in anchor or []:
        try:
            held.append((f"the anchor in {path}", anchors.load(path.read_bytes())))
        except (OSError, ValueError) as exc:
            raise HutongError(f"--anchor {path}: not an anchor ({exc})") from None
    try:
        mine = anchors.AnchorFile(local).read()
    except ValueError as exc:
        broken(None, f"the anchor file {local} is unreadable ({exc})")
    if mine is not None:
        held.insert(0, (f"the anchor file {local}", mine))
    if db is not None and not db.exists():
        if held:
            source, a = held[0]
            broken(1, f"store {db} is missing, {source} records seq {a.seq}")
        raise HutongError(f"store {db} does not exist")
    ctx = _ctx(config)
    me = ctx.plan.directory[ctx.node_id]
    with ctx.store.read() as conn:
        # checkpoints made before a key rollover were signed with this node's earlier key
        keys = [*me.signing_keys, *own_signing_keys(conn)]
    # in chunks of short read transactions: a running node's WAL checkpoint is not held back
    result = ctx.audit.verify_chunked(ctx.store.read, keys)
    if result.ok:
        with ctx.store.read() as conn:
            for source, a in held:
                if a.node != ctx.node_id:
                    broken(None, f"{source} is for node {a.node}, not {ctx.node_id}")
                if not a.verifies(keys):
                    broken(
                        a.seq, f"{source}: its signature does not verify with {ctx.node_id}'s keys"
                    )
                found = anchors.problem(conn, a, source)
                if found is not None:
                    broken(*found)
    if result.ok:
        out.print(
            f"audit chain of {ctx.node_id} verifies: {result.checked} records, "
            f"{result.checkpoints_checked} signed checkpoints, head {result.last_hash[:16]}"
            + (f", {len(held)} anchor(s) held" if held else "")
        )
        return
    broken(result.first_bad_seq, str(result.reason))


@audit_app.command("anchor-export")
def audit_anchor_export(
    config: ConfigOpt,
    peer: Annotated[str, typer.Option(help="the member whose anchor this node holds")],
    output: Annotated[Path | None, typer.Option("--out", "-o")] = None,
) -> None:
    """Write the latest signed audit checkpoint a peer showed this node (in its receipts), for
    'hutong audit verify --anchor FILE' on that peer."""
    from bridge.audit.anchor import held_for

    ctx = _ctx(config)
    with ctx.store.read() as conn:
        held = held_for(conn, peer)
    if held is None:
        raise HutongError(
            f"this node holds no audit anchor of '{peer}' (none of its receipts carried one yet)"
        )
    held["held_by"] = ctx.node_id
    text = json.dumps(held, sort_keys=True) + "\n"
    if output:
        output.write_text(text, encoding="utf-8")
        out.print(f"anchor of {peer} at seq {held['seq']} written to {output}")
    else:
        sys.stdout.write(text)


@audit_app.command("accept-restore")
def audit_accept_restore(
    config: ConfigOpt,
    reason: Annotated[str, typer.Option(help="why the store is older (ticket, backup date)")],
) -> None:
    """IT override after a deliberate restore: accept a store younger than its audit anchor.

    Appends an audited 'anchor-reset' record naming the superseded anchor and the reason, signs
    a checkpoint of the new head, keeps the old anchor file beside it and anchors the new head.
    Refused while a node runs on this data folder."""
    import shutil

    from bridge.audit import anchor as anchors
    from bridge.audit.events import AuditEntry
    from bridge.startup import lock_data_dir

    plan = _plan(config)
    lock_data_dir(plan.data_dir)
    local = plan.data_dir / anchors.ANCHOR_NAME
    try:
        old = anchors.AnchorFile(local).read()
    except ValueError:
        old = None
    if local.exists():  # kept beside the new one, for the auditors
        shutil.copy2(local, local.with_name(anchors.superseded_name()))
    ctx = _ctx(config)
    with ctx.store.write() as conn:
        head_seq, _ = anchors.head(conn)
        ctx.audit.append(
            conn,
            [
                AuditEntry(
                    action="anchor-reset",
                    outcome="4",
                    at=ctx.now(),
                    actor="cli",
                    message=f"store accepted as restored by IT: {reason}",
                    extra={
                        "superseded_seq": old.seq if old else None,
                        "superseded_hash": old.hash if old else None,
                        "store_head": head_seq,
                    },
                )
            ],
        )
        cp = ctx.audit.checkpoint(conn)
    if cp is not None:
        ctx.audit.anchor_file.replace(anchors.from_checkpoint(ctx.node_id, cp))
    out.print(
        f"store of {ctx.node_id} accepted: anchor moved from seq "
        f"{old.seq if old else '-'} to seq {cp.seq if cp else '-'}"
    )


@audit_app.command("export")
def audit_export(
    config: ConfigOpt,
    since: Annotated[
        str | None,
        typer.Option(
            help="2026-12-01, 2026-12-01T08:00(+08:00), -2h, yesterday; no offset: display zone"
        ),
    ] = None,
    until: Annotated[str | None, typer.Option()] = None,
    fmt: Annotated[str, typer.Option("--format", help="ndjson|csv")] = "ndjson",
    patient: Annotated[str | None, typer.Option(help="patient hash")] = None,
    output: Annotated[Path | None, typer.Option("--out", "-o")] = None,
    actor: Annotated[str | None, typer.Option(help="user:<name>, client:<name>, role:<r>")] = None,
    action: Annotated[str | None, typer.Option(help="read, login, export, ...")] = None,
) -> None:
    """Write the audit trail for an auditor (patients appear only as keyed hashes)."""
    from bridge.audit.export import export

    if fmt not in ("ndjson", "csv"):
        raise HutongError("--format must be ndjson or csv")
    ctx = _ctx(config)
    stream = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout  # noqa: SIM115 - closed below unless stdout
    try:
        with ctx.store.read() as conn:  # a long export must not hold the write lock
            n = export(
                conn,
                stream,
                since=_when(since, ctx),
                until=_when(until, ctx),
                fmt="csv" if fmt == "csv" else "ndjson",
                patient_hash=patient,
                actor=actor,
                action=action,
            )
        from bridge.audit.events import AuditEntry
        from bridge.people_cli import cli_actor

        with ctx.store.write() as conn:
            ctx.audit.append(
                conn,
                [
                    AuditEntry(  # the export itself is audited
                        action="export",
                        actor=cli_actor(),
                        at=ctx.now(),
                        message=f"audit export {fmt}",
                        extra={"rows": n},
                    )
                ],
            )
    finally:
        if output:
            stream.close()


@keys_app.command("init")
def keys_init(
    alliance: Annotated[
        Path | None, typer.Option(help="alliance folder: keys for every node")
    ] = None,
    node: Annotated[str | None, typer.Option(help="one node id (with --out)")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="folder for one node's keys")
    ] = None,
    passphrase_env: Annotated[
        str | None, typer.Option(help="env var holding a passphrase to encrypt the private keys")
    ] = None,
) -> None:
    """Create Ed25519 signing and X25519 encryption keys (private files 0600)."""
    passphrase = _env_passphrase(passphrase_env)
    if alliance:
        from bridge.config.scaffold import init_keys_and_secrets

        made = init_keys_and_secrets(alliance, passphrase=passphrase)
        out.print(f"keys and secrets ready in {alliance}: {made}")
        return
    if not (node and out_dir):
        raise HutongError("give --alliance DIR, or --node ID with --out DIR")
    from bridge.crypto.keys import generate_node_keys

    pub = generate_node_keys(out_dir, node, passphrase)
    out.print_json(json.dumps(pub))


@keys_app.command("show")
def keys_show(config: ConfigOpt) -> None:
    """Print this node's public keys, as they go into the alliance directory."""
    from bridge.crypto.keys import key_id, load_encryption_key, load_signing_key, public_text

    node_id, sign_path, enc_path, passphrase = _own_keys(config)  # works before the others'
    s = load_signing_key(sign_path, passphrase)  # keys are in place
    e = load_encryption_key(enc_path, passphrase)
    from cryptography.hazmat.primitives import serialization as ser

    raw = ser.Encoding.Raw, ser.PublicFormat.Raw
    out.print_json(
        json.dumps(
            {
                "node": node_id,
                "signing": public_text(s),
                "encryption": public_text(e),
                "signing_id": key_id(s.public_key().public_bytes(*raw)),
                "encryption_id": key_id(e.public_key().public_bytes(*raw)),
            }
        )
    )


def _own_keys(config: Path) -> tuple[str, Path, Path, bytes | None]:
    """This node's id, key files and passphrase from its node file alone (issue 15: a new
    site shows its public keys before the rest of the alliance is configured)."""
    import tomllib

    from bridge.config.secrets import resolve_secret
    from bridge.errors import ConfigError

    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{config}: cannot read: {type(exc).__name__}") from None
    keys = data.get("keys")
    node_id = data.get("node_id")
    if (
        not isinstance(keys, dict)
        or not isinstance(node_id, str)
        or not keys.get("signing")
        or not keys.get("encryption")
    ):
        raise ConfigError(f"{config}: needs node_id and [keys] signing / encryption")
    base = config.parent
    ref = keys.get("passphrase")
    passphrase = resolve_secret(ref, base).encode() if isinstance(ref, str) else None
    return node_id, base / str(keys["signing"]), base / str(keys["encryption"]), passphrase


@config_app.command("check")
def config_check(
    path: Annotated[Path, typer.Argument(help="a node file or an alliance folder")],
) -> None:
    """Validate every file and report every problem at once, with file and key."""
    from bridge.config.loader import check_alliance, load_node

    if path.is_dir():
        problems = check_alliance(path)
    else:
        try:
            plan = load_node(path)
            problems = []
        except HutongError as exc:
            problems = getattr(exc, "problems", [str(exc)])
    problems = [*problems, *_file_mode_problems(path)]
    if problems:
        for p in problems:
            err.print(p)
        err.print(f"{len(problems)} problem(s)")
        raise typer.Exit(1)
    out.print(f"{path}: ok" + ("" if path.is_dir() else f" (config hash {plan.config_hash[:16]})"))


def _file_mode_problems(path: Path) -> list[str]:
    """Data folders, databases and secret files that group or others may read."""
    from bridge.filemodes import node_file_problems

    files = sorted((path / "nodes").glob("*.toml")) if path.is_dir() else [path]
    return [line for f in files for line in node_file_problems(f)]


def _env_passphrase(name: str | None) -> bytes | None:
    """The passphrase in environment variable ``name`` (None: no encryption)."""
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        from bridge.errors import CliInputError

        raise CliInputError(
            f"environment variable {name} (--passphrase-env) is not set or empty; export it first"
        )
    return value.encode()


from bridge.cli_site import site_app  # noqa: E402 - issue 15: hutong site init


def _plugin_commands() -> None:
    """Commands that other installed packages add through the ``hutong.commands`` entry points
    (the Fuxing demo's ``hutong demo``, package ``demo``): the engine never imports them by
    name, as with adapters (``hutong.adapters``)."""
    from importlib.metadata import entry_points

    # loaded only when the command line may name one (or asks for the list): ``hutong run``
    # and the other engine commands start without importing the demo and its simulators
    words = sys.argv[1:]
    listing = not words or words[0].startswith("-") or "--help" in words
    for ep in entry_points(group="hutong.commands"):
        if listing or ep.name in words[:1]:
            app.command(name=ep.name)(ep.load())


_plugin_commands()

app.add_typer(site_app, name="site")


def _one_line(exc: BaseException) -> str:
    """An unexpected error as one line with a code (HUTONG_DEBUG=1 shows the traceback)."""
    if isinstance(
        exc, FileNotFoundError | IsADirectoryError | PermissionError | NotADirectoryError
    ):
        return f"HT-CLI-INPUT: cannot use {exc.filename}: {exc.strerror}"
    if isinstance(exc, UnicodeDecodeError):
        return "HT-CLI-INPUT: a file given is not UTF-8 text"
    if isinstance(exc, OSError):
        return f"HT-CLI-INPUT: {exc.strerror or type(exc).__name__}"
    return (
        f"HT-INTERNAL: unexpected {type(exc).__name__}; run again with HUTONG_DEBUG=1 for "
        "the details and report it"
    )


def main() -> None:
    from bridge.filemodes import private_umask

    private_umask()  # whatever a command writes (a database, an export) is the account's only
    try:
        app(standalone_mode=True)
    except HutongError as exc:
        err.print(f"error: {exc}")
        sys.exit(2)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the promise: one line with a code, no traceback
        if os.environ.get("HUTONG_DEBUG"):
            raise
        err.print(f"error: {_one_line(exc)}")
        sys.exit(2)


if __name__ == "__main__":
    main()
