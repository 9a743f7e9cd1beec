"""Keys, tokens and passwords (``modelpool.auth._secrets``): their shape, and comparisons that
take the same time whatever the guess."""

from __future__ import annotations

import hmac
from typing import Any

import pytest

from modelpool.auth import _secrets


def test_keys_are_long_random_and_carry_a_visible_prefix() -> None:
    made = {_secrets.new_key() for _ in range(200)}
    assert len(made) == 200
    for key, prefix in made:
        assert _secrets.key_prefix(key) == prefix
        assert key.startswith(prefix + "_")
        assert len(key) == 3 + 8 + 1 + 43  # 43 characters: 256 random bits
    for not_a_key in ("", "mp_", "mp_abcdefgh", "mp_abcdefgh_short", "xx_abcdefgh_" + "a" * 43):
        assert _secrets.key_prefix(not_a_key) is None
    assert _secrets.digest("x") == _secrets.digest("x") != _secrets.digest("y")


def test_comparisons_are_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every check of a secret goes through ``hmac.compare_digest``."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert _secrets.same("abc", "abc")
    assert not _secrets.same("abc", "abd")
    assert len(calls) == 2


def test_a_missing_account_costs_the_same_password_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """No account and a wrong password both run one argon2id verification."""
    stored = _secrets.hash_password("the right one")
    assert stored.startswith("$argon2id$")
    verified: list[str] = []
    real = _secrets._HASHER

    class Spy:
        def hash(self, password: str) -> str:
            return real.hash(password)

        def verify(self, hashed: str, password: str) -> bool:
            verified.append(hashed)
            return real.verify(hashed, password)

    monkeypatch.setattr(_secrets, "_HASHER", Spy())
    assert _secrets.check_password(stored, "the right one")
    assert not _secrets.check_password(stored, "a wrong one")
    assert not _secrets.check_password(None, "the right one")
    assert not _secrets.check_password("not a hash", "x")
    assert len(verified) == 4
    assert verified[2].startswith("$argon2id$")  # the stand-in hash, verified all the same
