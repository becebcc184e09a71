"""Email content as an ESP template consumes it: JSON slots (titles, prices in the customer's currency and
locale, images, signed click links) or a ready table-based HTML block for ESPs that cannot loop."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from babel.numbers import format_currency, get_currency_precision

from api.email import EmailAnswer
from api.signing import ClickSigner, ClickToken
from engine.catalog import CatalogState
from engine.email_config import CountryFormat, EmailSettings
from engine.rules import Rules
from engine.state import ServingState

MS = 1000
MAX_CACHED_ITEMS = 200_000  # (item, format) entries the renderer keeps before starting again


@functools.lru_cache(maxsize=65_536)
def format_price(amount: float, currency: str, locale: str) -> str:
    """'12,99 €' for de_DE, '£11.17' for en_GB: CLDR formatting (cached: a catalog has few distinct prices)."""
    fast = _formatter(currency, locale)
    if fast is not None and amount >= 0:
        return fast(amount)
    return str(format_currency(amount, currency, locale=locale))


# Amounts a fast formatter must spell exactly as babel before it is used: no digits, few, every grouping
# depth, halves (for currencies without decimals), a catalog's usual prices.
_PROBES: tuple[float, ...] = (0.0, 0.01, 0.5, 1.0, 2.5, 9.99, 12.3, 99.99, 100.0, 999.5, 1000.0, 1234.5, 9999.99)
_PROBES += (10_000.0, 123_456.78, 1_000_000.0, 1_234_567.89, 12_345_678.9, 999_999_999.99)


@functools.lru_cache(maxsize=1024)
def _formatter(currency: str, locale: str) -> Callable[[float], str] | None:
    """babel's format of (currency, locale) as Python's own number formatting between a prefix and a suffix,
    when that spells every probe amount exactly as babel does (groups of three, one decimal separator);
    None otherwise (Indian grouping, a minimum of grouping digits, ...), and babel formats each price.

    babel takes about 27 µs a price; a batch's renderer meets thousands of new (item, format) pairs."""
    try:
        sample = str(format_currency(1_234_567.0, currency, locale=locale))
        decimals = get_currency_precision(currency)
        fraction = str(format_currency(1.5, currency, locale=locale, decimal_quantization=False)) if decimals else ""
    except (ValueError, LookupError):
        return None  # babel's own error is raised where the price is formatted
    at = [i for i, ch in enumerate(sample) if ch.isdigit()]
    if not at:
        return None
    prefix, body, suffix = sample[: at[0]], sample[at[0] : at[-1] + 1], sample[at[-1] + 1 :]
    group = body[1] if len(body) > 1 and not body[1].isdigit() else ""
    point = ""
    if decimals:
        separators = [ch for ch in fraction if not ch.isdigit() and ch not in prefix + suffix]
        if len(separators) != 1:
            return None
        point = separators[0]
    table = str.maketrans({",": group, ".": point})

    def fast(amount: float) -> str:
        return prefix + f"{amount:,.{decimals}f}".translate(table) + suffix

    if any(fast(p) != str(format_currency(p, currency, locale=locale)) for p in _PROBES):
        return None
    return fast


def landing_url(base: str, campaign_id: str, position: int, utm: dict[str, str]) -> str:
    """`base` with the campaign's UTM parameters added (existing query parameters are kept)."""
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not k.startswith("utm_")]
    query += [*utm.items(), ("utm_campaign", campaign_id), ("utm_content", f"slot{position}")]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


