"""Customers and catalog of the synthetic shop: who the customers are (tastes, activity, consent, churn)
and what the shop sells (categories, popularity, prices, margins, stock, promotions, titles)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.generator_categories import CategorySpec
from training.generator_truth import BoolArray, F32Array, FloatArray, IntArray

DAY = 86_400
WEEK = 7 * DAY
STYLE_DIM = 8
SESSION_ROOM = 3_600  # a session starts at least this long before `end`/churn: all its events fit

COUNTRIES: tuple[str, ...] = ("DE", "FR", "GB", "NL", "ES", "IT", "AT", "BE")
COUNTRY_WEIGHTS = np.array([0.28, 0.16, 0.15, 0.10, 0.09, 0.09, 0.07, 0.06])
CONSENTS: tuple[str, ...] = ("consent_email", "consent_sms", "consent_push", "consent_personalization")
CONSENT_RATES = np.array([0.80, 0.30, 0.40, 0.92])


@dataclass(frozen=True)
class SimParams:
    """Knobs of the simulation that are not per-category; all are echoed into truth.json."""

    existing_customer_share: float = 0.65  # created before the window; the rest sign up inside it
    existing_customer_max_age_days: float = 3 * 365
    taste_concentration: float = 2.5  # Dirichlet total mass: small → each customer likes 2-4 categories
    style_scale: float = 0.55
    item_factor_scale: float = 0.55
    price_sensitivity_sigma: float = 0.45
    activity_median: float = 0.7  # sessions per 30 active days, lognormal
    activity_sigma: float = 1.3
    activity_max: float = 15.0  # keeps the tail at "dozens of sessions", not thousands
    repurchase_multiplier_sigma: float = 0.3
    engagement_beta: tuple[float, float] = (1.3, 4.0)
    click_rate_beta: tuple[float, float] = (2.0, 5.0)
    click_rate_scale: float = 0.3
    churn_mean_days: float = 420.0
    zipf_exponent: float = 1.05
    margin_range: tuple[float, float] = (0.10, 0.50)
    sold_out_share: float = 0.05
    inactive_share: float = 0.02
    stock_median: float = 18.0
    stock_sigma: float = 1.3
    promo_share: float = 0.06  # share of item-weeks on promotion
    views_poisson: float = 2.4  # views per session = 1 + Poisson, capped at MAX_VIEWS
    view_gap_mean_s: float = 40.0
    # Chance that each replenishment is followed by another: a grocer's customers stay loyal to their
    # staples, a general store's customers buy many of them elsewhere.
    repurchase_continue_general: float = 0.7
    repurchase_continue_grocery: float = 0.85
    repurchase_gamma_shape: float = 4.0
    email_weekday: int = 1  # Tuesday
    email_hour: int = 9
    email_open_delay_median_s: float = 3 * 3600.0


# --------------------------------------------------------------------------------------------- customers


@dataclass(frozen=True)
class Customers:
    created_at: IntArray
    country: IntArray
    consent: BoolArray  # (n, len(CONSENTS))
    taste: F32Array
    style: F32Array
    price_sensitivity: F32Array
    activity_rate: F32Array
    repurchase_multiplier: F32Array
    email_engagement: F32Array
    email_click_rate: F32Array
    churn_at: IntArray
    active_from: IntArray  # first possible session start
    active_until: IntArray  # sessions start before this (churn or end minus SESSION_ROOM)


def make_customers(
    rng: np.random.Generator, n: int, cats: tuple[CategorySpec, ...], start: int, end: int, p: SimParams
) -> Customers:
    existing = rng.random(n) < p.existing_customer_share
    before = start - rng.random(n) * p.existing_customer_max_age_days * DAY
    # New sign-ups leave two days of room so that every customer can still have a session.
    during = start + rng.random(n) * max(end - start - 2 * DAY, 1)
    created = np.floor(np.where(existing, before, during)).astype(np.int64)
    country = rng.choice(len(COUNTRIES), size=n, p=COUNTRY_WEIGHTS / COUNTRY_WEIGHTS.sum())
    consent = rng.random((n, len(CONSENTS))) < CONSENT_RATES
    share = np.array([c.share for c in cats])
    taste = rng.dirichlet(p.taste_concentration * share / share.sum(), size=n).astype(np.float32)
    style = rng.normal(0.0, p.style_scale, (n, STYLE_DIM)).astype(np.float32)
    sens = rng.lognormal(0.0, p.price_sensitivity_sigma, n).astype(np.float32)
    activity = np.minimum(rng.lognormal(np.log(p.activity_median), p.activity_sigma, n), p.activity_max)
    activity = activity.astype(np.float32)
    mult = np.clip(rng.lognormal(0.0, p.repurchase_multiplier_sigma, n), 0.4, 2.5).astype(np.float32)
    engagement = rng.beta(*p.engagement_beta, n).astype(np.float32)
    click_rate = (0.02 + p.click_rate_scale * rng.beta(*p.click_rate_beta, n)).astype(np.float32)
    active_from = np.maximum(created, start)
    # Quiet customers churn sooner, which gives churn models a real signal to find.
    churn_scale = p.churn_mean_days * np.clip((activity / p.activity_median) ** 0.3, 0.3, 3.0)
    churn_at = active_from + np.floor(rng.exponential(1.0, n) * churn_scale * DAY).astype(np.int64)
    active_until = np.minimum(churn_at, end - SESSION_ROOM)
    return Customers(
        created, country.astype(np.int64), consent, taste, style, sens, activity, mult, engagement,
        click_rate, churn_at, active_from, active_until,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Items:
    category: IntArray
    popularity: F32Array
    pop_term: F32Array
    price: FloatArray
    cost: FloatArray
    margin: FloatArray
    factors: F32Array
    stock: IntArray
    active: BoolArray
    available_until: IntArray
    week_discount: F32Array  # (n_items, n_weeks)
    titles: list[str]


def _allocate(n: int, share: FloatArray) -> IntArray:
    """Items per category proportional to share, at least one each, summing to n (largest remainders)."""
    k = len(share)
    raw = share / share.sum() * (n - k)
    counts = np.floor(raw).astype(np.int64) + 1
    rest = n - int(counts.sum())
    counts[np.argsort(-(raw - np.floor(raw)), kind="stable")[:rest]] += 1
    return np.asarray(counts, dtype=np.int64)


def _shop_price(x: FloatArray) -> FloatArray:
    # Shops end prices in .99 (or .x9 below 5), which also keeps every price > 0.
    return np.where(x >= 5.0, np.floor(x) + 0.99, np.maximum(np.round(x, 1) - 0.01, 0.49))


def make_items(
    rng: np.random.Generator,
    n: int,
    cats: tuple[CategorySpec, ...],
    start: int,
    end: int,
    n_weeks: int,
    p: SimParams,
) -> Items:
    counts = _allocate(n, np.array([c.share for c in cats]))
    category = rng.permutation(np.repeat(np.arange(len(cats), dtype=np.int64), counts))
    # Zipf popularity by a random rank inside the category.
    order = np.lexsort((rng.random(n), category))
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(first, counts)
    weight = (rank + 1.0) ** -p.zipf_exponent
    popularity = weight / np.bincount(category, weights=weight)[category]
    pop_term = np.log(counts[category] * popularity)
    med = np.array([c.median_price for c in cats])
    sig = np.array([c.price_sigma for c in cats])
    price = np.round(_shop_price(rng.lognormal(np.log(med[category]), sig[category])), 2)
    margin_draw = rng.uniform(*p.margin_range, n)
    cost = np.minimum(np.round(price * (1.0 - margin_draw), 2), np.round(price - 0.01, 2))
    margin = (price - cost) / price
    factors = rng.normal(0.0, p.item_factor_scale, (n, STYLE_DIM)).astype(np.float32)
    sold_out = rng.random(n) < p.sold_out_share
    stock = np.where(sold_out, 0, 1 + np.floor(rng.lognormal(np.log(p.stock_median), p.stock_sigma, n)))
    active = rng.random(n) >= p.inactive_share
    window = end - start
    sold_out_at = start + np.floor(rng.uniform(0.3, 1.0, n) * window).astype(np.int64)
    delisted_at = start + np.floor(rng.uniform(0.2, 1.0, n) * window).astype(np.int64)
    available_until = np.full(n, end, dtype=np.int64)
    available_until = np.where(sold_out, np.minimum(available_until, sold_out_at), available_until)
    available_until = np.where(active, available_until, np.minimum(available_until, delisted_at))
    promo = rng.random((n, n_weeks)) < p.promo_share
    depth = rng.choice(np.array([0.10, 0.15, 0.20, 0.25, 0.30]), size=(n, n_weeks))
    discount = np.where(promo, depth, 0.0).astype(np.float32)
    titles = _titles(rng, category, cats)
    return Items(
        category, popularity.astype(np.float32), pop_term.astype(np.float32), price, cost, margin,
        factors, stock.astype(np.int64), active, available_until, discount, titles,
    )  # fmt: skip


def _titles(rng: np.random.Generator, category: IntArray, cats: tuple[CategorySpec, ...]) -> list[str]:
    n = len(category)
    u = rng.random((n, 3))
    titles: list[str] = []
    # One short loop over the catalog (thousands of rows, string work only).
    for i, k in enumerate(category.tolist()):
        c = cats[k]
        a = c.prefixes[int(u[i, 0] * len(c.prefixes))]
        b = c.nouns[int(u[i, 1] * len(c.nouns))]
        s = c.suffixes[int(u[i, 2] * len(c.suffixes))]
        titles.append(f"{a} {b} {s}")
    return titles
