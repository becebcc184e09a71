"""Offer exposures of the synthetic shop: who was shown which offer type, when and on which channel, the
true probability that they respond (a documented function of hidden traits and of their state at that
moment) and the sampled response. Types and exposures are assigned uniformly at random, so the log is
unbiased. Responses are recorded in the exposures table only; they add no events."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.generator_population import DAY, WEEK, Customers, SimParams
from training.generator_sim import CART, PURCHASE, EventBlock
from training.generator_truth import BoolArray, FloatArray, IntArray, sigmoid

OFFER_TYPES: tuple[str, ...] = ("discount", "free_shipping", "loyalty", "early_access", "winback")
OFFER_CHANNELS: tuple[str, ...] = ("email", "web")
TERMS: tuple[str, ...] = ("price", "activity", "engagement", "orders", "lapsed", "cart_open", "fresh", "churned")

# Standardisation of the hidden traits (their population laws are in SimParams): ~N(0, 1) terms.
ENGAGEMENT_MEAN_SD = (0.2453, 0.1714)  # Beta(1.3, 4.0)

TERM_DOC: dict[str, str] = {
    "price": "log(price_sensitivity[c]) / price_sensitivity_sigma  (~N(0, 1); high = hunts for deals)",
    "activity": "clip((log(activity_rate[c]) - log(activity_median)) / activity_sigma, -3, 3)",
    "engagement": f"(email_engagement[c] - {ENGAGEMENT_MEAN_SD[0]}) / {ENGAGEMENT_MEAN_SD[1]}",
    "orders": "log(1 + orders before t); an order = a distinct (customer, timestamp) of purchase events",
    "lapsed": "sigmoid((days since the last order before t - lapse_days) / lapse_scale); 0 if never bought",
    "cart_open": "1 if an add_to_cart within cart_open_days before t and no order after it (abandoned cart)",
    "fresh": "exp(-days since the customer's last event of any type before t / fresh_days); 0 if none",
    "churned": "1 if t >= churn_at[c] (the customer has left; mail still reaches them)",
}


@dataclass(frozen=True)
class OfferParams:
    """Exposure volume and the true response model; all echoed into truth.json."""

    email_per_week: float = 0.5  # offer emails per consenting, signed-up customer per week (Poisson)
    web_share: float = 0.3  # share of organic sessions that show an offer on their first page
    lapse_days: float = 60.0
    lapse_scale: float = 10.0
    cart_open_days: float = 7.0
    fresh_days: float = 14.0
    # P(respond) = sigmoid(bias[type] + Σ weight[type][term] · term); terms in TERM_DOC.
    bias: dict[str, float] = field(
        default_factory=lambda: {
            "discount": -3.0,
            "free_shipping": -3.4,
            "loyalty": -3.6,
            "early_access": -3.2,
            "winback": -3.9,
        }
    )
    weights: dict[str, dict[str, float]] = field(
        default_factory=lambda: {
            "discount": {"price": 0.9, "activity": 0.2, "churned": -2.5},
            "free_shipping": {"cart_open": 1.8, "price": 0.35, "fresh": 0.6, "churned": -2.5},
            "loyalty": {"orders": 0.9, "engagement": 0.4, "lapsed": -0.8, "churned": -2.5},
            "early_access": {"engagement": 0.7, "activity": 0.4, "price": -0.5, "churned": -2.5},
            "winback": {"lapsed": 1.9, "price": 0.3, "orders": 0.4, "churned": -2.5},
        }
    )


@dataclass(frozen=True)
class OfferExposures:
    """Columns of the exposures table, sorted by time then customer."""

    cust: IntArray
    ts: IntArray
    offer_type: IntArray  # index into OFFER_TYPES
    channel: IntArray  # index into OFFER_CHANNELS
    true_p: FloatArray
    responded: BoolArray


def _keys(cust: IntArray, ts: IntArray, origin: int) -> IntArray:
    """One sortable int64 per (customer, time): customer in the high bits, seconds since `origin` below."""
    return np.asarray((cust << 32) + (ts - origin), dtype=np.int64)


@dataclass(frozen=True)
class _History:
    """Sorted (customer, time) keys of one kind of event, asked "what happened before t" in bulk."""

    keys: IntArray
    origin: int

    @classmethod
    def of(cls, cust: IntArray, ts: IntArray, origin: int) -> _History:
        return cls(np.sort(_keys(cust, ts, origin)), origin)

    def before(self, cust: IntArray, t: IntArray) -> tuple[IntArray, IntArray]:
        """(count, time of the latest) of the customer's entries strictly before t; latest = -1 without any."""
        idx = np.searchsorted(self.keys, _keys(cust, t, self.origin), side="left")
        first = np.searchsorted(self.keys, cust << 32, side="left")
        count = idx - first
        latest = np.where(count > 0, (self.keys[np.maximum(idx - 1, 0)] & 0xFFFFFFFF) + self.origin, -1)
        return count.astype(np.int64), latest.astype(np.int64)


