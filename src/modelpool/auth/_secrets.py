"""Passwords, API keys and session tokens: making them, and checking them in constant time.

* A password is stored as an argon2id hash (argon2-cffi's defaults: 3 passes over 64 MiB). It
  costs tens of milliseconds of CPU by design, so callers on an event loop run
  ``hash_password`` / ``check_password`` in a thread.
* An API key is ``mp_`` + 8 random characters (its visible prefix, how it is found and told
  apart) + ``_`` + 43 random characters (256 bits). A key that long cannot be guessed, so a fast
  hash is the right one: SHA-256, checked with ``hmac.compare_digest``.
* A session token is 256 random bits; its SHA-256 is stored, like a key's.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import string

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "KEY_PREFIX",
    "check_password",
    "digest",
    "hash_password",
    "key_prefix",
    "new_key",
    "new_token",
    "same",
]

KEY_PREFIX = "mp_"
_ALPHABET = string.ascii_letters + string.digits
_KEY = re.compile(r"(mp_[A-Za-z0-9]{8})_[A-Za-z0-9_-]{43}")
_HASHER = PasswordHasher()  # argon2id


@functools.cache
def _dummy_hash() -> str:
    """Checked against when the account does not exist, so that a wrong name and a wrong
    password take the same time."""
    return _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches the ``stored`` hash; with no hash (no such account) the
    same work is done and the answer is False."""
    try:
        return _HASHER.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def new_key() -> tuple[str, str]:
    """A new API key and its visible prefix."""
    prefix = KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix


def key_prefix(key: str) -> str | None:
    """The visible prefix of something shaped like a key, else None."""
    match = _KEY.fullmatch(key)
    return match[1] if match else None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """What is stored for a key or a token: SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time string equality."""
    return hmac.compare_digest(a.encode(), b.encode())
