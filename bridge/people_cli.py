"""`hutong users|tokens|messages` and `hutong audit patient-hash|who`: accounts, API tokens,
the message browser and the auditor's questions from the command line (same code as the pages).

Changes made here are audited with the actor ``cli:<OS user>``. Times are shown in the node's
display zone with their offset and typed by the one rule of ``bridge.timeinput``.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from bridge.errors import HutongError

users_app = typer.Typer(no_args_is_help=True, help="Personal accounts of this node")
tokens_app = typer.Typer(no_args_is_help=True, help="API bearer tokens of users and systems")
messages_app = typer.Typer(
    no_args_is_help=True, help="Message browser: search, show and resend packets"
)

out = Console(soft_wrap=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="the node's config file")]


def _ctx(config: Path) -> Any:
    from bridge.config.loader import load_node
    from bridge.context import NodeContext

    return NodeContext.open(load_node(config))


def cli_actor() -> str:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return f"cli:{who}"


def _zone(ctx: Any) -> tzinfo:
    from bridge.timeinput import zone

    return zone(ctx.plan.web.display_zone)


def when(text: str | None, ctx: Any) -> datetime | None:
    """``--since/--until``: the pages' rule (offset, date alone, relative; display zone)."""
    from bridge.timeinput import TIME_RULE, parse_when

    try:
        return parse_when(text, _zone(ctx), ctx.now)
    except ValueError:
        raise HutongError(TIME_RULE) from None


def _show(value: Any, ctx: Any) -> str:
    from bridge.timeinput import show

    return show(value, _zone(ctx)) if value is not None else "-"


def _password(given: str | None, prompt: str = "password") -> str:
    if given == "-":  # from stdin (scripts), never from the command line history
        return sys.stdin.readline().rstrip("\n")
    if given:
        return given
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=True))


def _accounts(ctx: Any) -> Any:
    from bridge.accounts.service import Accounts

    return Accounts(ctx)


def _value_error(exc: ValueError) -> HutongError:
    return HutongError(str(exc))


@users_app.command("add")
def users_add(
    config: ConfigOpt,
    name: Annotated[str, typer.Argument(help="login name (a-z 0-9 . _ -)")],
    roles: Annotated[str, typer.Option(help="clinician,it,auditor,admin")],
    display: Annotated[str | None, typer.Option(help="the person's name as shown")] = None,
    password: Annotated[
        str | None, typer.Option(help="'-' reads it from stdin; omitted: asked for (hidden)")
    ] = None,
    totp: Annotated[bool, typer.Option(help="require a TOTP second factor")] = False,
    ldap: Annotated[bool, typer.Option(help="no local password: bind to the directory")] = False,
) -> None:
    """Add a person's account."""
    ctx = _ctx(config)
    pw = None if ldap else _password(password)
    try:
        secret = _accounts(ctx).add(
            name, roles, password=pw, display=display, totp=totp, by=cli_actor()
        )
    except ValueError as exc:
        raise _value_error(exc) from None
    out.print(f"added {name} ({roles})")
    if secret:
        out.print(f"TOTP secret (shown once; put it in the person's authenticator app): {secret}")


