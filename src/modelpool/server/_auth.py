"""Who is asking, and may they: API keys and login sessions on the server (docs/security.md).

Each protected route's handler is wrapped once (``Auth.protect``) with its rule:

* ``model``: inference, a model's metadata, config and readiness. A key limited to some
  models gets 403 on the others.
* ``read``: the server's metadata, the repository index, the status page's data.
* ``page``: the status page itself; a browser without a session is sent to the login form.
* ``metrics``: ``/metrics``, as ``auth.metrics`` says (loopback clients, a metrics or admin
  key, or anyone).
* ``admin``: an admin's key or session.

Liveness and readiness (``/v2/health/*``) are never wrapped: probes need no key.

A request names itself with ``Authorization: Bearer KEY`` (programs) or the session cookie
(people, after ``POST /auth/login``). A request that changes something with only the cookie
must also carry the session's CSRF token (the ``X-CSRF-Token`` header, or a ``csrf`` form
field), so another site cannot make a logged-in browser act. Every refusal is JSON
``{"error"}`` and says what to do, never which part of a credential was wrong.
"""

from __future__ import annotations

import hashlib
import html
import ipaddress
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from modelpool._exceptions import DatabaseError
from modelpool.config import Config

from ._errors import HTTPError

if TYPE_CHECKING:
    from modelpool.auth._store import KeyRecord

__all__ = ["COOKIE", "IDENTITY", "ROWS", "Auth", "Identity", "exposed"]

COOKIE = "modelpool_session"
#: the login form's own token (double-submit): a form posted from another site has none
FORM_COOKIE = "modelpool_login"
CSRF_HEADER = "X-CSRF-Token"
_REALM = 'Bearer realm="modelpool"'
_JSON = "application/json"
_FORM = ("application/x-www-form-urlencoded", "multipart/form-data")
_RequestKey: Any = getattr(web, "RequestKey", None)
IDENTITY: Any = _RequestKey("identity", object) if _RequestKey else "identity"
#: the rows an inference request had (told by its worker), for the key's usage
ROWS: Any = _RequestKey("rows", int) if _RequestKey else "rows"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def exposed(host: str) -> bool:
    """Whether binding ``host`` may let other machines in (anything but loopback)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return True  # a host name: it may resolve to anything


@dataclass(frozen=True)
class Identity:
    """Who a request comes from: a key's owner, or a logged-in user."""

    user: str
    role: str
    key: KeyRecord | None = None
    session: str | None = None  # the session token (cookie), when that is how
    csrf: str | None = None

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def _refused(message: str, *, invalid: bool = False) -> HTTPError:
    challenge = _REALM + (', error="invalid_token"' if invalid else "")
    return HTTPError(401, message, headers={"WWW-Authenticate": challenge})


_NO_CREDENTIALS = (
    "this server needs an API key: send the header 'Authorization: Bearer <key>' (an admin "
    "creates one with `modelpool keys create --user NAME`), or log in at /auth/login"
)
_BAD_KEY = "the API key is not valid: it is unknown, revoked or expired, or its user is disabled"
_BAD_SESSION = "the session has ended or expired: log in again at /auth/login"