class EmailRenderer:
    def __init__(self, signer: ClickSigner, public_url: str) -> None:
        self.signer = signer
        self.click_base = public_url.rstrip("/") + "/v1/email/click/"
        # A product slot's item fields (title, price in a format, image) per (item, format), for the
        # catalog they were read from: a batch shows the same few hundred items to many recipients.
        self._items: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = {}  # format -> item -> fields
        self._items_of: CatalogState | None = None
        self._cached = 0  # item fields held, over every format

    def body(self, answer: EmailAnswer, state: ServingState) -> dict[str, Any]:
        content, rules = answer.content, state.rules
        fmt = rules.email.country_format(answer.country)
        expires = content.created_ms // MS + rules.email.click_ttl
        sign, click_base, campaign = self.signer.sign_fields, self.click_base, content.campaign_id
        items = self._items_in(state.catalog, fmt)
        slots: list[dict[str, Any]] = []
        for s in content.slots:
            if s.kind == "product":
                fields = items.get(s.item_id) or self._item_fields(state.catalog, s.item_id, fmt, items)
                url = click_base + sign(content.decision_id, campaign, s.position, s.kind, s.item_id, expires)
                slots.append(
                    {"position": s.position, "type": s.kind, "click_url": url, "reasons": list(s.reasons), **fields}
                )
            else:
                offer = rules.offers.get(s.item_id)
                decision_id = content.offers_decision_id or ""
                url = click_base + sign(decision_id, campaign, s.position, s.kind, s.item_id, expires)
                slots.append(
                    {
                        "position": s.position,
                        "type": s.kind,
                        "click_url": url,
                        "reasons": list(s.reasons),
                        "offer_id": s.item_id,
                        "title": offer.title if offer else "",
                        "price": None,
                        "price_formatted": "",
                        "image_url": "",
                    }
                )
        return {
            "campaign_id": content.campaign_id,
            "decision_id": content.decision_id,
            "placement": content.placement,
            "locale": fmt.locale,
            "currency": fmt.currency,
            "source": answer.source,
            "fallback": content.fallback,
            "fallback_reason": content.fallback_reason,
            "slots": slots,
        }

    def _items_in(self, cat: CatalogState, fmt: CountryFormat) -> dict[str, dict[str, Any]]:
        """The item fields cached for one price format, for this catalog (a new catalog, or a full cache, starts
        again: prices may have changed)."""
        if cat is not self._items_of or self._cached >= MAX_CACHED_ITEMS:
            self._items, self._items_of, self._cached = {}, cat, 0
        key = (fmt.locale, fmt.currency, fmt.rate)
        items = self._items.get(key)
        if items is None:
            items = self._items[key] = {}
        return items

    def _item_fields(
        self, cat: CatalogState, item_id: str, fmt: CountryFormat, items: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        i = cat.index.get(item_id)
        price = round(float(cat.price[i]) * fmt.rate, 2) if i is not None else None
        fields = items[item_id] = {
            "item_id": item_id,
            "title": cat.titles[i] if i is not None else "",
            "price": price,
            "price_formatted": format_price(price, fmt.currency, fmt.locale) if price is not None else "",
            "image_url": cat.image_urls[i] if i is not None else "",
        }
        self._cached += 1
        return fields

    def html(self, body: dict[str, Any]) -> str:
        """A table-based block (inline styles only: most mail clients ignore <style> and flexbox)."""
        cells = []
        for s in body["slots"]:
            title, url = html.escape(s["title"]), html.escape(s["click_url"], quote=True)
            img = (
                f'<a href="{url}"><img src="{html.escape(s["image_url"], quote=True)}" alt="{title}" width="140" '
                'style="display:block;border:0;width:140px;max-width:100%"></a>'
                if s["image_url"]
                else ""
            )
            price = (
                f'<div style="font-weight:bold">{html.escape(s["price_formatted"])}</div>'
                if s["price_formatted"]
                else ""
            )
            cells.append(
                '<td align="center" valign="top" style="padding:8px;font-family:Arial,sans-serif;font-size:14px">'
                f'{img}<div><a href="{url}" style="color:#222;text-decoration:none">{title}</a></div>{price}</td>'
            )
        rows = "".join(f"<tr>{''.join(cells[k : k + 2])}</tr>" for k in range(0, len(cells), 2))
        return (
            f'<table role="presentation" cellpadding="0" cellspacing="0" border="0" width="100%" '
            f'data-decision-id="{html.escape(body["decision_id"], quote=True)}">{rows}</table>'
        )


def target_url(rules: Rules, state: ServingState, token: ClickToken) -> str:
    """Where a click lands: the item's (or offer's) page, else the shop, with UTM parameters."""
    email: EmailSettings = rules.email
    base = ""
    if token.kind == "product":
        i = state.catalog.index.get(token.target)
        base = state.catalog.urls[i] if i is not None else ""
    else:
        offer = rules.offers.get(token.target)
        base = offer.url if offer else ""
    return landing_url(base or email.shop_url, token.campaign_id, token.position, email.utm)
