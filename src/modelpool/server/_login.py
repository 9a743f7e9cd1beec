"""Logging in and out, and registering: the ``/auth/*`` endpoints (docs/security.md).

A program logs in with JSON and gets JSON (with the session's CSRF token); a person uses the
HTML form and gets redirected, or the form again with what went wrong. Failed logins are
throttled per account and per client address. A session presented at login is ended, never
kept (no fixation); the login form carries a token of its own (a cookie and a field that must
match), so another site cannot log a browser in.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from modelpool._exceptions import DatabaseError

from ._auth import (
    COOKIE,
    FORM_COOKIE,
    NO_CREDENTIALS,
    Auth,
    content_type,
    cookie,
    is_form,
    refused,
    same,
)
from ._errors import HTTPError

__all__ = ["Logins"]

_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Logins:
    """The ``/auth/*`` routes of one server, on its ``Auth``."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self.settings = auth.settings
        self.store = auth.store
        self.keyring = auth.keyring
        self.account_throttle = auth.account_throttle
        self.address_throttle = auth.address_throttle

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/auth/login", self.login_form),
            ("POST", "/auth/login", self.login),
            ("POST", "/auth/logout", self.logout),
            ("POST", "/auth/register", self.register),
            ("GET", "/auth/session", self.whoami),
        ]

    async def login_form(
        self, request: web.Request, problem: HTTPError | None = None, target: str | None = None
    ) -> web.Response:
        """The login page (a fresh form token each time); with ``problem``, shown again with
        its message and status."""
        token = _token()
        target = _local(target or request.query.get("next", "/"))
        page = LOGIN_PAGE.format(
            csrf=html.escape(token),
            next=html.escape(target),
            message=f'<p class="problem">{html.escape(str(problem))}</p>' if problem else "",
            register=REGISTER_LINK if self.settings.registration == "open" else "",
        )
        status = problem.status if problem is not None else 200
        response = web.Response(text=page, status=status, content_type="text/html")
        response.charset = "utf-8"
        if problem is not None and problem.retry_after is not None:
            response.headers["Retry-After"] = str(problem.retry_after)
        self._cookie_out(request, response, FORM_COOKIE, token, "Strict", "/auth/", 3600)
        _page_headers(response)
        return response

    async def login(self, request: web.Request) -> web.StreamResponse:
        """JSON in, JSON out (programs); a form in, a redirect out, or the form again with
        what went wrong (people)."""
        form, fields = await _credentials(request)
        try:
            return await self._login(request, form, fields)
        except HTTPError as exc:
            if not form or exc.status == 403:  # (a forged form is not shown a fresh one)
                raise
            return await self.login_form(request, exc, fields.get("next"))

    async def _login(
        self, request: web.Request, form: bool, fields: dict[str, str]
    ) -> web.StreamResponse:
        if form and not same(fields.get("csrf", ""), cookie(request, FORM_COOKIE) or "x"):
            raise HTTPError(403, "the login form expired or came from another site: reload it")
        name, password = fields.get("username", ""), fields.get("password", "")
        now = time.monotonic()
        address = request.remote or "?"
        wait = max(
            self.account_throttle.blocked(name, now), self.address_throttle.blocked(address, now)
        )
        if wait:
            raise HTTPError(
                429,
                "too many failed logins: wait before trying again",
                retry_after=max(1, math.ceil(wait)),
            )
        try:
            user = await self.store.login(name, password)
        except DatabaseError:
            raise HTTPError(
                503,
                "logins are unavailable right now (the account database cannot be "
                "reached); retry shortly",
                retry_after=2,
            ) from None
        if user is None:
            self.account_throttle.failed(name, now)
            self.address_throttle.failed(address, now)
            raise refused("wrong user name or password")
        self.account_throttle.succeeded(name)
        old = cookie(request, COOKIE)
        token, csrf = await self.auth.checked(
            self.store.start_session(user, self.settings.session_ttl)
        )
        if old is not None:  # a session presented at login is never kept (fixation)
            self.keyring.forget_session(old)
            await self.auth.checked(self.store.end_session(old))
        if form:
            response = _redirect(_local(fields.get("next", "/")))
        else:
            response = _json(
                {
                    "user": user.name,
                    "role": user.role,
                    "csrf": csrf,
                    "expires_in": self.settings.session_ttl,
                }
            )
        self._set_session(request, response, token)
        return response

    def _set_session(self, request: web.Request, response: web.StreamResponse, token: str) -> None:
        ttl = int(self.settings.session_ttl)
        self._cookie_out(request, response, COOKIE, token, "Lax", "/", ttl)

    def _cookie_out(
        self,
        request: web.Request,
        response: web.StreamResponse,
        name: str,
        value: str,
        samesite: str,
        path: str,
        max_age: int,
    ) -> None:
        """An HttpOnly cookie, Secure over TLS (or always, with ``auth.secure_cookies``)."""
        secure = request.secure or self.settings.secure_cookies == "always" or None
        response.set_cookie(
            name, value, httponly=True, samesite=samesite, secure=secure, path=path, max_age=max_age
        )

    async def logout(self, request: web.Request) -> web.StreamResponse:
        who = await self.auth.identify(request)
        if who is None or who.session is None:
            raise refused("not logged in (log out ends a session started at /auth/login)")
        self.keyring.forget_session(who.session)
        await self.auth.checked(self.store.end_session(who.session))
        response = _redirect("/auth/login") if is_form(request) else _json({"logged_out": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def register(self, request: web.Request) -> web.StreamResponse:
        if self.settings.registration != "open":
            raise HTTPError(
                403,
                "registration is closed on this server: an admin creates accounts "
                "with `modelpool users add NAME`",
            )
        form, fields = await _credentials(request)
        if form and not same(fields.get("csrf", ""), cookie(request, FORM_COOKIE) or "x"):
            raise HTTPError(403, "the form expired or came from another site: reload it")
        now, address = time.monotonic(), request.remote or "?"
        wait = self.address_throttle.blocked(address, now)
        if wait:
            raise HTTPError(
                429,
                "too many attempts: wait before trying again",
                retry_after=max(1, math.ceil(wait)),
            )
        self.address_throttle.failed(address, now)  # each registration counts against it
        name, password = fields.get("username", ""), fields.get("password", "")
        from modelpool.auth._store import check_name, check_password_rules

        try:
            check_name(name)
            check_password_rules(password)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        try:
            user = await self.store.add_user(name, password)
        except DatabaseError as exc:
            if "already exists" in str(exc):
                raise HTTPError(409, "that user name is taken: choose another") from None
            raise HTTPError(
                503, "registration is unavailable right now; retry shortly", retry_after=2
            ) from None
        return _json({"user": user.name, "role": user.role}, 201)

    async def whoami(self, request: web.Request) -> web.Response:
        who = await self.auth.identify(request)
        if who is None:
            raise refused(NO_CREDENTIALS)
        body: dict[str, Any] = {"user": who.user, "role": who.role}
        if who.csrf is not None:
            body["csrf"] = who.csrf
        if who.key is not None:
            body["key"] = who.key.prefix
        return _json(body)


def _json(data: Any, status: int = 200) -> web.Response:
    response = web.Response(body=orjson.dumps(data), status=status, content_type=_JSON)
    response.headers["Cache-Control"] = "no-store"
    return response


def _redirect(target: str) -> web.Response:
    """303 See Other: the browser follows it with a GET."""
    return web.Response(status=303, headers={"Location": target, "Cache-Control": "no-store"})


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def _local(target: str) -> str:
    """A redirect target on this server only (no other host, no scheme)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


async def _credentials(request: web.Request) -> tuple[bool, dict[str, str]]:
    """(sent by a form, its string fields) from a JSON object or a form."""
    if is_form(request):
        data = await request.post()
        return True, {k: v for k, v in data.items() if isinstance(v, str)}
    if content_type(request) != _JSON:
        raise HTTPError(
            415,
            'send the credentials as JSON {"username": ..., "password": ...} '
            "(Content-Type: application/json) or as a form",
        )
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise HTTPError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, 'send a JSON object: {"username": ..., "password": ...}')
    return False, {k: v for k, v in body.items() if isinstance(v, str)}


def _page_headers(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"


REGISTER_LINK = '<p class="alt">No account? POST /auth/register creates one.</p>'

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelpool: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px system-ui, sans-serif; background: #f6f7f9; color: #1d2330; margin: 0; }}
main {{ max-width: 320px; margin: 12vh auto; background: #fff; padding: 28px 32px;
  border-radius: 10px; box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
h1 {{ font-size: 20px; margin: 0 0 18px; }}
label {{ display: block; margin: 12px 0 4px; font-weight: 600; }}
input {{ width: 100%; box-sizing: border-box; padding: 8px; font: inherit;
  border: 1px solid #b8bfcc; border-radius: 6px; }}
button {{ margin-top: 20px; width: 100%; padding: 9px; font: inherit; font-weight: 600;
  background: #2d5bd1; color: #fff; border: 0; border-radius: 6px; cursor: pointer; }}
.alt {{ color: #5b6475; font-size: 13px; }}
.problem {{ color: #b00020; font-weight: 600; }}
</style></head>
<body><main>
<h1>modelpool</h1>
{message}
<form method="post" action="/auth/login">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="next" value="{next}">
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button>
</form>
{register}
</main></body></html>
"""
