"""The human-readable truth.json of a synthetic shop (its offers section included) and the arrays of its truth.npz."""

from __future__ import annotations

import datetime
from dataclasses import asdict
from typing import Any

import numpy as np
import numpy.typing as npt

from training.generator_categories import CategorySpec
from training.generator_offers import (
    ENGAGEMENT_MEAN_SD,
    OFFER_CHANNELS,
    OFFER_TYPES,
    TERM_DOC,
    TERMS,
    OfferExposures,
    OfferParams,
)
from training.generator_population import (
    CONSENT_RATES,
    CONSENTS,
    COUNTRIES,
    COUNTRY_WEIGHTS,
    SESSION_ROOM,
    STYLE_DIM,
    Customers,
    Items,
    SimParams,
)
from training.generator_sim import MAX_VIEWS, N_CANDIDATES, Campaigns
from training.generator_truth import CLICK_MODEL_DOC, ClickModel, ShopTruth


def _iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truth_doc(
    spec_doc: dict[str, Any],
    cats: tuple[CategorySpec, ...],
    p: SimParams,
    cm: ClickModel,
    start: int,
    end: int,
    camp: Campaigns,
    realized: dict[str, Any],
    repurchase_continue: float,
) -> dict[str, Any]:
    return {
        "spec": spec_doc,
        "ids": "customer_id = 'c' + row index in truth.npz customer arrays; item_id = 'i' + item row index",
        "window": {"start": _iso(start), "end": _iso(end), "start_unix": start, "end_unix": end},
        "categories": [
            {
                "index": k,
                "name": c.name,
                "is_consumable": c.is_consumable,
                "mean_repurchase_days": c.repurchase_days,
                "share": c.share,
                "ref_price": c.median_price,
                "price_lognormal_sigma": c.price_sigma,
            }
            for k, c in enumerate(cats)
        ],
        "click_model": {"parameters": asdict(cm), "formulas": CLICK_MODEL_DOC},
        "customers": {
            "taste": f"Dirichlet({p.taste_concentration} * category share / total share)",
            "style": f"Normal(0, {p.style_scale}) in {STYLE_DIM} dims",
            "price_sensitivity": f"LogNormal(0, {p.price_sensitivity_sigma})",
            "activity_rate": f"sessions per 30 active days ~ LogNormal(log {p.activity_median}, "
            f"{p.activity_sigma}); sessions ~ Poisson(rate * active days / 30), uniform over the active span "
            "with an hour-of-day profile",
            "created_at": f"{p.existing_customer_share:.0%} before the window (up to "
            f"{p.existing_customer_max_age_days:.0f} days), the rest uniform inside it; they sign up in "
            "their first session",
            "churn": f"churn_at = max(created_at, window start) + Exponential(mean {p.churn_mean_days} days * "
            "clip((activity_rate / median)^0.3, 0.3, 3)); no sessions, opens or repurchases after it",
            "countries": dict(zip(COUNTRIES, _country_shares(), strict=True)),
            "consent_rates": dict(zip(CONSENTS, [float(x) for x in CONSENT_RATES], strict=True)),
        },
        "items": {
            "popularity": f"Zipf(exponent {p.zipf_exponent}) over a random rank inside the category",
            "price": "LogNormal(log ref_price, sigma) per category, ending in .99 (.x9 below 5)",
            "margin": f"Uniform{p.margin_range}; cost = round(price * (1 - margin), 2)",
            "stock": f"{p.sold_out_share:.0%} sold out (stock 0; carts/purchases stop at available_until), "
            f"others 1 + LogNormal(log {p.stock_median}, {p.stock_sigma})",
            "inactive": f"{p.inactive_share:.0%} delisted (active=false) at available_until",
            "promotions": f"{p.promo_share:.0%} of item-weeks discounted 10-30%; event price = promo price",
        },
        "sessions": {
            "category": "drawn from the customer's taste",
            "views": f"1 + Poisson({p.views_poisson}), at most {MAX_VIEWS}, distinct items chosen by the "
            f"click_model view_choice among {N_CANDIDATES} popularity-drawn candidates",
            "funnel": "each view is carted with p_cart; at checkout each cart line is bought with p_buy; a "
            "purchase is always of an item viewed and carted earlier in the same session",
            "timing": f"views 3 s + Exp({p.view_gap_mean_s} s) apart, cart 5-90 s after its view, checkout "
            f"30-240 s after the last event; a session starts >= {SESSION_ROOM} s before end/churn",
            "quantity": "1 + Poisson(0.6) for consumables under 5, 1 + Poisson(0.25) other consumables, "
            "1 + Poisson(0.03) durables",
        },
        "repurchase": {
            "rule": "the first purchase of a consumable item by a customer starts a replenishment cycle: "
            "after each purchase, with probability continue, the customer buys the same item again after "
            "Gamma(shape, mean = mean_repurchase_days * repurchase_multiplier[c]) days",
            "continue": repurchase_continue,
            "gamma_shape": p.repurchase_gamma_shape,
            "visit": "view_item, add_to_cart 10-120 s later, purchase 20-300 s after that, same quantity as "
            "the first purchase, promo price of the week",
        },
        "email": {
            "campaigns": [_iso(int(t)) for t in camp.send_at],
            "campaign_factor": [round(float(x), 4) for x in camp.factor],
            "open": "consent_email and created before the send and not churned: P(open) = "
            "min(email_engagement[c] * campaign_factor, 0.98); open after LogNormal(median 3 h, 1.2), <= 5 d",
            "open_base_rate_mean": p.engagement_beta[0] / sum(p.engagement_beta),
            "click": "P(click | open) = email_click_rate[c]; 5-605 s after the open; the clicked item is the "
            "first view of a session in a category drawn from taste, which starts 2-9 s after the click",
            "click_rate_mean": 0.02 + p.click_rate_scale * p.click_rate_beta[0] / sum(p.click_rate_beta),
        },
        "simulation_parameters": asdict(p),
        "realized": realized,
        "npz_arrays": {f: _npz_doc(f) for f in ShopTruth.__dataclass_fields__ if _npz_doc(f)},
    }