class Auth:
    """Authentication for one server process: its database, cache and login throttles."""

    def __init__(self, config: Config) -> None:
        # (SQLAlchemy and argon2 load here: only a server with auth on pays for them)
        from modelpool.auth._db import Database, database_url
        from modelpool.auth._guard import Keyring, Throttle
        from modelpool.auth._store import Store

        assert config.auth is not None
        self.settings = config.auth
        self.db = Database(database_url(config))
        self.store = Store(self.db)
        self.keyring = Keyring(self.store)
        window = self.settings.login_window
        self.account_throttle = Throttle(self.settings.login_attempts, window)
        self.address_throttle = Throttle(self.settings.login_attempts * 4, window)

    async def start(self) -> None:
        """Open the database (``DatabaseError`` if it cannot be used) and start polling."""
        await self.db.open()
        await self.keyring.start()

    async def stop(self) -> None:
        await self.keyring.stop()  # (writes the usage counted last)
        await self.db.close()

    # ------------------------------------------------------------------ the check

    def protect(self, handler: Handler, rule: str, model: str | None = None) -> Handler:
        """``handler`` behind ``rule`` (see the module docstring); ``model``: the model a
        route serves, when its path has no ``{model}``."""
        check = getattr(self, f"_rule_{rule}")

        async def guarded(request: web.Request) -> web.StreamResponse:
            identity = await self.identify(request)
            key = identity.key if identity is not None else None
            if key is None:
                check(request, identity, model)
                request[IDENTITY] = identity
                return await handler(request)
            try:
                check(request, identity, model)
            except HTTPError:
                self.keyring.count(key, error=True)  # (a key's refusals are its errors)
                raise
            request[IDENTITY] = identity
            wait = self.keyring.admit(key, time.monotonic())
            if wait:
                self.keyring.count(key, error=True)
                raise HTTPError(
                    429,
                    f"this API key is limited to {key.rate_limit:g} requests per second; "
                    "slow down and retry after the time in Retry-After",
                    retry_after=max(1, math.ceil(wait)),
                )
            try:
                response = await handler(request)
            except BaseException:
                self.keyring.count(key, error=True)
                raise
            self.keyring.count(key, error=response.status >= 400, rows=request.get(ROWS, 0))
            return response

        return guarded

    async def identify(self, request: web.Request) -> Identity | None:
        """The request's identity: its key, else its session, else None. Raises 401 for a
        credential that does not hold, 503 when it cannot be checked (the database down)."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, key = header.strip().partition(" ")
            key = key.strip()
            if scheme.lower() != "bearer" or not key:
                raise _refused("send the API key as 'Authorization: Bearer <key>'", invalid=True)
            digest = hashlib.sha256(key.encode()).hexdigest()
            found, record = self.keyring.cached_key(digest, time.monotonic())
            if not found:
                record = await self._database(self.keyring.key(key, digest))
            if record is None or record.state(time.time()) != "active":
                raise _refused(_BAD_KEY, invalid=True)
            return Identity(record.user, record.role, key=record)
        token = _cookie(request, COOKIE)
        if token is None:
            return None
        session = await self._database(self.keyring.session(token))
        if session is None:
            raise _refused(_BAD_SESSION)
        user, csrf, _ = session
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            given = request.headers.get(CSRF_HEADER) or await _form_field(request, "csrf")
            if given is None or not _same(given, csrf):
                raise HTTPError(
                    403,
                    f"a request made with the session cookie must carry its CSRF token (the "
                    f"{CSRF_HEADER} header, or the csrf field of the page's form)",
                )
        return Identity(user.name, user.role, session=token, csrf=csrf)

    async def _database(self, pending: Awaitable[Any]) -> Any:
        try:
            return await pending
        except DatabaseError:
            raise HTTPError(
                503,
                "credentials cannot be checked right now (the account database is "
                "unavailable); retry shortly",
                retry_after=2,
            ) from None

    # ------------------------------------------------------------------ rules

    def _rule_read(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        if who is None:
            raise _refused(_NO_CREDENTIALS)

    def _rule_model(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        if who is None:
            raise _refused(_NO_CREDENTIALS)
        name = model or request.match_info.get("model", "")
        if who.key is not None and who.key.models is not None and name not in who.key.models:
            raise HTTPError(403, f"this API key may not use model {name!r}")

    def _rule_admin(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        if who is None:
            raise _refused(_NO_CREDENTIALS)
        if not who.admin:
            raise HTTPError(403, "only an admin may do this")

    def _rule_metrics(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        mode = self.settings.metrics
        if mode == "open" or (mode == "loopback" and _loopback(request.remote)):
            return
        if who is None:
            where = " (or ask from this machine)" if mode == "loopback" else ""
            raise _refused(f"/metrics needs a metrics key or an admin's key{where}")
        if not (who.admin or (who.key is not None and who.key.metrics)):
            raise HTTPError(
                403,
                "this key may not read /metrics: use an admin's key, or one created "
                "with `modelpool keys create --metrics`",
            )

    def _rule_page(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        if who is None:
            raise web.HTTPSeeOther("/auth/login?" + urllib.parse.urlencode({"next": request.path}))

    # ------------------------------------------------------------------ login, logout, register

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
        _cookie_out(request, response, FORM_COOKIE, token, "Strict", "/auth/", 3600)
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
        if form and not _same(fields.get("csrf", ""), _cookie(request, FORM_COOKIE) or "x"):
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
            raise _refused("wrong user name or password")
        self.account_throttle.succeeded(name)
        old = _cookie(request, COOKIE)
        token, csrf = await self._database(
            self.store.start_session(user, self.settings.session_ttl)
        )
        if old is not None:  # a session presented at login is never kept (fixation)
            self.keyring.forget_session(old)
            await self._database(self.store.end_session(old))
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
        _cookie_out(request, response, COOKIE, token, "Lax", "/", int(self.settings.session_ttl))

    async def logout(self, request: web.Request) -> web.StreamResponse:
        who = await self.identify(request)
        if who is None or who.session is None:
            raise _refused("not logged in (log out ends a session started at /auth/login)")
        self.keyring.forget_session(who.session)
        await self._database(self.store.end_session(who.session))
        response = _redirect("/auth/login") if _is_form(request) else _json({"logged_out": True})
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
        if form and not _same(fields.get("csrf", ""), _cookie(request, FORM_COOKIE) or "x"):
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

    async def status(self, request: web.Request) -> dict[str, Any]:
        """The status page's account section: who is looking, and the API keys they may see
        (an admin: every key; anyone else: their own) with their usage so far."""
        who: Identity | None = request.get(IDENTITY)
        if who is None:  # (metrics open, or a rule without identity: nothing personal)
            return {}
        section: dict[str, Any] = {"user": who.user, "role": who.role}
        if who.csrf is not None:
            section["csrf"] = who.csrf  # for the page's log-out form
        try:
            records = await self.store.keys(None if who.admin else who.user)
        except DatabaseError:
            section["keys_error"] = "the account database is unavailable"
            return section
        pending = self.keyring.pending_usage()  # counted here, not yet written
        now = time.time()
        keys = []
        for k in records:
            extra = pending.get(k.id)
            keys.append(
                {
                    "id": k.id,
                    "prefix": k.prefix,
                    "user": k.user,
                    "models": list(k.models) if k.models is not None else None,
                    "state": k.state(now),
                    "rate_limit": k.rate_limit,
                    "requests": k.requests + (extra.requests if extra else 0),
                    "rows": k.rows + (extra.rows if extra else 0),
                    "errors": k.errors + (extra.errors if extra else 0),
                    "last_used_at": max(k.last_used_at or 0, extra.last_used_at if extra else 0)
                    or None,
                }
            )
        section["keys"] = keys
        return section

    async def whoami(self, request: web.Request) -> web.Response:
        who = await self.identify(request)
        if who is None:
            raise _refused(_NO_CREDENTIALS)
        body: dict[str, Any] = {"user": who.user, "role": who.role}
        if who.csrf is not None:
            body["csrf"] = who.csrf
        if who.key is not None:
            body["key"] = who.key.prefix
        return _json(body)


# ---------------------------------------------------------------------- helpers


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


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _cookie_out(
    request: web.Request,
    response: web.StreamResponse,
    name: str,
    value: str,
    samesite: str,
    path: str,
    max_age: int,
) -> None:
    """An HttpOnly cookie, Secure when the request came over TLS."""
    secure = request.secure or None
    response.set_cookie(
        name, value, httponly=True, samesite=samesite, secure=secure, path=path, max_age=max_age
    )


def _cookie(request: web.Request, name: str) -> str | None:
    cookies = getattr(request, "cookies", None)
    if cookies is not None:
        value = cookies.get(name)
        return value or None
    header = request.headers.get("Cookie")  # (the fast path's request has no cookie jar)
    if header is None:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value or None
    return None


def _loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def _local(target: str) -> str:
    """A redirect target on this server only (no other host, no scheme)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _content_type(request: web.Request) -> str:
    """(read from the header: the fast path's request has no ``content_type``)"""
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _is_form(request: web.Request) -> bool:
    return _content_type(request) in _FORM


async def _form_field(request: web.Request, name: str) -> str | None:
    if not _is_form(request) or not hasattr(request, "post"):
        return None
    value = (await request.post()).get(name)
    return value if isinstance(value, str) else None


async def _credentials(request: web.Request) -> tuple[bool, dict[str, str]]:
    """(sent by a form, its string fields) from a JSON object or a form."""
    if _is_form(request):
        data = await request.post()
        return True, {k: v for k, v in data.items() if isinstance(v, str)}
    if _content_type(request) != _JSON:
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
