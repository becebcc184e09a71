"""Persistent holdouts: which customers never get the treatment, decided from a hash (no state, no server).

The assignment is a pure function of (salt, customer id), so every process, language and replay agrees
on it; a new salt reshuffles the population independently of the old one. Raising the share only
adds customers to the holdout, never moves one out (the bucket is fixed, the threshold moves).
"""

from __future__ import annotations

import hashlib
import math

_SPAN = 2**64


def _hash64(customer_id: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{customer_id}".encode()).digest()[:8], "big")


def bucket(customer_id: str, salt: str) -> float:
    """The customer's uniform value in [0, 1]: first 8 bytes of sha256("<salt>:<customer_id>") / 2**64."""
    return _hash64(customer_id, salt) / _SPAN


def in_holdout(customer_id: str, salt: str, share: float) -> bool:
    """True when the customer's bucket falls below `share` (0: nobody, 1: everybody)."""
    if math.isnan(share) or not 0.0 <= share <= 1.0:
        raise ValueError(f"holdout share must be within [0, 1], got {share!r}")
    if share >= 1.0:
        return True  # the float bucket of the top 2**10 hash values rounds to 1.0
    return bucket(customer_id, salt) < share
