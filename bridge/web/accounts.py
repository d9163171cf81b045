"""The accounts page (admin role): people, their roles and state, API tokens; every change
goes through ``bridge.accounts.service`` and is audited with the administrator's name.

A new token's secret is shown once (the next page's message) and kept only as its digest.
While the shared role tokens of the site config still log in, the page says so in red.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from bridge.accounts.service import ROLES
from bridge.errors import HutongError
from bridge.web.i18n import t
from bridge.web.layout import Web, e, fmt_time, read_form, table

ACTIONS = ("add", "disable", "enable", "password", "roles", "token", "revoke")


def account_routes(web: Web) -> APIRouter:
    router = APIRouter()
    accounts = web.accounts

    @router.get("/accounts")
    def accounts_page(request: Request) -> Response:
        role = web.gate(request, "admin")
        if not isinstance(role, str):
            return role
        lang = web.lang(request)
        flash = web.sessions.pop_flash(request)
        users = accounts.list()
        tokens = accounts.tokens()
        warn = ""
        if web.plan.web.shared_role_tokens:
            warn = f'<p class="alert shared-tokens">{e(t(lang, "shared_tokens_on"))}</p>'
        people = table(
            [
                t(lang, "user_name"),
                t(lang, "display_name"),
                t(lang, "roles"),
                t(lang, "state"),
                "TOTP",
                t(lang, "last_login"),
                "",
            ],
            [
                [
                    e(u["name"]),
                    e(u["display"]),
                    e(u["roles"]),
                    e(
                        t(lang, "disabled")
                        if u["disabled"]
                        else t(lang, "locked")
                        if u["locked"]
                        else t(lang, "active")
                    ),
                    "✔" if u["totp"] else "",
                    e(fmt_time(u["last_login_at"])),
                    (
                        f'<form method="post" '
                        f'action="/ui/accounts/{"enable" if u["disabled"] else "disable"}"'
                        f' class="inline"><input type="hidden" name="name" value="{e(u["name"])}">'
                        f'<button type="submit">{e(t(lang, "enable" if u["disabled"] else "disable"))}'
                        f"</button></form>"
                    ),
                ]
                for u in users
            ],
            t(lang, "none"),
            "accounts",
        )
        toks = table(
            ["id", t(lang, "owner"), t(lang, "roles"), t(lang, "created"), t(lang, "state"), ""],
            [
                [
                    e(k["id"]),
                    e(f"{k['owner_kind']}:{k['owner']}"),
                    e(k["roles"]),
                    e(fmt_time(k["created_at"])),
                    e(t(lang, "revoked") if k["revoked_at"] else t(lang, "active")),
                    ""
                    if k["revoked_at"]
                    else f'<form method="post" action="/ui/accounts/revoke" class="inline">'
                    f'<input type="hidden" name="id" value="{e(k["id"])}">'
                    f'<button type="submit">{e(t(lang, "revoke"))}</button></form>',
                ]
                for k in tokens
            ],
            t(lang, "none"),
            "tokens",
        )
        role_boxes = "".join(
            f'<label><input type="checkbox" name="role_{r}" value="1"> '
            f"{e(t(lang, 'role_' + r))}</label>"
            for r in ROLES
        )
        forms = (
            f'<form method="post" action="/ui/accounts/add" class="inline add-user">'
            f'<label>{e(t(lang, "user_name"))} <input name="name" required></label>'
            f'<label>{e(t(lang, "display_name"))} <input name="display"></label>'
            f'<label>{e(t(lang, "password"))} <input type="password" name="password" '
            f'autocomplete="new-password" minlength="10"></label>{role_boxes}'
            f'<label><input type="checkbox" name="totp" value="1"> TOTP</label>'
            f'<button type="submit">{e(t(lang, "add"))}</button></form>'
            f'<form method="post" action="/ui/accounts/password" class="inline reset">'
            f'<label>{e(t(lang, "user_name"))} <input name="name" required></label>'
            f'<label>{e(t(lang, "password_new"))} <input type="password" name="password" '
            f'autocomplete="new-password" minlength="10" required></label>'
            f'<button type="submit">{e(t(lang, "reset_password"))}</button></form>'
            f'<form method="post" action="/ui/accounts/roles" class="inline set-roles">'
            f'<label>{e(t(lang, "user_name"))} <input name="name" required></label>{role_boxes}'
            f'<button type="submit">{e(t(lang, "roles"))}</button></form>'
            f'<form method="post" action="/ui/accounts/token" class="inline issue-token">'
            f'<label>{e(t(lang, "owner"))} <input name="owner" required></label>'
            f'<label><select name="kind"><option value="user">user</option>'
            f'<option value="client">client</option></select></label>'
            f'<label>{e(t(lang, "roles"))} <input name="roles" placeholder="clinician,it">'
            f'</label><button type="submit">{e(t(lang, "issue_token"))}</button></form>'
        )
        body = (
            warn
            + (f'<p class="msg">{e(flash)}</p>' if flash else "")
            + f"<h3>{e(t(lang, 'accounts'))} ({len(users)})</h3>{people}"
            + f"<h3>{e(t(lang, 'api_tokens'))} ({len(tokens)})</h3>{toks}"
            + f'<div class="noprint">{forms}</div>'
        )
        return web.page(request, t(lang, "accounts"), body, role=role)

    @router.post("/accounts/{action}")
    async def change(request: Request, action: str) -> Response:
        role = web.gate(request, "admin")
        if not isinstance(role, str):
            return role
        s = web.sessions.get(request)
        by = s.who.actor if s else f"role:{role}"
        f = await read_form(request)
        lang = web.lang(request)
        roles = [r for r in ROLES if f.get(f"role_{r}")]
        name = f.get("name", "").strip()

        def work() -> str:
            if action == "add":
                secret = accounts.add(
                    name,
                    roles,
                    password=f.get("password") or None,
                    display=f.get("display") or None,
                    totp=bool(f.get("totp")),
                    by=by,
                )
                return t(lang, "done") + (f" TOTP: {secret}" if secret else "")
            if action == "disable":
                accounts.disable(name, by=by)
            elif action == "enable":
                accounts.enable(name, by=by)
            elif action == "password":
                accounts.reset_password(name, f.get("password", ""), by=by)
            elif action == "roles":
                accounts.set_roles(name, roles, by=by)
            elif action == "token":
                tid, secret = accounts.issue_token(
                    f.get("owner", "").strip(),
                    kind=f.get("kind", "user"),
                    roles=f.get("roles") or None,
                    by=by,
                )
                return f"{t(lang, 'token_once')} {tid}: {secret}"
            elif action == "revoke":
                accounts.revoke_token(f.get("id", ""), by=by)
            else:
                return t(lang, "not_found")
            return t(lang, "done")

        try:
            message = await run_in_threadpool(work)
        except HutongError as exc:
            message = f"{exc.code}: {exc.message}"
        except ValueError as exc:  # the rule broken (our own texts), never a typed secret
            message = str(exc)
        web.sessions.flash(request, message)
        return RedirectResponse("/ui/accounts", status_code=303)

    return router
