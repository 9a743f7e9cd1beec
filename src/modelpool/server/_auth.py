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
import ipaddress
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from modelpool._exceptions import DatabaseError
from modelpool.config import Config

from ._errors import HTTPError

if TYPE_CHECKING:
    from modelpool.auth._store import KeyRecord

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "FORM_COOKIE",
    "IDENTITY",
    "NO_CREDENTIALS",
    "ROWS",
    "Auth",
    "Identity",
    "content_type",
    "cookie",
    "exposed",
    "form_field",
    "is_form",
    "refused",
    "same",
]

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


def refused(message: str, *, invalid: bool = False) -> HTTPError:
    challenge = _REALM + (', error="invalid_token"' if invalid else "")
    return HTTPError(401, message, headers={"WWW-Authenticate": challenge})


NO_CREDENTIALS = (
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
        # Authorization header -> what it was found to be (kept in memory as the requests
        # that carry it are: this process serves them)
        self._known: dict[str, _Known] = {}
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

    def gate(self, rule: str, model: str | None = None) -> _Gate:
        """What a route with ``rule`` is behind (see the module docstring); ``model``: the
        model it serves, when its path has no ``{model}``. ``_logging.tracked`` calls it."""
        return _Gate(self, getattr(self, f"_rule_{rule}"), model)

    def admit(self, key: KeyRecord) -> None:
        """Raises 429 when ``key`` is over its rate limit."""
        wait = self.keyring.admit(key, time.monotonic())
        if wait:
            raise HTTPError(
                429,
                f"this API key is limited to {key.rate_limit:g} requests per second; "
                "slow down and retry after the time in Retry-After",
                retry_after=max(1, math.ceil(wait)),
            )

    def _remember_key(self, header: str, identity: Identity) -> None:
        """Let the next request with this ``Authorization`` header in without a lookup, until
        the keyring's cache is dropped (a revocation anywhere, or its periodic re-check)."""
        assert identity.key is not None
        if len(self._known) >= _KNOWN_SIZE:
            self._known.clear()
        self._known[header] = _Known(identity, self.keyring.generation)

    async def identify(self, request: web.Request) -> Identity | None:
        """The request's identity: its key, else its session, else None. Raises 401 for a
        credential that does not hold, 503 when it cannot be checked (the database down)."""
        header = request.headers.get("Authorization")
        if header is not None:
            return await self.identify_key(header)
        token = cookie(request, COOKIE)
        if token is None:
            return None
        session = await self.checked(self.keyring.session(token))
        if session is None:
            raise refused(_BAD_SESSION)
        user, csrf, _ = session
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            given = request.headers.get(CSRF_HEADER) or await form_field(request, "csrf")
            if given is None or not same(given, csrf):
                raise HTTPError(
                    403,
                    f"a request made with the session cookie must carry its CSRF token (the "
                    f"{CSRF_HEADER} header, or the csrf field of the page's form)",
                )
        return Identity(user.name, user.role, session=token, csrf=csrf)

    async def identify_key(self, header: str) -> Identity:
        """The identity of an ``Authorization`` header's API key (``Bearer <key>``); raises
        401 for one that does not hold, 503 when it cannot be checked. Also for gRPC calls
        (their ``authorization`` metadata)."""
        scheme, _, key_text = header.strip().partition(" ")
        key_text = key_text.strip()
        if scheme.lower() != "bearer" or not key_text:
            raise refused("send the API key as 'Authorization: Bearer <key>'", invalid=True)
        digest = hashlib.sha256(key_text.encode()).hexdigest()
        found, record = self.keyring.cached_key(digest, time.monotonic())
        if not found:
            record = await self.checked(self.keyring.key(key_text, digest))
        if record is None or record.state(time.time()) != "active":
            raise refused(_BAD_KEY, invalid=True)
        identity = Identity(record.user, record.role, key=record)
        self._remember_key(header, identity)
        return identity

    @staticmethod
    def may_use(who: Identity | None, model: str) -> None:
        """The ``model`` rule: 401 without an identity, 403 for a key limited to other
        models."""
        if who is None:
            raise refused(NO_CREDENTIALS)
        if who.key is not None and who.key.models is not None and model not in who.key.models:
            raise HTTPError(403, f"this API key may not use model {model!r}")

    async def checked(self, pending: Awaitable[Any]) -> Any:
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
            raise refused(NO_CREDENTIALS)

    def _rule_model(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        if who is not None and (who.key is None or who.key.models is None):
            return  # (every request to a model asks: the common case without a call)
        self.may_use(who, model or request.match_info.get("model", ""))

    def _rule_admin(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        if who is None:
            raise refused(NO_CREDENTIALS)
        if not who.admin:
            raise HTTPError(403, "only an admin may do this")

    def _rule_metrics(self, request: web.Request, who: Identity | None, model: str | None) -> None:
        mode = self.settings.metrics
        if mode == "open" or (mode == "loopback" and _loopback(request.remote)):
            return
        if who is None:
            where = " (or ask from this machine)" if mode == "loopback" else ""
            raise refused(f"/metrics needs a metrics key or an admin's key{where}")
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

    async def status(self, request: web.Request) -> dict[str, Any]:
        """The status page's account section: who is looking, and the API keys they may see
        (an admin: every key; anyone else: their own) with their usage so far."""
        who: Identity | None = request.get(IDENTITY)
        if who is None:  # (metrics open, or a rule without identity: nothing personal)
            return {}
        section: dict[str, Any] = {"user": who.user, "role": who.role}
        if who.csrf is not None:
            section["csrf"] = who.csrf  # for the page's log-out form
        try:  # (with the usage counted here and not yet written)
            records, pending = await self.keyring.counted_keys(None if who.admin else who.user)
        except DatabaseError:
            section["keys_error"] = "the account database is unavailable"
            return section
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
                    "last_used_at": now if extra and extra.requests else k.last_used_at,
                }
            )
        section["keys"] = keys
        return section


# ---------------------------------------------------------------------- helpers


#: Authorization headers remembered per process (past it, they are looked up again)
_KNOWN_SIZE = 10_000


class _Known:
    """A key this process has checked: who it is, and the keyring's generation it was
    checked in."""

    __slots__ = ("generation", "identity", "key")

    def __init__(self, identity: Identity, generation: int) -> None:
        assert identity.key is not None
        self.identity, self.key, self.generation = identity, identity.key, generation


class _Gate:
    """One route's rule, applied by ``_logging.tracked`` around its handler. A request whose
    key this process has checked is let in without an await or a hash (the common case);
    anything else goes through ``Auth.identify``. A key's usage is counted as its request
    ends."""

    __slots__ = ("auth", "check", "model")

    def __init__(
        self,
        auth: Auth,
        check: Callable[[web.Request, Identity | None, str | None], None],
        model: str | None,
    ) -> None:
        self.auth, self.check, self.model = auth, check, model

    def enter(self, request: web.Request) -> Awaitable[None] | None:
        header = request.headers.get("Authorization")
        if header is not None:
            auth = self.auth
            known = auth._known.get(header)
            if known is not None and known.generation == auth.keyring.generation:
                key = known.key
                if key.expires_at is None or time.time() < key.expires_at:
                    request[IDENTITY] = known.identity  # (first: a refusal counts as an error)
                    self.check(request, known.identity, self.model)
                    if key.rate_limit is not None:
                        auth.admit(key)
                    return None
        return self._identify(request)

    async def _identify(self, request: web.Request) -> None:
        identity = await self.auth.identify(request)
        if identity is not None:
            request[IDENTITY] = identity
        self.check(request, identity, self.model)
        if identity is not None and identity.key is not None:
            self.auth.admit(identity.key)

    def leave(self, request: web.Request, status: int) -> None:
        identity = request.get(IDENTITY)
        if identity is not None and (key := identity.key) is not None:
            self.auth.keyring.count(key, status >= 400, request.get(ROWS, 0))


def same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def cookie(request: web.Request, name: str) -> str | None:
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


def content_type(request: web.Request) -> str:
    """(read from the header: the fast path's request has no ``content_type``)"""
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


def is_form(request: web.Request) -> bool:
    return content_type(request) in _FORM


async def form_field(request: web.Request, name: str) -> str | None:
    if not is_form(request) or not hasattr(request, "post"):
        return None
    value = (await request.post()).get(name)
    return value if isinstance(value, str) else None
