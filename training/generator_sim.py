"""Vectorised behaviour of the synthetic shop: browsing sessions with the view → cart → purchase funnel,
replenishment of consumables, and weekly email campaigns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from training.generator_categories import CategorySpec
from training.generator_population import (
    DAY,
    SESSION_ROOM,
    STYLE_DIM,
    WEEK,
    Customers,
    Items,
    SimParams,
)
from training.generator_truth import (
    ClickModel,
    F32Array,
    FloatArray,
    IntArray,
    affinity,
    p_buy,
    p_cart,
    taste_term,
)

MAX_VIEWS = 8  # views per session are capped so sessions fit a fixed-width matrix
N_CANDIDATES = 16  # popularity-drawn candidates per session, resampled by personal utility
CHUNK = 1 << 18  # sessions per block, bounds the (sessions × candidates) temporaries

# European shop: quiet nights, a lunch bump and an evening peak (UTC hours).
HOUR_WEIGHTS = np.array(
    [1, 0.6, 0.4, 0.3, 0.3, 0.5, 1, 2, 3, 3.5, 4, 4.5, 5, 4.5, 4, 4, 4.2, 4.8, 5.5, 6.5, 7, 6, 4, 2.2]
)

# Event type codes, in the order of EVENT_TYPES.
VIEW, CART, PURCHASE, EMAIL_OPEN, EMAIL_CLICK = range(5)
EVENT_TYPES: tuple[str, ...] = ("view_item", "add_to_cart", "purchase", "email_open", "email_click")


# --------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class AliasSampler:
    """Walker alias tables per category over item popularity: O(1) draws of many items at once."""

    sorted_items: IntArray  # item indices grouped by category
    start: IntArray  # per category, offset into sorted_items
    count: IntArray
    prob: FloatArray
    alias: IntArray  # position in sorted_items

    @classmethod
    def build(cls, category: IntArray, popularity: F32Array, n_categories: int) -> AliasSampler:
        sorted_items = np.argsort(category, kind="stable")
        count = np.bincount(category, minlength=n_categories).astype(np.int64)
        start = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64)
        prob = np.ones(len(category))
        alias = np.arange(len(category), dtype=np.int64)
        pop = popularity[sorted_items].astype(np.float64)
        for k in range(n_categories):  # Vose's method; the loop is over items once, not over draws
            s0, m = int(start[k]), int(count[k])
            scaled = (pop[s0 : s0 + m] / pop[s0 : s0 + m].sum() * m).tolist()
            small = [j for j in range(m) if scaled[j] < 1.0]
            large = [j for j in range(m) if scaled[j] >= 1.0]
            while small and large:
                lo, hi = small.pop(), large.pop()
                prob[s0 + lo] = scaled[lo]
                alias[s0 + lo] = s0 + hi
                scaled[hi] -= 1.0 - scaled[lo]
                (small if scaled[hi] < 1.0 else large).append(hi)
        return cls(sorted_items, start, count, prob, alias)

    def draw(self, rng: np.random.Generator, cat: IntArray, m: int) -> IntArray:
        x = rng.random((len(cat), m)) * self.count[cat][:, None]
        j = np.floor(x)
        pos = self.start[cat][:, None] + j.astype(np.int64)
        pos = np.where(x - j < self.prob[pos], pos, self.alias[pos])
        return np.asarray(self.sorted_items[pos], dtype=np.int64)


def draw_categories(rng: np.random.Generator, taste: F32Array, cust: IntArray) -> IntArray:
    cum = np.cumsum(taste.astype(np.float64), axis=1)
    u = rng.random(len(cust)) * cum[cust, -1]
    cat = (cum[cust] <= u[:, None]).sum(axis=1)
    return np.asarray(np.minimum(cat, taste.shape[1] - 1), dtype=np.int64)


def week_of(t: IntArray, start: int, n_weeks: int) -> IntArray:
    return np.clip((t - start) // WEEK, 0, n_weeks - 1).astype(np.int64)


def price_at(items: Items, item: IntArray, week: IntArray) -> FloatArray:
    return np.round(items.price[item] * (1.0 - items.week_discount[item, week].astype(np.float64)), 2)


# --------------------------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class EventBlock:
    """Columns of a batch of events, concatenated later and sorted by time."""

    cust: IntArray
    etype: IntArray
    item: IntArray  # -1 = none
    qty: IntArray
    price: FloatArray
    ts: IntArray

    @classmethod
    def of(
        cls, cust: IntArray, etype: int, item: IntArray, qty: IntArray, price: FloatArray, ts: IntArray
    ) -> EventBlock:
        return cls(cust, np.full(len(cust), etype, dtype=np.int64), item, qty, price, ts)


@dataclass(frozen=True)
class SessionResult:
    events: list[EventBlock]
    first_item: IntArray  # first viewed item per session (the clicked item of email sessions)
    purchases: EventBlock  # also inside `events`; seeds of replenishment chains
    n_views: int
    n_carts: int


def choose_views(
    rng: np.random.Generator,
    cust: IntArray,
    cat: IntArray,
    week: IntArray,
    cu: Customers,
    it: Items,
    sampler: AliasSampler,
    ref_price: FloatArray,
) -> tuple[IntArray, F32Array, F32Array, FloatArray]:
    """Up to MAX_VIEWS distinct-ish items per session: candidates drawn by popularity, kept by
    style·factors − sensitivity·log(price) + Gumbel noise (Gumbel-top-k = weighted sampling)."""
    s = len(cust)
    items = np.empty((s, MAX_VIEWS), dtype=np.int64)
    style_t = np.empty((s, MAX_VIEWS), dtype=np.float32)
    price_t = np.empty((s, MAX_VIEWS), dtype=np.float32)
    price = np.empty((s, MAX_VIEWS), dtype=np.float64)
    factors_t = np.ascontiguousarray(it.factors.T)
    n_weeks = it.week_discount.shape[1]
    disc_flat = it.week_discount.ravel()
    for b0 in range(0, s, CHUNK):
        b = slice(b0, min(b0 + CHUNK, s))
        c, k, w = cust[b], cat[b], week[b]
        cand = sampler.draw(rng, k, N_CANDIDATES)
        pr = np.round(it.price[cand] * (1.0 - disc_flat[cand * n_weeks + w[:, None]]), 2)
        pt = (-cu.price_sensitivity[c][:, None] * np.log(pr / ref_price[k][:, None])).astype(np.float32)
        st = np.zeros(cand.shape, dtype=np.float32)
        sty = cu.style[c]
        for d in range(STYLE_DIM):
            st += sty[:, d : d + 1] * factors_t[d][cand]
        score = st + pt + rng.gumbel(size=cand.shape).astype(np.float32)
        # Position 0 holds the best candidate (email sessions open on it); the rest are the next best.
        top = np.argpartition(-score, (0, MAX_VIEWS - 1), axis=1)[:, :MAX_VIEWS]
        items[b] = np.take_along_axis(cand, top, axis=1)
        style_t[b] = np.take_along_axis(st, top, axis=1)
        price_t[b] = np.take_along_axis(pt, top, axis=1)
        price[b] = np.take_along_axis(pr, top, axis=1)
    return items, style_t, price_t, price


def simulate_sessions(
    rng: np.random.Generator,
    cust: IntArray,
    t0: IntArray,
    price_time: IntArray,
    cu: Customers,
    it: Items,
    sampler: AliasSampler,
    cats: tuple[CategorySpec, ...],
    start: int,
    cm: ClickModel,
    p: SimParams,
) -> SessionResult:
    n_cat = len(cats)
    ref_price = np.array([c.median_price for c in cats])
    cat = draw_categories(rng, cu.taste, cust)
    week = week_of(price_time, start, it.week_discount.shape[1])
    items, style_t, price_t, price = choose_views(rng, cust, cat, week, cu, it, sampler, ref_price)
    s = len(cust)
    n_views = np.minimum(1 + rng.poisson(p.views_poisson, s), MAX_VIEWS)
    valid = np.arange(MAX_VIEWS)[None, :] < n_views[:, None]
    for j in range(1, MAX_VIEWS):  # candidates are drawn with replacement: drop repeated items
        valid[:, j] &= ~(items[:, j : j + 1] == items[:, :j]).any(axis=1)
    gaps = 3 + np.minimum(np.floor(rng.exponential(p.view_gap_mean_s, (s, MAX_VIEWS))), 357).astype(np.int64)
    gaps[:, 0] = 0
    view_t = t0[:, None] + np.cumsum(gaps, axis=1)

    taste_t = taste_term(cu.taste[cust, cat], n_cat, cm.taste_floor)
    st64, pt64 = style_t.astype(np.float64), price_t.astype(np.float64)
    aff = affinity(cm, taste_t[:, None], st64, pt64, it.pop_term[items].astype(np.float64))
    cart_t = view_t + 5 + np.minimum(np.floor(rng.exponential(20.0, (s, MAX_VIEWS))), 85).astype(np.int64)
    carted = valid & (rng.random((s, MAX_VIEWS)) < p_cart(cm, aff)) & (cart_t < it.available_until[items])
    last = np.maximum(np.where(valid, view_t, 0).max(axis=1), np.where(carted, cart_t, 0).max(axis=1))
    checkout = last + 30 + np.minimum(np.floor(rng.exponential(60.0, s)), 210).astype(np.int64)
    bought = (
        carted & (rng.random((s, MAX_VIEWS)) < p_buy(cm, st64, pt64)) & (checkout[:, None] < it.available_until[items])
    )
    qty_lam = np.array([_quantity_lambda(c) for c in cats])
    qty = 1 + rng.poisson(qty_lam[cat][:, None], (s, MAX_VIEWS)).astype(np.int64)

    cust_m = np.broadcast_to(cust[:, None], (s, MAX_VIEWS))
    checkout_m = np.broadcast_to(checkout[:, None], (s, MAX_VIEWS))
    ones = np.ones(int(valid.sum()), dtype=np.int64)
    views = EventBlock.of(cust_m[valid], VIEW, items[valid], ones, price[valid], view_t[valid])
    carts = EventBlock.of(cust_m[carted], CART, items[carted], qty[carted], price[carted], cart_t[carted])
    buys = EventBlock.of(cust_m[bought], PURCHASE, items[bought], qty[bought], price[bought], checkout_m[bought])
    buys = _first_durable_purchases_only(buys, it, cats)
    return SessionResult([views, carts, buys], items[:, 0].copy(), buys, len(views.ts), len(carts.ts))


def _first_durable_purchases_only(buys: EventBlock, it: Items, cats: tuple[CategorySpec, ...]) -> EventBlock:
    """Nobody buys the same sofa twice: a later checkout of an already bought durable item is abandoned
    (its add_to_cart stays). Sessions are simulated all at once, so this is settled afterwards in time order."""
    durable = ~np.array([c.is_consumable for c in cats])[it.category[buys.item]]
    key = buys.cust * len(it.category) + buys.item
    order = np.lexsort((buys.ts, key))
    first = np.ones(len(key), dtype=bool)
    first[order[1:]] = key[order[1:]] != key[order[:-1]]
    keep = first | ~durable
    return EventBlock(
        buys.cust[keep], buys.etype[keep], buys.item[keep], buys.qty[keep], buys.price[keep], buys.ts[keep]
    )


def _quantity_lambda(c: CategorySpec) -> float:
    # Cheap consumables are bought several at a time; durables almost always one.
    if not c.is_consumable:
        return 0.03
    return 0.6 if c.median_price < 5.0 else 0.25


def session_starts(rng: np.random.Generator, cu: Customers, start: int) -> tuple[IntArray, IntArray]:
    """(customer, start time) of every organic session, sorted by customer."""
    span = np.maximum(cu.active_until - cu.active_from, 0)
    n_sess = rng.poisson(cu.activity_rate.astype(np.float64) * span / (30 * DAY))
    n_sess[span <= 0] = 0
    cust = np.repeat(np.arange(len(span), dtype=np.int64), n_sess)
    lo, hi = cu.active_from[cust], cu.active_until[cust]
    t = lo + np.floor(rng.random(len(cust)) * (hi - lo)).astype(np.int64)
    hour = rng.choice(24, size=len(cust), p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    shifted = (t // DAY) * DAY + hour * 3600 + rng.integers(0, 3600, len(cust))
    t = np.where((shifted >= lo) & (shifted < hi), shifted, t)
    # A customer who signs up inside the window does so during their first session.
    first = (np.cumsum(n_sess) - n_sess)[n_sess > 0]
    signup = cu.created_at[cust[first]] + rng.integers(5, 300, len(first))
    new = (cu.created_at[cust[first]] >= start) & (signup < hi[first])
    t[first[new]] = signup[new]
    return cust, t


# --------------------------------------------------------------------------------------------- repurchase


def replenish(
    rng: np.random.Generator,
    buys: EventBlock,
    cu: Customers,
    it: Items,
    cats: tuple[CategorySpec, ...],
    start: int,
    p: SimParams,
    continue_p: float,
) -> list[EventBlock]:
    """The first purchase of a consumable item starts the customer's replenishment cycle for it: after
    Gamma(shape, mean = category days × customer multiplier) days a short visit view → cart → purchase of
    the same item and quantity, repeated while a coin with P(continue) comes up."""
    days = np.array([c.repurchase_days or 0.0 for c in cats])
    consumable = days[it.category[buys.item]] > 0
    key = buys.cust * len(it.category) + buys.item
    order = np.lexsort((buys.ts, key))
    order = order[consumable[order]]
    first = order[np.concatenate(([True], key[order][1:] != key[order][:-1]))] if len(order) else order
    n_rep = np.minimum(rng.geometric(1.0 - continue_p, len(first)) - 1, 60)
    seed = np.repeat(first, n_rep)
    cust, item = buys.cust[seed], buys.item[seed]
    mean_days = days[it.category[item]] * cu.repurchase_multiplier[cust]
    gap = rng.gamma(p.repurchase_gamma_shape, mean_days / p.repurchase_gamma_shape) * DAY
    csum = np.cumsum(gap)
    group_start = (np.cumsum(n_rep) - n_rep)[n_rep > 0]
    base = np.repeat(csum[group_start] - gap[group_start], n_rep[n_rep > 0])
    view_t = buys.ts[seed] + np.floor(csum - base).astype(np.int64)
    keep = view_t < cu.active_until[cust]
    cust, item, view_t, qty = cust[keep], item[keep], view_t[keep], buys.qty[seed][keep]
    r = len(cust)
    cart_t = view_t + 10 + np.minimum(np.floor(rng.exponential(30.0, r)), 110).astype(np.int64)
    buy_t = cart_t + 20 + np.minimum(np.floor(rng.exponential(60.0, r)), 280).astype(np.int64)
    price = price_at(it, item, week_of(view_t, start, it.week_discount.shape[1]))
    c_ok = cart_t < it.available_until[item]
    b_ok = buy_t < it.available_until[item]
    return [
        EventBlock.of(cust, VIEW, item, np.ones(r, dtype=np.int64), price, view_t),
        EventBlock.of(cust[c_ok], CART, item[c_ok], qty[c_ok], price[c_ok], cart_t[c_ok]),
        EventBlock.of(cust[b_ok], PURCHASE, item[b_ok], qty[b_ok], price[b_ok], buy_t[b_ok]),
    ]


# --------------------------------------------------------------------------------------------- email


@dataclass(frozen=True)
class Campaigns:
    send_at: IntArray
    factor: F32Array
    opens: EventBlock
    click_cust: IntArray
    click_t: IntArray


def campaign_times(start: int, end: int, p: SimParams) -> IntArray:
    # 1970-01-01 was a Thursday (weekday 3).
    first_day = start // DAY + (p.email_weekday - (start // DAY + 3) % 7) % 7
    first = first_day * DAY + p.email_hour * 3600
    if first < start:
        first += WEEK
    return np.arange(first, end - DAY, WEEK, dtype=np.int64)


def email_campaigns(rng: np.random.Generator, cu: Customers, start: int, end: int, p: SimParams) -> Campaigns:
    sends = campaign_times(start, end, p)
    factor = rng.uniform(0.8, 1.2, len(sends)).astype(np.float32)
    cust_parts: list[IntArray] = []
    time_parts: list[IntArray] = []
    ids = np.arange(len(cu.created_at), dtype=np.int64)
    for w, send in enumerate(sends.tolist()):  # one pass per weekly campaign
        eligible = cu.consent[:, 0] & (cu.created_at < send) & (cu.churn_at > send)
        opened = eligible & (rng.random(len(ids)) < np.minimum(cu.email_engagement * factor[w], 0.98))
        who = ids[opened]
        delay = np.minimum(rng.lognormal(np.log(p.email_open_delay_median_s), 1.2, len(who)), 5 * DAY)
        open_t = send + np.floor(delay).astype(np.int64)
        ok = (open_t < end) & (open_t < cu.churn_at[who])
        cust_parts.append(who[ok])
        time_parts.append(open_t[ok])
    o_cust = np.concatenate(cust_parts) if cust_parts else np.empty(0, np.int64)
    o_t = np.concatenate(time_parts) if time_parts else np.empty(0, np.int64)
    n = len(o_cust)
    opens = EventBlock.of(o_cust, EMAIL_OPEN, np.full(n, -1, np.int64), np.ones(n, np.int64), np.zeros(n), o_t)
    clicked = rng.random(n) < cu.email_click_rate[o_cust]
    c_t = o_t[clicked] + 5 + np.minimum(np.floor(rng.exponential(40.0, int(clicked.sum()))), 600).astype(np.int64)
    c_cust = o_cust[clicked]
    # The click's visit must fit before the end and start before churn, like organic sessions.
    ok = (c_t < end - 2 * SESSION_ROOM) & (c_t < cu.churn_at[c_cust])
    return Campaigns(sends, factor, opens, c_cust[ok], c_t[ok])


def concat_blocks(blocks: list[EventBlock]) -> EventBlock:
    def cat(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(b, name) for b in blocks])

    return EventBlock(cat("cust"), cat("etype"), cat("item"), cat("qty"), cat("price"), cat("ts"))
