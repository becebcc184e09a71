"""Batch materialisation of customer profiles from the event history, as of a point in time."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from engine.types import SECONDS_PER_DAY, Profile, PurchaseSummary
from feature_store.profiles import MAX_AFFINITIES, MAX_PURCHASES, MAX_VIEWS, quantise_features
from training.datafiles import CONSENT_COLUMNS, ShopData
from training.features import FEATURE_COLUMNS, customer_features

CART_WINDOW_DAYS = 3  # a cart item older than this, or bought since, is no longer "in the cart"
AFFINITY_HALF_LIFE_DAYS = 30.0
TYPE_WEIGHT = {"view_item": 1.0, "add_to_cart": 3.0, "purchase": 6.0, "email_click": 2.0, "email_open": 0.0}


def _lists(df: pd.DataFrame, limit: int) -> dict[str, list[str]]:
    """customer → item ids, newest first, distinct, at most `limit`."""
    if df.empty:
        return {}
    d = df.sort_values("timestamp", ascending=False, kind="stable")
    d = d.drop_duplicates(["customer_id", "item_id"])
    d = d.groupby("customer_id", sort=False).head(limit)
    return d.groupby("customer_id", sort=False)["item_id"].agg(list).to_dict()  # type: ignore[no-any-return]


def build_profiles(shop: ShopData, as_of: int | None = None) -> Iterator[Profile]:
    """One profile per customer from events strictly before `as_of` (unix seconds; default: all)."""
    ev = shop.events if as_of is None else shop.events[shop.events["timestamp"] < as_of]
    now = int(ev["timestamp"].max()) + 1 if as_of is None and len(ev) else int(as_of or 0)
    views = _lists(ev[ev["type"] == "view_item"], MAX_VIEWS)

    purchases_ev = ev[ev["type"] == "purchase"]
    carts = ev[(ev["type"] == "add_to_cart") & (ev["timestamp"] >= now - CART_WINDOW_DAYS * SECONDS_PER_DAY)]
    if len(carts):
        last_buy = purchases_ev.groupby(["customer_id", "item_id"])["timestamp"].max()
        key = pd.MultiIndex.from_frame(carts[["customer_id", "item_id"]])
        bought_after = last_buy.reindex(key).to_numpy() >= carts["timestamp"].to_numpy()
        carts = carts[~bought_after]
    cart = _lists(carts, MAX_VIEWS)

    bought: dict[str, list[PurchaseSummary]] = {}
    orders: dict[str, int] = {}
    spend: dict[str, float] = {}
    if len(purchases_ev):
        day = purchases_ev["timestamp"] // SECONDS_PER_DAY
        g = purchases_ev.assign(day=day).groupby(["customer_id", "item_id"], sort=False)
        summ = g.agg(count=("day", "size"), first=("day", "min"), last=("day", "max")).reset_index()
        summ = summ.sort_values(["customer_id", "last", "count"], ascending=[True, False, False], kind="stable")
        summ = summ.groupby("customer_id", sort=False).head(MAX_PURCHASES)
        for cid, item, cnt, first, last in summ.itertuples(index=False, name=None):
            bought.setdefault(cid, []).append(PurchaseSummary(item, int(cnt), int(first), int(last)))
        orders = purchases_ev.groupby("customer_id")["timestamp"].nunique().to_dict()
        spend = (purchases_ev["price"] * purchases_ev["quantity"]).groupby(purchases_ev["customer_id"]).sum().to_dict()

    affinity = _category_affinity(ev, shop.catalog, now)
    last_seen = ev.groupby("customer_id")["timestamp"].max().to_dict() if len(ev) else {}
    consent = shop.customers[["customer_id", *CONSENT_COLUMNS]]
    names = [c.removeprefix("consent_") for c in CONSENT_COLUMNS]
    for row in consent.itertuples(index=False, name=None):
        cid = row[0]
        yield Profile(
            customer_id=cid,
            recent_views=tuple(views.get(cid, ())),
            cart=tuple(cart.get(cid, ())),
            purchases=tuple(bought.get(cid, ())),
            category_affinity=tuple(affinity.get(cid, ())),
            consents=frozenset(n for n, flag in zip(names, row[1:], strict=True) if flag),
            orders=int(orders.get(cid, 0)),
            spend=float(spend.get(cid, 0.0)),
            updated_at=int(last_seen.get(cid, 0)),
        )


def profiles_for_load(shop: ShopData, data_dir: Path) -> Iterator[Profile]:
    """What `nextbest load` writes: `build_profiles` plus segment, country and the propensity features.

    The features (FEATURE_COLUMNS order, float16-rounded as stored) and segment are as of one second after the
    last event; a customer created after that gets neither. Features are computed here, before the first
    profile is yielded, so the caller's progress bar counts only the profiles.
    """
    ev = shop.events
    as_of = int(ev["timestamp"].max()) + 1 if len(ev) else int(time.time())
    frame = customer_features(data_dir, as_of)
    values = quantise_features(frame[list(FEATURE_COLUMNS)].to_numpy(dtype=np.float64)).astype(np.float64)
    extras = {
        cid: (segment, tuple(row))
        for cid, segment, row in zip(frame["customer_id"], frame["segment"], values.tolist(), strict=True)
    }
    countries = dict(zip(shop.customers["customer_id"], shop.customers["country"], strict=True))
    return _with_extras(build_profiles(shop), extras, countries)


def _with_extras(
    profiles: Iterator[Profile], extras: dict[str, tuple[str, tuple[float, ...]]], countries: dict[str, str]
) -> Iterator[Profile]:
    for p in profiles:
        segment, features = extras.get(p.customer_id, (None, ()))
        yield dataclasses.replace(p, segment=segment, country=countries.get(p.customer_id) or None, features=features)


def _category_affinity(ev: pd.DataFrame, catalog: pd.DataFrame, now: int) -> dict[str, list[tuple[str, float]]]:
    """Share of a customer's time-decayed, type-weighted interest per category; strongest first."""
    ev = ev[ev["item_id"] != ""]
    if ev.empty:
        return {}
    category = ev["item_id"].map(catalog.set_index("item_id")["category"])
    age_days = (now - ev["timestamp"].to_numpy()) / SECONDS_PER_DAY
    w = ev["type"].map(TYPE_WEIGHT).to_numpy() * np.power(0.5, age_days / AFFINITY_HALF_LIFE_DAYS)
    df = pd.DataFrame({"customer_id": ev["customer_id"].to_numpy(), "category": category.to_numpy(), "w": w})
    s = df.groupby(["customer_id", "category"], sort=False)["w"].sum().reset_index()
    s = s[s["w"] > 0]
    s["share"] = s["w"] / s.groupby("customer_id")["w"].transform("sum")
    s = s.sort_values(["customer_id", "share"], ascending=[True, False], kind="stable")
    s = s.groupby("customer_id", sort=False).head(MAX_AFFINITIES)
    out: dict[str, list[tuple[str, float]]] = {}
    for cid, cat, share in s[["customer_id", "category", "share"]].itertuples(index=False, name=None):
        out.setdefault(cid, []).append((cat, round(float(share), 3)))
    return out
