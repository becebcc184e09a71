"""The compact encoding of a Profile: short field names, ids joined into strings (a few hundred bytes)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from engine.types import CONSENT_CHANNELS, Profile, PurchaseSummary

MAX_VIEWS = 20
MAX_CART = 20
MAX_PURCHASES = 30
MAX_AFFINITIES = 5


def new_pseudonym() -> str:
    """A random 64-bit customer pseudonym: it cannot be derived from the customer id, so deleting the
    customer's link to it (erasure) leaves every log entry that carries it irreversibly anonymous."""
    return secrets.token_hex(8)


class ProfileDecodeError(ValueError):
    """A stored profile cannot be read; the message names the customer and the field."""


def encode_profile(p: Profile) -> dict[str, str]:
    consent_bits = sum(1 << i for i, c in enumerate(CONSENT_CHANNELS) if c in p.consents)
    fields = {
        "v": ",".join(p.recent_views[:MAX_VIEWS]),
        "k": ",".join(p.cart[:MAX_CART]),
        "p": ";".join(f"{x.item_id}:{x.count}:{x.first_day}:{x.last_day}" for x in p.purchases[:MAX_PURCHASES]),
        "a": ";".join(f"{c}:{w:.3f}" for c, w in p.category_affinity[:MAX_AFFINITIES]),
        "cs": str(consent_bits),
        "o": str(p.orders),
        "m": f"{p.spend:.2f}",
        "u": str(p.updated_at),
        "ps": p.pseudonym or "",
    }
    return {k: v for k, v in fields.items() if v != ""}


def _split(text: str | None, sep: str) -> list[str]:
    return [x for x in text.split(sep) if x] if text else []


def decode_profile(customer_id: str, raw: Mapping[str, str]) -> Profile:
    try:
        purchases = []
        for chunk in _split(raw.get("p"), ";"):
            item, count, first, last = chunk.rsplit(":", 3)
            purchases.append(PurchaseSummary(item, int(count), int(first), int(last)))
        affinities = []
        for chunk in _split(raw.get("a"), ";"):
            cat, weight = chunk.rsplit(":", 1)
            affinities.append((cat, float(weight)))
        bits = int(raw.get("cs", "0"))
        return Profile(
            customer_id=customer_id,
            recent_views=tuple(_split(raw.get("v"), ",")),
            cart=tuple(_split(raw.get("k"), ",")),
            purchases=tuple(purchases),
            category_affinity=tuple(affinities),
            consents=frozenset(c for i, c in enumerate(CONSENT_CHANNELS) if bits >> i & 1),
            orders=int(raw.get("o", "0")),
            spend=float(raw.get("m", "0")),
            updated_at=int(raw.get("u", "0")),
            pseudonym=raw.get("ps") or None,
        )
    except ValueError as exc:
        raise ProfileDecodeError(f"profile of {customer_id!r} is malformed: {exc}") from exc
