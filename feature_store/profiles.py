"""The compact encoding of a Profile: one small JSON object per customer (about 200 bytes; format 2).

The live fields, which the Lua scripts of `feature_store.ingest` and `feature_store.consent` read and rewrite,
keep one JSON field each: ``v`` recent views, ``k`` cart, ``p`` purchases, ``o`` orders, ``m`` spend, ``u``
updated at, ``cs`` consent bits, ``ps`` pseudonym. A field equal to its default (0, empty) is left out; integers
are JSON numbers when `nextbest load` writes them and strings once Lua has rewritten them (both decode).

The load-time snapshot, which only Python reads, is packed in one field ``x`` =
``segment,country,affinities,features`` (an empty part = none), because every JSON field costs its name and
four punctuation bytes:

- segment: one character for a segment of `SEGMENT_CODES`, else ``=`` and the name;
- affinities: ``category:weight`` joined by ``;``, weights in thousandths (``448`` = 0.448);
- features: ``.`` then unpadded base64url (RFC 4648 §5: no ``"``, ``\\``, ``/``, ``,`` or ``=``, so neither
  JSON nor Lua's cjson escapes it) of the byte string: feature count, a bitmap of the non-zero features, a
  bitmap of which of those are integers 1‥255, those integers one byte each, then the other non-zero values
  as little-endian float16. A typical 21-feature row takes ~28 characters instead of 56 as dense base64.
  Rows written before the ``.`` (base85, Python's alphabet, which has no ``.``) still decode; base64 is
  decoded in C, where the standard library's base85 is a Python loop (0.2 against 5 µs a row, on every
  profile read).
- ``%``, ``,`` and ``;`` inside names are written ``%25``, ``%2C``, ``%3B``.

Features are stored as float16: 11 significant bits, so a stored value is within 2⁻¹¹ ≈ 0.05 % of the
original (integers are exact up to 2048); magnitudes beyond the float16 range are clipped to ±65504 and NaN
stays NaN. `quantise_features` is that rounding, so training can show a model exactly the values serving
reads back; the sparse layout is lossless on top of it.

Format 1 (before ``x`` existed: ``sg``, ``cc``, ``a`` with decimal weights, ``f`` as dense base64 float16,
every integer a string) still decodes: a profile without ``x`` is read as format 1, so profiles already in
Redis stay readable until the next `nextbest load` rewrites them.
"""

from __future__ import annotations

import base64
import binascii
import functools
import operator
import re
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.types import CONSENT_CHANNELS, Profile, PurchaseSummary

MAX_VIEWS = 20
MAX_CART = 20
MAX_PURCHASES = 30
MAX_AFFINITIES = 5
FEATURE_DTYPE = np.dtype("<f2")
FEATURE_MAX = float(np.finfo(np.float16).max)  # 65504
MAX_FEATURES = 255  # the count is one byte