@users_app.command("list")
def users_list(config: ConfigOpt, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Accounts with roles, state and last login (no password hashes, no TOTP secrets)."""
    ctx = _ctx(config)
    rows = _accounts(ctx).list()
    if as_json:
        out.print_json(json.dumps(rows, default=str, ensure_ascii=False))
        return
    t = Table(title=f"accounts of {ctx.node_id}")
    for col in ("name", "display", "roles", "state", "totp", "last login"):
        t.add_column(col)
    for u in rows:
        state = "disabled" if u["disabled"] else "locked" if u["locked"] else "active"
        t.add_row(
            u["name"],
            u["display"] or "",
            u["roles"],
            state,
            "yes" if u["totp"] else "",
            _show(u["last_login_at"], ctx),
        )
    out.print(t)


@users_app.command("disable")
def users_disable(config: ConfigOpt, name: str) -> None:
    """Disable an account (its API tokens are revoked with it)."""
    _accounts(_ctx(config)).disable(name, by=cli_actor())
    out.print(f"disabled {name}")


@users_app.command("enable")
def users_enable(config: ConfigOpt, name: str) -> None:
    """Enable an account again (and lift a lockout)."""
    _accounts(_ctx(config)).enable(name, by=cli_actor())
    out.print(f"enabled {name}")


@users_app.command("reset-password")
def users_reset_password(
    config: ConfigOpt,
    name: str,
    password: Annotated[str | None, typer.Option(help="'-' reads it from stdin")] = None,
) -> None:
    """Set a new password (also lifts a lockout)."""
    try:
        _accounts(_ctx(config)).reset_password(name, _password(password), by=cli_actor())
    except ValueError as exc:
        raise _value_error(exc) from None
    out.print(f"password of {name} set")


@users_app.command("roles")
def users_roles(
    config: ConfigOpt,
    name: str,
    roles: Annotated[str, typer.Argument(help="clinician,it,auditor,admin")],
) -> None:
    """Set an account's roles."""
    try:
        _accounts(_ctx(config)).set_roles(name, roles, by=cli_actor())
    except ValueError as exc:
        raise _value_error(exc) from None
    out.print(f"roles of {name}: {roles}")


@tokens_app.command("issue")
def tokens_issue(
    config: ConfigOpt,
    user: Annotated[str | None, typer.Option(help="a person's account")] = None,
    client: Annotated[str | None, typer.Option(help="a named system, e.g. his-main")] = None,
    roles: Annotated[str | None, typer.Option(help="roles (a client must name them)")] = None,
) -> None:
    """Issue a bearer token; it is printed once and kept only as its digest."""
    if bool(user) == bool(client):
        raise HutongError("give exactly one of --user or --client")
    try:
        tid, secret = _accounts(_ctx(config)).issue_token(
            user or client or "", kind="user" if user else "client", roles=roles, by=cli_actor()
        )
    except ValueError as exc:
        raise _value_error(exc) from None
    err = Console(stderr=True)
    err.print(
        f"token {tid} for {'user' if user else 'client'} {user or client} "
        "(shown once; store it now):"
    )
    print(secret)


@tokens_app.command("list")
def tokens_list(config: ConfigOpt) -> None:
    """Issued tokens by id and owner (the secrets are not kept, so not shown)."""
    ctx = _ctx(config)
    t = Table(title=f"API tokens of {ctx.node_id}")
    for col in ("id", "owner", "roles", "created", "revoked"):
        t.add_column(col)
    for k in _accounts(ctx).tokens():
        t.add_row(
            k["id"],
            f"{k['owner_kind']}:{k['owner']}",
            k["roles"],
            _show(k["created_at"], ctx),
            _show(k["revoked_at"], ctx),
        )
    out.print(t)


@tokens_app.command("revoke")
def tokens_revoke(config: ConfigOpt, token_id: str) -> None:
    """Revoke a token by its id: the next request with it gets 401."""
    _accounts(_ctx(config)).revoke_token(token_id, by=cli_actor())
    out.print(f"revoked {token_id}")


def patient_hash_command(
    config: ConfigOpt,
    national_id: Annotated[
        str | None,
        typer.Option(help="omitted: asked for (hidden), so it stays out of the shell history"),
    ] = None,
) -> None:
    """The keyed hash of a national ID number, computed here; the number is not kept."""
    from bridge.config.loader import load_node
    from bridge.privacy import patient_hash

    plan = load_node(config)
    typed = national_id or typer.prompt("national ID number", hide_input=True)
    print(patient_hash(plan.patient_hash_key, typed))


def audit_who(
    config: ConfigOpt,
    patient: Annotated[str | None, typer.Option(help="patient hash: who looked at them")] = None,
    actor: Annotated[str | None, typer.Option(help="user:<name>: what they looked at")] = None,
    since: Annotated[str | None, typer.Option(help="2026-12-01, -2h, yesterday, ...")] = None,
    until: Annotated[str | None, typer.Option()] = None,
    fmt: Annotated[str, typer.Option("--format", help="table|csv|ndjson")] = "table",
    limit: Annotated[int, typer.Option(help="table rows per page (1..1000)")] = 100,
    after: Annotated[str | None, typer.Option(help="next-page token of a previous table")] = None,
) -> None:
    """Reads of patient data, by patient or by person, over a time range: a table page by
    page, newest first, with how many there are in all; csv/ndjson: all of them."""
    from bridge.audit.events import AuditEntry
    from bridge.audit.export import count, export, query

    ctx = _ctx(config)
    start, end = when(since, ctx), when(until, ctx)
    if fmt in ("csv", "ndjson"):
        out_fmt: Literal["ndjson", "csv"] = "csv" if fmt == "csv" else "ndjson"
        with ctx.store.read() as conn:
            n = export(
                conn,
                sys.stdout,
                fmt=out_fmt,
                since=start,
                until=end,
                patient_hash=patient,
                actor=actor,
                action="read",
            )
        with ctx.store.write() as conn:
            ctx.audit.append(
                conn,
                [
                    AuditEntry(
                        action="export",
                        actor=cli_actor(),
                        at=ctx.now(),
                        message=f"audit export {fmt}",
                        extra={"rows": n},
                    )
                ],
            )
        return
    if after is not None and not after.isdigit():
        raise HutongError("--after: not a token this command gave out")
    filters: dict[str, Any] = dict(
        since=start, until=end, patient_hash=patient, actor=actor, action="read"
    )
    with ctx.store.read() as conn:
        try:
            rows = query(conn, limit=limit, before_seq=int(after) if after else None, **filters)
        except ValueError as exc:
            raise HutongError(f"--limit: {exc}") from None
        total = count(conn, **filters)
        last = rows[-1]["seq"] if len(rows) == limit else None
        nxt = (
            str(last)
            if last is not None and query(conn, limit=1, before_seq=last, **filters)
            else None
        )
    t = Table(title="reads of patient data")
    for col in ("seq", "at", "actor", "patient", "message"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r["seq"]),
            _show_instant(r["at"], ctx),
            r["actor"] or "",
            (r["patient_hash"] or "")[:16],
            r["message"] or "",
        )
    out.print(t)
    out.print(
        f"{total:,} reads in all, {len(rows)} shown"
        + (f"; next page: --after {nxt}" if nxt else "")
    )


