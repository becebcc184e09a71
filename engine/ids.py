"""Decision identifiers: time-ordered (sortable by creation) and unguessable."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits → two characters
# Crockford digits to the digits int(text, 32) reads, so a decision id parses in one C call.
# Any other ASCII character becomes "!", which int() refuses.
_TO_BASE32_DIGITS = {c: "!" for c in range(128)} | str.maketrans(_CROCKFORD, "0123456789abcdefghijklmnopqrstuv")
_SEED_MASK = (1 << 63) - 1


def new_decision_id(now_ms: int | None = None) -> str:
    """A 26-character ULID: 48 bits of milliseconds then 80 random bits, Crockford base32."""
    return new_decision_ids(1, now_ms)[0]


def new_decision_ids(n: int, now_ms: int | None = None) -> list[str]:
    """`n` decision ids of one moment, with their random bits from one system call."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    # 26 characters spell 130 bits, ten bits (two characters) at a time: the first ten characters are the
    # time (its top two bits always 0), the other sixteen the 80 random bits, as two 40-bit halves.
    stamp = ms & ((1 << 48) - 1)
    p = _PAIRS
    head = "".join([p[(stamp >> shift) & 1023] for shift in (40, 30, 20, 10, 0)])
    noise = os.urandom(10 * n)
    out = []
    for k in range(0, 10 * n, 10):
        hi, lo = int.from_bytes(noise[k : k + 5], "big"), int.from_bytes(noise[k + 5 : k + 10], "big")
        out.append(
            head
            + p[hi >> 30]
            + p[(hi >> 20) & 1023]
            + p[(hi >> 10) & 1023]
            + p[hi & 1023]
            + p[lo >> 30]
            + p[(lo >> 20) & 1023]
            + p[(lo >> 10) & 1023]
            + p[lo & 1023]
        )
    return out


def decision_seed(decision_id: str) -> int:
    """A deterministic 64-bit seed per decision, so a decision's random choices can be replayed."""
    try:
        if not decision_id.isascii():
            raise ValueError
        return int(decision_id.translate(_TO_BASE32_DIGITS), 32) & _SEED_MASK
    except ValueError:
        raise ValueError(f"decision id {decision_id!r} is not Crockford base32") from None


_MASK64 = (1 << 64) - 1
_STREAM = 0xDA3E39CB94B95BDB  # any odd increment: one fixed PCG64 stream
_local = threading.local()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def decision_rng(decision_id: str) -> np.random.Generator:
    """The random generator of one decision, a function of its id alone (so the decision replays).

    Building a generator from a seed runs numpy's SeedSequence (≈10 µs, a fair share of a decision); this
    sets a per-thread PCG64's 128-bit state from two SplitMix64 mixes of the seed instead. Valid until the
    same thread asks for the next decision's generator.
    """
    seed = decision_seed(decision_id)
    gen: np.random.Generator | None = getattr(_local, "gen", None)
    if gen is None:
        gen = _local.gen = np.random.Generator(np.random.PCG64())
    hi, lo = _splitmix64(seed), _splitmix64(seed ^ _MASK64)
    gen.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (hi << 64) | lo, "inc": _STREAM},
        "has_uint32": 0,
        "uinteger": 0,
    }
    return gen
