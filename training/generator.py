"""Synthetic shop generator: writes catalog, customers, events and offer exposures (Parquet or CSV) with a
known hidden truth (truth.json + truth.npz, true_p in the exposures) so that recommenders, propensity
models and policies can be scored against it."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from training.generator_categories import CATEGORIES_BY_KIND, CONSUMABLE_CATEGORIES
from training.generator_io import catalog_table, customers_table, events_table, exposures_table, write_table
from training.generator_offers import OFFER_TYPES, OfferParams, simulate_offers
from training.generator_population import DAY, WEEK, SimParams, make_customers, make_items
from training.generator_sim import (
    EMAIL_CLICK,
    EVENT_TYPES,
    AliasSampler,
    EventBlock,
    concat_blocks,
    email_campaigns,
    price_at,
    replenish,
    session_starts,
    simulate_sessions,
    week_of,
)
from training.generator_truth import (
    TRUTH_JSON,
    TRUTH_NPZ,
    ClickModel,
    ShopTruth,
    load_truth,
    true_click_probability,
    true_funnel_probabilities,
    true_purchase_probability,
    write_npz,
)
from training.generator_truth_doc import offers_doc, truth_arrays, truth_doc

__all__ = [
    "CONSUMABLE_CATEGORIES",
    "EVENT_TYPES",
    "OFFER_TYPES",
    "GeneratedShop",
    "ShopSpec",
    "ShopTruth",
    "generate_shop",
    "load_truth",
    "true_click_probability",
    "true_funnel_probabilities",
    "true_purchase_probability",
]

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class ShopSpec:
    customers: int = 100_000
    items: int = 5_000
    days: int = 180
    seed: int = 42
    end: datetime.date = datetime.date(2026, 11, 1)  # events end at 00:00 UTC of this date (exclusive)
    kind: Literal["general", "grocery"] = "general"  # "grocery" = a repeat-purchase shop
    fmt: Literal["parquet", "csv"] = "parquet"

    def validate(self) -> None:
        if self.kind not in CATEGORIES_BY_KIND:
            raise ValueError(f"unknown kind {self.kind!r}")
        n_cat = len(CATEGORIES_BY_KIND[self.kind])
        if self.customers < 1:
            raise ValueError("customers must be >= 1")
        if self.items < n_cat:
            raise ValueError(f"items must be >= {n_cat} (one per category of a {self.kind} shop)")
        if self.days < 7:
            raise ValueError("days must be >= 7")
        if self.fmt not in ("parquet", "csv"):
            raise ValueError(f"unknown fmt {self.fmt!r}")


@dataclass(frozen=True)
class GeneratedShop:
    out: Path
    catalog: Path
    customers: Path
    events: Path
    truth_json: Path
    truth_npz: Path
    n_customers: int
    n_items: int
    n_events: int
    n_view_item: int
    n_add_to_cart: int
    n_purchase: int
    n_email_open: int
    n_email_click: int
    n_replenishment_purchases: int  # purchases made by the consumables' repurchase cycles
    offer_exposures: Path
    n_offer_exposures: int
    n_offer_responses: int

    @property
    def event_counts(self) -> dict[str, int]:
        return {
            "view_item": self.n_view_item,
            "add_to_cart": self.n_add_to_cart,
            "purchase": self.n_purchase,
            "email_open": self.n_email_open,
            "email_click": self.n_email_click,
        }


def _unix(day: datetime.date) -> int:
    return int((day - datetime.date(1970, 1, 1)).days) * DAY


def generate_shop(spec: ShopSpec, out: Path, progress: Progress | None = None) -> GeneratedShop:
    """Generate a shop into `out`; `progress(step, fraction_of_whole_run)` is called at each step."""
    spec.validate()
    report: Progress = progress or (lambda _step, _frac: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cats = CATEGORIES_BY_KIND[spec.kind]
    p, cm = SimParams(), ClickModel()
    end = _unix(spec.end)
    start = end - spec.days * DAY
    n_weeks = (end - start + WEEK - 1) // WEEK
    # Independent streams per stage: changing one stage's draws does not reshuffle the others.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(8)]

    report("customers", 0.0)
    cu = make_customers(streams[0], spec.customers, cats, start, end, p)
    report("catalog", 0.05)
    it = make_items(streams[1], spec.items, cats, start, end, n_weeks, p)
    sampler = AliasSampler.build(it.category, it.popularity, len(cats))

    report("email campaigns", 0.08)
    camp = email_campaigns(streams[2], cu, start, end, p)
    report("sessions", 0.12)
    s_cust, s_t0 = session_starts(streams[3], cu, start)
    e_rng = streams[4]
    e_t0 = camp.click_t + e_rng.integers(2, 10, len(camp.click_t))
    n_org = len(s_cust)
    sess = simulate_sessions(
        e_rng,
        np.concatenate((s_cust, camp.click_cust)),
        np.concatenate((s_t0, e_t0)),
        np.concatenate((s_t0, camp.click_t)),
        cu, it, sampler, cats, start, cm, p,
    )  # fmt: skip
    clicked_item = sess.first_item[n_org:]
    click_price = price_at(it, clicked_item, week_of(camp.click_t, start, n_weeks))
    clicks = EventBlock.of(
        camp.click_cust, EMAIL_CLICK, clicked_item, np.ones(len(clicked_item), np.int64), click_price, camp.click_t
    )
    report("repurchases", 0.40)
    loyalty = p.repurchase_continue_grocery if spec.kind == "grocery" else p.repurchase_continue_general
    refill = replenish(streams[5], sess.purchases, cu, it, cats, start, p, loyalty)

    report("assemble events", 0.45)
    ev = concat_blocks([*sess.events, *refill, camp.opens, clicks])
    order = np.argsort(ev.ts, kind="stable")
    ev = EventBlock(ev.cust[order], ev.etype[order], ev.item[order], ev.qty[order], ev.price[order], ev.ts[order])
    counts = np.bincount(ev.etype, minlength=len(EVENT_TYPES))
    report("offer exposures", 0.50)
    op = OfferParams()
    # Its own stream (the 7th), drawn after everything else: the other tables are the same with or without it.
    offers = simulate_offers(streams[6], cu, ev, s_cust, s_t0, start, end, p, op)

    ext = spec.fmt
    paths = {name: out / f"{name}.{ext}" for name in ("catalog", "customers", "events", "offer_exposures")}
    report("write catalog", 0.55)
    write_table(catalog_table(it, cats), paths["catalog"], spec.fmt)
    report("write customers", 0.58)
    write_table(customers_table(cu, spec.fmt), paths["customers"], spec.fmt)
    report("write events", 0.62)
    write_table(events_table(ev, len(cu.created_at), len(it.category), spec.fmt), paths["events"], spec.fmt)
    report("write offer exposures", 0.90)
    write_table(exposures_table(offers, len(cu.created_at), spec.fmt), paths["offer_exposures"], spec.fmt)

    report("write truth", 0.95)
    n_refill = len(refill[2].ts)
    realized = {
        "events": len(ev.ts),
        **{t: int(c) for t, c in zip(EVENT_TYPES, counts.tolist(), strict=True)},
        "organic_sessions": n_org,
        "email_sessions": len(camp.click_t),
        "replenishment_purchases": n_refill,
        "view_to_cart_rate": round(sess.n_carts / max(sess.n_views, 1), 4),
        "cart_to_purchase_rate": round(len(sess.purchases.ts) / max(sess.n_carts, 1), 4),
        "customers_without_events": int(spec.customers - len(np.unique(ev.cust))),
    }
    doc = truth_doc({**asdict(spec), "end": spec.end.isoformat()}, cats, p, cm, start, end, camp, realized, loyalty)
    doc["offers"] = offers_doc(op, offers)
    (out / TRUTH_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    write_npz(out / TRUTH_NPZ, truth_arrays(cu, it, cats, start, camp))
    report("done", 1.0)
    return GeneratedShop(
        out=out,
        catalog=paths["catalog"],
        customers=paths["customers"],
        events=paths["events"],
        truth_json=out / TRUTH_JSON,
        truth_npz=out / TRUTH_NPZ,
        n_customers=spec.customers,
        n_items=spec.items,
        n_events=len(ev.ts),
        n_view_item=int(counts[0]),
        n_add_to_cart=int(counts[1]),
        n_purchase=int(counts[2]),
        n_email_open=int(counts[3]),
        n_email_click=int(counts[4]),
        n_replenishment_purchases=n_refill,
        offer_exposures=paths["offer_exposures"],
        n_offer_exposures=len(offers.ts),
        n_offer_responses=int(offers.responded.sum()),
    )