def offers_doc(op: OfferParams, ex: OfferExposures) -> dict[str, Any]:
    """The offers section: how exposures are drawn, the true response model, and what was realised."""
    by_type = []
    for k, name in enumerate(OFFER_TYPES):
        sel = ex.offer_type == k
        by_type.append(
            {
                "offer_type": name,
                "model": f"response_{name}",
                "bias": op.bias[name],
                "weights": {term: op.weights[name].get(term, 0.0) for term in TERMS},
                "exposures": int(sel.sum()),
                "responses": int(ex.responded[sel].sum()),
                "mean_true_p": round(float(ex.true_p[sel].mean()), 6) if sel.any() else None,
            }
        )
    return {
        "table": "offer_exposures: exposure_id, customer_id, offer_type, channel, responded, true_p, timestamp",
        "exposures": f"email: Poisson({op.email_per_week}/week) over each consent_email customer's span "
        "[max(created_at, window start), end), uniform times, churned customers included; web: "
        f"{op.web_share:.0%} of organic sessions, 1 s after the session starts",
        "assignment": f"offer_type uniform over {list(OFFER_TYPES)}, independent of the customer (an unbiased log)",
        "channels": list(OFFER_CHANNELS),
        "true_p": "P(respond) = sigmoid(bias[type] + sum over terms of weight[type][term] * term), the terms of "
        "customer c at the exposure time t; the channel has no effect",
        "terms": TERM_DOC,
        "term_parameters": {
            "engagement_mean": ENGAGEMENT_MEAN_SD[0],
            "engagement_sd": ENGAGEMENT_MEAN_SD[1],
            "lapse_days": op.lapse_days,
            "lapse_scale": op.lapse_scale,
            "cart_open_days": op.cart_open_days,
            "fresh_days": op.fresh_days,
        },
        "responded": "Bernoulli(true_p) per exposure; responses add no events",
        "types": by_type,
        "realized": {"exposures": len(ex.ts), "responses": int(ex.responded.sum())},
    }


def _country_shares() -> list[float]:
    return [float(x) for x in COUNTRY_WEIGHTS / COUNTRY_WEIGHTS.sum()]


def _npz_doc(name: str) -> str:
    return {
        "category_is_consumable": "(K,) bool",
        "category_repurchase_days": "(K,) mean days between repeat purchases, NaN for durables",
        "category_ref_price": "(K,) reference (median) price used in price_term",
        "taste": "(n_customers, K) category preferences, rows sum to 1",
        "style": f"(n_customers, {STYLE_DIM}) latent style",
        "price_sensitivity": "(n_customers,)",
        "activity_rate": "(n_customers,) expected sessions per 30 active days",
        "repurchase_multiplier": "(n_customers,) multiplies the category repurchase interval",
        "email_engagement": "(n_customers,) P(open) of a campaign email before campaign_factor",
        "email_click_rate": "(n_customers,) P(click | open)",
        "created_at": "(n_customers,) unix seconds",
        "churn_at": "(n_customers,) unix seconds (may be after the window end)",
        "item_category": "(n_items,) category index",
        "item_popularity": "(n_items,) Zipf share inside the category",
        "item_pop_term": "(n_items,) log(n_items_in_category * item_popularity)",
        "item_factors": f"(n_items, {STYLE_DIM}) latent style factors",
        "item_price": "(n_items,) catalog price",
        "item_cost": "(n_items,)",
        "item_margin": "(n_items,) (price - cost) / price",
        "item_available_until": "(n_items,) unix seconds; end of window unless sold out or delisted",
        "item_week_discount": "(n_items, n_weeks) promo discount per week since the window start",
        "campaign_send_at": "(n_campaigns,) unix seconds",
        "campaign_factor": "(n_campaigns,)",
    }.get(name, "")


def truth_arrays(
    cu: Customers, it: Items, cats: tuple[CategorySpec, ...], start: int, camp: Campaigns
) -> dict[str, npt.NDArray[Any]]:
    return {
        "category_is_consumable": np.array([c.is_consumable for c in cats]),
        "category_repurchase_days": np.array([c.repurchase_days or np.nan for c in cats]),
        "category_ref_price": np.array([c.median_price for c in cats]),
        "taste": cu.taste,
        "style": cu.style,
        "price_sensitivity": cu.price_sensitivity,
        "activity_rate": cu.activity_rate,
        "repurchase_multiplier": cu.repurchase_multiplier,
        "email_engagement": cu.email_engagement,
        "email_click_rate": cu.email_click_rate,
        "created_at": cu.created_at,
        "churn_at": cu.churn_at,
        "item_category": it.category,
        "item_popularity": it.popularity,
        "item_pop_term": it.pop_term,
        "item_factors": it.factors,
        "item_price": it.price,
        "item_cost": it.cost,
        "item_margin": it.margin,
        "item_available_until": it.available_until,
        "item_week_discount": it.week_discount,
        "campaign_send_at": camp.send_at,
        "campaign_factor": camp.factor,
    }