# Append-only: the position of a segment is its code in every profile already stored. These are the RFM
# segments of training.features (a test keeps them covered); any other segment is stored by name.
SEGMENT_CODES: tuple[str, ...] = (
    "prospects",
    "champions",
    "loyal",
    "potential_loyalists",
    "new",
    "promising",
    "need_attention",
    "about_to_sleep",
    "cant_lose",
    "at_risk",
    "hibernating",
)
_CODE_CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SEGMENT_TO_CODE = {name: _CODE_CHARS[i] for i, name in enumerate(SEGMENT_CODES)}
_CODE_TO_SEGMENT = {code: name for name, code in _SEGMENT_TO_CODE.items()}
_ESCAPES = {"%": "%25", ",": "%2C", ";": "%3B"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_ESCAPED = re.compile("|".join(re.escape(k) for k in _ESCAPES))
_UNESCAPED = re.compile("|".join(re.escape(k) for k in _UNESCAPES))


def new_pseudonym() -> str:
    """A random 64-bit customer pseudonym: it cannot be derived from the customer id, so deleting the
    customer's link to it (erasure) leaves every log entry that carries it irreversibly anonymous."""
    return secrets.token_hex(8)


class ProfileDecodeError(ValueError):
    """A stored profile cannot be read; the message names the customer and the field."""


class _FieldError(ValueError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field!r} {reason}")


FEATURES_BASE64 = "."  # leads a features part in base64url; without it, the part is base85 (rows written before)
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_+/", b"+/**")  # the standard alphabet's own "+" and "/" become invalid


def quantise_features(values: Sequence[float] | npt.ArrayLike) -> npt.NDArray[np.float16]:
    """Features as they are stored: clipped to ±65504 (NaN kept), rounded to the nearest float16."""
    x = np.asarray(values, dtype=np.float64)
    return np.clip(x, -FEATURE_MAX, FEATURE_MAX).astype(FEATURE_DTYPE)


def encode_features(values: Sequence[float] | npt.ArrayLike) -> str:
    """The features part of ``x``: sparse, small integers in one byte, the rest float16 (see the module doc)."""
    stored = quantise_features(values)
    if stored.ndim != 1 or stored.size > MAX_FEATURES:
        raise ValueError(f"features must be one row of at most {MAX_FEATURES} values, got shape {stored.shape}")
    if stored.size == 0:
        return ""
    nonzero = stored != 0  # NaN counts as non-zero and is stored as float16
    values16 = stored[nonzero]
    wide = values16.astype(np.float64)
    small = (wide >= 1) & (wide <= 255) & (wide == np.floor(wide))
    data = b"".join(
        (
            bytes([stored.size]),
            np.packbits(nonzero, bitorder="little").tobytes(),
            np.packbits(small, bitorder="little").tobytes(),
            wide[small].astype(np.uint8).tobytes(),
            values16[~small].tobytes(),
        )
    )
    return FEATURES_BASE64 + binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


# Each combination of consent bits as its set of channels, built once (a profile read is a table lookup).
_CONSENTS = tuple(
    frozenset(c for i, c in enumerate(CONSENT_CHANNELS) if bits >> i & 1) for bits in range(1 << len(CONSENT_CHANNELS))
)
_CONSENT_MASK = len(_CONSENTS) - 1


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a feature row's stored values go, for one (count, non-zero bitmap, small-integer bitmap)."""

    n_small: int  # values stored as one byte
    size: int  # bytes of stored values
    halves: struct.Struct  # the float16 values
    pick: Callable[[tuple[float, ...]], tuple[float, ...]]  # (0.0, small..., halves...) -> the row, 0.0


@functools.lru_cache(maxsize=4096)  # customers share a few layouts: the same features are zero for many
def _layout(n: int, nonzero: int, small: int) -> _Layout:
    where = [i for i in range(n) if nonzero >> i & 1]
    k = len(where)
    if nonzero >> n or small >> k:
        raise ValueError(f"features' bitmaps name values beyond the {n} features their header announces")
    is_small = [small >> j & 1 for j in range(k)]
    n_small = sum(is_small)
    source = [0] * n  # position in (0.0, small..., halves...): 0 = a zero feature
    next_small, next_half = 1, 1 + n_small
    for j, i in enumerate(where):
        if is_small[j]:
            source[i], next_small = next_small, next_small + 1
        else:
            source[i], next_half = next_half, next_half + 1
    # One index more than the row (then cut off): itemgetter of a single index would return the item itself.
    pick = operator.itemgetter(*source, 0)
    return _Layout(n_small, n_small + 2 * (k - n_small), struct.Struct(f"<{k - n_small}e"), pick)


def _features_bytes(text: str) -> bytes:
    """The byte string of a features part: ``.`` and base64url, or (rows written before) base85."""
    if text[0] != FEATURES_BASE64:
        try:
            return base64.b85decode(text)
        except ValueError as exc:
            raise ValueError(f"features are not base85: {exc}") from exc
    body = text[1:]
    try:
        padded = (body + "=" * (-len(body) % 4)).encode("ascii").translate(_FROM_URLSAFE)
        return binascii.a2b_base64(padded, strict_mode=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(f"features are not base64url: {exc}") from exc


def decode_features(text: str) -> tuple[float, ...]:
    # Plain ints and struct rather than numpy: for ~20 values this is several times faster, and it runs on
    # every request. The layout of each row (which value goes where) is cached per bitmap pair.
    if not text:
        return ()
    data = _features_bytes(text)
    n = data[0]
    at = 1 + (n + 7) // 8
    nonzero = int.from_bytes(data[1:at], "little")
    k = nonzero.bit_count()
    small = int.from_bytes(data[at : at + (k + 7) // 8], "little")
    at += (k + 7) // 8
    layout = _layout(n, nonzero, small)
    if len(data) != at + layout.size:
        raise ValueError(f"features take {len(data)} bytes, not the length their {n}-feature header announces")
    if not n:
        return ()
    end = at + layout.n_small
    return layout.pick((0.0, *map(float, data[at:end]), *layout.halves.unpack_from(data, end)))[:-1]


def decode_features_v1(text: str) -> tuple[float, ...]:
    """Format 1: dense base64 of little-endian float16."""
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"features are not base64: {exc}") from exc
    if len(data) % FEATURE_DTYPE.itemsize:
        raise ValueError(f"features take {len(data)} bytes, not a whole number of float16 values")
    return tuple(np.frombuffer(data, dtype=FEATURE_DTYPE).astype(np.float64).tolist())


def _escape(text: str) -> str:
    return _ESCAPED.sub(lambda m: _ESCAPES[m.group()], text) if _ESCAPED.search(text) else text


def _unescape(text: str) -> str:
    return _UNESCAPED.sub(lambda m: _UNESCAPES[m.group()], text) if "%" in text else text


def _encode_segment(segment: str | None) -> str:
    if not segment:
        return ""
    return _SEGMENT_TO_CODE.get(segment) or "=" + _escape(segment)


def _decode_segment(text: str) -> str | None:
    if not text:
        return None
    if text.startswith("="):
        return _unescape(text[1:]) or None
    if text not in _CODE_TO_SEGMENT:
        raise ValueError(f"unknown segment code {text!r}")
    return _CODE_TO_SEGMENT[text]


def encode_profile(p: Profile) -> dict[str, str | int]:
    consent_bits = sum(1 << i for i, c in enumerate(CONSENT_CHANNELS) if c in p.consents)
    snapshot = (
        _encode_segment(p.segment),
        _escape(p.country or ""),
        ";".join(f"{_escape(c)}:{round(w * 1000)}" for c, w in p.category_affinity[:MAX_AFFINITIES]),
        encode_features(p.features),
    )
    fields: dict[str, str | int] = {
        "v": ",".join(p.recent_views[:MAX_VIEWS]),
        "k": ",".join(p.cart[:MAX_CART]),
        "p": ";".join(f"{x.item_id}:{x.count}:{x.first_day}:{x.last_day}" for x in p.purchases[:MAX_PURCHASES]),
        "cs": consent_bits,
        "o": p.orders,
        "m": f"{p.spend:.2f}" if p.spend else "",
        "u": p.updated_at,
        "ps": p.pseudonym or "",
        "x": ",".join(snapshot) if any(snapshot) else "",
    }
    return {k: v for k, v in fields.items() if v not in ("", 0)}


def _split(text: str | None, sep: str) -> list[str]:
    return [x for x in text.split(sep) if x] if text else []


def _text(raw: Mapping[str, object], field: str) -> str | None:
    value = raw.get(field)
    if value is None or isinstance(value, str):
        return value
    raise _FieldError(field, f"is a JSON {type(value).__name__}, not a string")


def _number(raw: Mapping[str, object], field: str, kind: type[int] | type[float]) -> int | float:
    value = raw.get(field, 0)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _FieldError(field, f"is a JSON {type(value).__name__}, not a number")
    try:
        return kind(value)
    except ValueError as exc:
        raise _FieldError(field, f"is not a number: {value!r}") from exc


def _purchases(text: str | None) -> tuple[PurchaseSummary, ...]:
    out = []
    for chunk in _split(text, ";"):
        try:
            item, count, first, last = chunk.rsplit(":", 3)
            out.append(PurchaseSummary(item, int(count), int(first), int(last)))
        except ValueError as exc:
            raise _FieldError("p", f"has a malformed purchase {chunk!r} (item:count:first_day:last_day)") from exc
    return tuple(out)


def _affinities(text: str | None, field: str, packed: bool) -> tuple[tuple[str, float], ...]:
    """Format 2 (`packed`): escaped names, weights in thousandths; format 1: names as is, decimal weights."""
    out = []
    for chunk in _split(text, ";"):
        try:
            cat, weight = chunk.rsplit(":", 1)
            out.append((_unescape(cat), int(weight) / 1000) if packed else (cat, float(weight)))
        except ValueError as exc:
            raise _FieldError(field, f"has a malformed category affinity {chunk!r}") from exc
    return tuple(out)


Snapshot = tuple[str | None, str | None, tuple[tuple[str, float], ...], tuple[float, ...]]


def _packed_parts(packed: str) -> list[str]:
    """``x`` split into segment, country, affinities and features."""
    parts = packed.split(",")
    if len(parts) != 4:
        raise _FieldError("x", f"has {len(parts)} parts, not 4 (segment,country,affinities,features)")
    return parts


def _snapshot(raw: Mapping[str, object]) -> Snapshot:
    """segment, country, affinities and features: packed in ``x`` (format 2) or four fields (format 1)."""
    packed = _text(raw, "x")
    if packed is None:
        features = _text(raw, "f")
        try:
            values = decode_features_v1(features) if features else ()
        except ValueError as exc:
            raise _FieldError("f", f"(features) is malformed: {exc}") from exc
        return (
            _text(raw, "sg") or None,
            _text(raw, "cc") or None,
            _affinities(_text(raw, "a"), "a", packed=False),
            values,
        )
    segment, country, affinities, features = _packed_parts(packed)
    try:
        seg = _decode_segment(segment)
    except ValueError as exc:
        raise _FieldError("x", f"(segment) is malformed: {exc}") from exc
    try:
        values = decode_features(features)
    except (ValueError, IndexError) as exc:
        raise _FieldError("x", f"(features) is malformed: {exc}") from exc
    return seg, _unescape(country) or None, _affinities(affinities, "x", packed=True), values


def decode_country(customer_id: str, raw: Mapping[str, object]) -> str | None:
    """The profile's country alone, as `decode_profile` reads it, without decoding the rest: a stored email's
    read-back needs only the country (its prices' format). `ProfileDecodeError` if the fields holding the
    country are malformed; damage elsewhere in the profile is not looked for."""
    try:
        packed = _text(raw, "x")
        if packed is None:
            return _text(raw, "cc") or None
        return _unescape(_packed_parts(packed)[1]) or None
    except ValueError as exc:
        raise ProfileDecodeError(f"profile of {customer_id!r} is malformed: {exc}") from exc


def decode_profile(customer_id: str, raw: Mapping[str, object]) -> Profile:
    """The profile from its stored JSON object (format 2 or 1); `ProfileDecodeError` names customer and field."""
    try:
        segment, country, affinities, features = _snapshot(raw)
        bits = int(_number(raw, "cs", int))
        # Positionally, in field order (a third cheaper than thirteen keywords, for every profile read).
        return Profile(
            customer_id,
            tuple(_split(_text(raw, "v"), ",")),  # recent views
            tuple(_split(_text(raw, "k"), ",")),  # cart
            _purchases(_text(raw, "p")),
            affinities,
            _CONSENTS[bits & _CONSENT_MASK],  # consents (bits of no channel are ignored)
            int(_number(raw, "o", int)),  # orders
            float(_number(raw, "m", float)),  # spend
            int(_number(raw, "u", int)),  # updated at
            _text(raw, "ps") or None,  # pseudonym
            segment,
            country,
            features,
        )
    except ValueError as exc:
        raise ProfileDecodeError(f"profile of {customer_id!r} is malformed: {exc}") from exc
