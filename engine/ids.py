"""Decision identifiers: time-ordered (sortable by creation) and unguessable."""

from __future__ import annotations

import base64
import os
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode())


def new_decision_id(now_ms: int | None = None) -> str:
    """A 26-character ULID: 48 bits of milliseconds then 80 random bits, Crockford base32."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = ((ms & ((1 << 48) - 1)) << 80) | int.from_bytes(os.urandom(10), "big")
    # 160 bits are 32 base32 characters; the last 26 spell the low 130 bits, i.e. the whole id.
    return base64.b32encode(value.to_bytes(20, "big"))[-26:].translate(_TO_CROCKFORD).decode()


def decision_seed(decision_id: str) -> int:
    """A deterministic 64-bit seed per decision, so a decision's random choices can be replayed."""
    value = 0
    for ch in decision_id:
        value = (value * 32 + _CROCKFORD.index(ch)) & ((1 << 130) - 1)
    return value & ((1 << 63) - 1)
