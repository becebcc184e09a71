"""Signed click links for email: `<key id>.<payload>.<signature>`, HMAC-SHA256, with key rotation.

Keys come from the environment as `NEXTBEST_EMAIL_SIGNING_KEYS="k2:<secret>,k1:<secret>"`: the first key
signs new links, every listed key verifies, so a key is rotated by putting the new one first and
dropping the old one once its links have expired. The payload holds the decision id, the slot and the
campaign — never the customer id — and an expiry time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import orjson

SIGNATURE_BYTES = 16  # HMAC-SHA256 truncated to 128 bits (RFC 2104 §5 allows truncation to ≥ 80 bits)
_KID = re.compile(r"^[A-Za-z0-9_-]{1,16}$")
MIN_SECRET_LEN = 16


class SigningConfigError(ValueError):
    """The signing keys setting is malformed."""


class InvalidTokenError(ValueError):
    """A click token that is malformed, tampered with, signed by an unknown key, or expired."""


@dataclass(frozen=True, slots=True)
class ClickToken:
    decision_id: str
    campaign_id: str
    position: int
    kind: str  # "product" | "offer"
    target: str  # item id or offer id
    expires_at: int  # unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClickSigner:
    def __init__(self, keys: list[tuple[str, bytes]], *, ephemeral: bool = False) -> None:
        if not keys:
            raise SigningConfigError("at least one signing key is needed")
        self.keys = keys
        self.by_id = dict(keys)
        self.ephemeral = ephemeral  # a random key made at start: links die with the process

    @classmethod
    def from_setting(cls, value: str | None) -> ClickSigner:
        """Parse `kid:secret[,kid:secret…]`; without a value, a random key valid for this process only."""
        if not value:
            return cls([("tmp", secrets.token_bytes(32))], ephemeral=True)
        keys: list[tuple[str, bytes]] = []
        for n, part in enumerate(value.split(","), start=1):
            kid, sep, secret = part.strip().partition(":")
            if not sep or not _KID.match(kid):
                raise SigningConfigError(
                    f"NEXTBEST_EMAIL_SIGNING_KEYS entry {n}: expected 'key_id:secret' with a key id of 1-16 "
                    "letters, digits, '_' or '-'"
                )
            if len(secret) < MIN_SECRET_LEN:
                raise SigningConfigError(
                    f"NEXTBEST_EMAIL_SIGNING_KEYS entry {n} ({kid}): the secret needs ≥ {MIN_SECRET_LEN} characters"
                )
            if any(k == kid for k, _ in keys):
                raise SigningConfigError(f"NEXTBEST_EMAIL_SIGNING_KEYS: key id {kid!r} is listed twice")
            keys.append((kid, secret.encode()))
        return cls(keys)

    def _mac(self, secret: bytes, kid: str, payload: str) -> bytes:
        # hmac.digest is the one-shot C path (no HMAC object per link): five links per email add up.
        return hmac.digest(secret, f"{kid}.{payload}".encode(), hashlib.sha256)[:SIGNATURE_BYTES]

    def sign(self, token: ClickToken) -> str:
        kid, secret = self.keys[0]
        payload = _b64(
            orjson.dumps(
                [token.decision_id, token.campaign_id, token.position, token.kind[0], token.target, token.expires_at]
            )
        )
        return f"{kid}.{payload}.{_b64(self._mac(secret, kid, payload))}"

    def verify(self, text: str, now: float | None = None) -> ClickToken:
        parts = text.split(".")
        if len(parts) != 3:
            raise InvalidTokenError("malformed token")
        kid, payload, signature = parts
        secret = self.by_id.get(kid)
        if secret is None:
            raise InvalidTokenError("signed with a key that is not active")
        try:
            given = _unb64(signature)
        except ValueError as exc:
            raise InvalidTokenError("malformed signature") from exc
        if not hmac.compare_digest(given, self._mac(secret, kid, payload)):
            raise InvalidTokenError("bad signature")
        try:
            decision_id, campaign_id, position, kind, target, expires_at = orjson.loads(_unb64(payload))
            token = ClickToken(
                str(decision_id),
                str(campaign_id),
                int(position),
                "offer" if kind == "o" else "product",
                str(target),
                int(expires_at),
            )
        except (ValueError, TypeError) as exc:  # signed but unreadable: a key shared with something else
            raise InvalidTokenError("unreadable payload") from exc
        if (time.time() if now is None else now) > token.expires_at:
            raise InvalidTokenError("expired")
        return token