def _show_instant(text: str | None, ctx: Any) -> str:
    from datetime import datetime

    if not text:
        return "-"
    return _show(datetime.fromisoformat(text.replace("Z", "+00:00")), ctx)


@messages_app.command("search")
def messages_search(
    config: ConfigOpt,
    box: Annotated[list[str] | None, typer.Option(help="outbox|inbox|quarantine|dead")] = None,
    since: Annotated[str | None, typer.Option(help="2026-12-01, -2h, yesterday, ...")] = None,
    until: Annotated[str | None, typer.Option()] = None,
    peer: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[str | None, typer.Option()] = None,
    state: Annotated[str | None, typer.Option()] = None,
    thread: Annotated[str | None, typer.Option()] = None,
    patient: Annotated[str | None, typer.Option(help="patient hash (audit patient-hash)")] = None,
    packet: Annotated[str | None, typer.Option(help="packet id")] = None,
    after: Annotated[str | None, typer.Option(help="next-page token of a previous search")] = None,
    limit: int = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Headers of matching packets, newest first, one page; the next page's token at the end."""
    from bridge import messages as mb

    ctx = _ctx(config)
    filters: dict[str, Any] = dict(
        boxes=box,
        since=when(since, ctx),
        until=when(until, ctx),
        peer=peer,
        kind=kind,
        state=state,
        thread=thread,
        patient_hash=patient,
        packet_id=packet,
    )
    with ctx.store.read() as conn:
        rows, nxt = mb.search(conn, after=after, limit=limit, **filters)
        total, exact = mb.count(conn, **filters)
    if as_json:
        out.print_json(
            json.dumps({"rows": rows, "next": nxt, "total": total, "exact": exact}, default=str)
        )
        return
    t = Table(title=f"messages of {ctx.node_id}")
    for col in ("at", "box", "id", "packet", "kind", "peer", "state", "thread"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            _show(r["at"], ctx),
            r["box"],
            str(r["id"]),
            r.get("packet_id") or "",
            r.get("kind") or "",
            r.get("recipient") or r.get("sender") or "",
            r.get("state") or "",
            r.get("thread") or "",
        )
    out.print(t)
    out.print(
        f"{total:,}{'' if exact else '+'} matching, {len(rows)} shown"
        + (f"; next page: --after {nxt}" if nxt else "")
    )


@messages_app.command("show")
def messages_show(
    config: ConfigOpt,
    box: Annotated[str, typer.Argument(help="outbox|inbox|quarantine|dead")],
    msg_id: Annotated[int, typer.Argument(help="the row id from search")],
    body: Annotated[bool, typer.Option(help="print the FHIR body and raw input (audited)")] = False,
) -> None:
    """One message: headers, path (with times), and on request its body."""
    from bridge import messages as mb

    ctx = _ctx(config)
    if body:
        with ctx.store.write() as conn:
            msg = mb.show(conn, box, msg_id)
            mb.audit_body_read(
                ctx,
                conn,
                msg,
                actor=cli_actor(),
                role="it",
                address=None,
                via="hutong messages show",
            )
    else:
        with ctx.store.read() as conn:
            msg = mb.show(conn, box, msg_id)
    headers = {k: (_show(v, ctx) if hasattr(v, "tzinfo") else v) for k, v in msg["headers"].items()}
    out.print_json(json.dumps(headers, default=str, ensure_ascii=False))
    t = Table(title="path")
    for col in ("at", "action", "outcome", "peer", "actor"):
        t.add_column(col)
    for p in msg["path"]:
        t.add_row(_show(p["at"], ctx), p["action"], p["outcome"], p["peer"] or "", p["actor"] or "")
    out.print(t)
    out.print(f"receipt: {'yes' if msg['receipt'] else 'no'}")
    if body:
        out.print_json(json.dumps(msg["body"], ensure_ascii=False))
        if msg["raw"] is not None:
            out.print("raw input:")
            out.print(msg["raw"], markup=False, highlight=False)


@messages_app.command("resend")
def messages_resend(
    config: ConfigOpt,
    box: Annotated[str, typer.Argument(help="outbox|inbox|dead")],
    msg_id: int,
    reason: Annotated[str, typer.Option(help="why (audited)")],
) -> None:
    """Send an outbox packet or dead letter again, or hand an inbox packet to the local system
    again; the running node picks it up. Quarantined input: ``hutong quarantine replay``."""
    from bridge import messages as mb

    if box == "quarantine":
        raise HutongError("quarantined input is replayed with: hutong quarantine replay ID")
    ctx = _ctx(config)
    result = mb.resend(ctx, box, msg_id, reason=reason, actor=cli_actor(), role="it")
    out.print(f"{box} {msg_id}: {result}")


def register(app: typer.Typer, audit_app: typer.Typer) -> None:
    """Hook these commands into ``hutong`` (bridge.cli)."""
    app.add_typer(users_app, name="users")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(messages_app, name="messages")
    audit_app.command("patient-hash")(patient_hash_command)
    audit_app.command("who")(audit_who)
