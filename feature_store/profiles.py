"""The compact encoding of a Profile: short field names, ids joined into strings (a few hundred bytes).

Customer features (`f`) are stored as base64 of little-endian float16, two bytes each: 21 features take 56
characters instead of ~200 as decimal text. float16 keeps 11 significant bits, so a stored value is within
2⁻¹¹ ≈ 0.05 % of the original (about 3 significant decimal digits; integers are exact up to 2048);
magnitudes beyond the float16 range are clipped to ±65504 and NaN stays NaN. `quantise_features` is that
rounding, so training can show a model exactly the values serving will read back.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from engine.types import CONSENT_CHANNELS, Profile, PurchaseSummary

MAX_VIEWS = 20
MAX_CART = 20
MAX_PURCHASES = 30
MAX_AFFINITIES = 5
FEATURE_DTYPE = np.dtype("<f2")
FEATURE_MAX = float(np.finfo(np.float16).max)  # 65504


def new_pseudonym() -> str:
    """A random 64-bit customer pseudonym: it cannot be derived from the customer id, so deleting the
    customer's link to it (erasure) leaves every log entry that carries it irreversibly anonymous."""
    return secrets.token_hex(8)


class ProfileDecodeError(ValueError):
    """A stored profile cannot be read; the message names the customer and the field."""


def quantise_features(values: Sequence[float] | npt.ArrayLike) -> npt.NDArray[np.float16]:
    """Features as they are stored: clipped to ±65504 (NaN kept), rounded to the nearest float16."""
    x = np.asarray(values, dtype=np.float64)
    return np.clip(x, -FEATURE_MAX, FEATURE_MAX).astype(FEATURE_DTYPE)


def encode_features(values: Sequence[float] | npt.ArrayLike) -> str:
    stored = quantise_features(values)
    return base64.b64encode(stored.tobytes()).decode("ascii") if stored.size else ""


def decode_features(text: str) -> tuple[float, ...]:
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"features are not base64: {exc}") from exc
    if len(data) % FEATURE_DTYPE.itemsize:
        raise ValueError(f"features take {len(data)} bytes, not a whole number of float16 values")
    return tuple(np.frombuffer(data, dtype=FEATURE_DTYPE).astype(np.float64).tolist())


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
        "sg": p.segment or "",
        "cc": p.country or "",
        "f": encode_features(p.features),
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
            segment=raw.get("sg") or None,
            country=raw.get("cc") or None,
            features=decode_features(raw["f"]) if raw.get("f") else (),
        )
    except ValueError as exc:
        raise ProfileDecodeError(f"profile of {customer_id!r} is malformed: {exc}") from exc