def offer_terms(
    cu: Customers, p: SimParams, op: OfferParams, ev: EventBlock, cust: IntArray, t: IntArray
) -> dict[str, FloatArray]:
    """The TERM_DOC terms of customers `cust` at times `t`, from their traits and the events before t."""
    origin = int(min(cu.created_at.min(), ev.ts.min() if len(ev.ts) else 0, t.min() if len(t) else 0)) - DAY
    buy = ev.etype == PURCHASE
    # An order is a distinct (customer, timestamp): the lines of one checkout share it. np.unique sorts.
    orders = _History(np.unique(_keys(ev.cust[buy], ev.ts[buy], origin)), origin)
    carts = _History.of(ev.cust[ev.etype == CART], ev.ts[ev.etype == CART], origin)
    anything = _History.of(ev.cust, ev.ts, origin)
    n_orders, last_order = orders.before(cust, t)
    _, last_cart = carts.before(cust, t)
    _, last_event = anything.before(cust, t)
    since_order = (t - last_order) / DAY
    since_event = (t - last_event) / DAY
    eng_mean, eng_sd = ENGAGEMENT_MEAN_SD
    activity = (np.log(cu.activity_rate[cust].astype(np.float64)) - np.log(p.activity_median)) / p.activity_sigma
    return {
        "price": np.log(cu.price_sensitivity[cust].astype(np.float64)) / p.price_sensitivity_sigma,
        "activity": np.clip(activity, -3.0, 3.0),
        "engagement": (cu.email_engagement[cust].astype(np.float64) - eng_mean) / eng_sd,
        "orders": np.log1p(n_orders.astype(np.float64)),
        "lapsed": np.where(last_order >= 0, sigmoid((since_order - op.lapse_days) / op.lapse_scale), 0.0),
        "cart_open": ((last_cart >= 0) & (last_cart > last_order) & (t - last_cart < op.cart_open_days * DAY)).astype(
            np.float64
        ),
        "fresh": np.where(last_event >= 0, np.exp(-since_event / op.fresh_days), 0.0),
        "churned": (t >= cu.churn_at[cust]).astype(np.float64),
    }


def true_response_probability(
    op: OfferParams, offer_type: IntArray, terms: dict[str, FloatArray], types: tuple[str, ...] = OFFER_TYPES
) -> FloatArray:
    """sigmoid(bias[type] + Σ weight[type][term] · term) per exposure."""
    bias = np.array([op.bias[name] for name in types])
    w = np.array([[op.weights[name].get(term, 0.0) for term in TERMS] for name in types])
    stacked = np.stack([terms[term] for term in TERMS], axis=1)
    return sigmoid(bias[offer_type] + np.einsum("nk,nk->n", w[offer_type], stacked))


def exposure_times(
    rng: np.random.Generator,
    cu: Customers,
    session_cust: IntArray,
    session_t0: IntArray,
    start: int,
    end: int,
    op: OfferParams,
) -> tuple[IntArray, IntArray, IntArray]:
    """(customer, time, channel) of every exposure: Poisson offer emails over each consenting customer's
    signed-up span of the window, and a random share of organic sessions shown an offer 1 s after they start."""
    lo = np.maximum(cu.created_at, start)
    span = np.where(cu.consent[:, 0], np.maximum(end - lo, 0), 0)
    n_mail = rng.poisson(op.email_per_week * span / WEEK)
    m_cust = np.repeat(np.arange(len(span), dtype=np.int64), n_mail)
    m_t = lo[m_cust] + np.floor(rng.random(len(m_cust)) * span[m_cust]).astype(np.int64)
    shown = rng.random(len(session_cust)) < op.web_share
    w_cust, w_t = session_cust[shown], session_t0[shown] + 1
    keep = w_t < end
    cust = np.concatenate((m_cust, w_cust[keep]))
    t = np.concatenate((m_t, w_t[keep]))
    channel = np.concatenate((np.zeros(len(m_cust), np.int64), np.ones(int(keep.sum()), np.int64)))
    return cust, t, channel


def simulate_offers(
    rng: np.random.Generator,
    cu: Customers,
    ev: EventBlock,
    session_cust: IntArray,
    session_t0: IntArray,
    start: int,
    end: int,
    p: SimParams,
    op: OfferParams,
) -> OfferExposures:
    cust, t, channel = exposure_times(rng, cu, session_cust, session_t0, start, end, op)
    offer_type = rng.integers(0, len(OFFER_TYPES), len(cust)).astype(np.int64)  # uniform: an unbiased log
    true_p = true_response_probability(op, offer_type, offer_terms(cu, p, op, ev, cust, t))
    responded = rng.random(len(cust)) < true_p
    order = np.lexsort((cust, t))
    return OfferExposures(cust[order], t[order], offer_type[order], channel[order], true_p[order], responded[order])
