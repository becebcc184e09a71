"""Non-ALS parts of a model version: bestsellers, repurchase intervals, the catalog snapshot."""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.catalog import CatalogItem
from engine.types import SECONDS_PER_DAY

MAX_BESTSELLERS = 500
MAX_PER_CATEGORY = 200


def popularity(events: pd.DataFrame, now: int, window_days: int) -> pd.Series:
    """Units sold per item over the recent window; views break ties for items nobody bought yet."""
    recent = events[(events["timestamp"] >= now - window_days * SECONDS_PER_DAY) & (events["item_id"] != "")]
    sold = recent[recent["type"] == "purchase"].groupby("item_id")["quantity"].sum().astype(float)
    viewed = recent[recent["type"] == "view_item"].groupby("item_id").size().astype(float)
    return sold.add(viewed * 0.01, fill_value=0.0)


def bestsellers(
    events: pd.DataFrame, catalog: pd.DataFrame, now: int, window_days: int
) -> tuple[list[str], dict[str, list[str]]]:
    pop = popularity(events, now, window_days)
    ranked = catalog.assign(pop=catalog["item_id"].map(pop).fillna(0.0))
    ranked = ranked.sort_values(["pop", "item_id"], ascending=[False, True], kind="stable")
    ranked = ranked[ranked["pop"] > 0]
    glob = ranked["item_id"].head(MAX_BESTSELLERS).tolist()
    by_cat = {str(c): g["item_id"].head(MAX_PER_CATEGORY).tolist() for c, g in ranked.groupby("category", sort=True)}
    return glob, by_cat


def repurchase_days(events: pd.DataFrame, catalog: pd.DataFrame) -> dict[str, float]:
    """Median gap in days between two purchases of the same item by the same customer, per category."""
    p = events[events["type"] == "purchase"][["customer_id", "item_id", "timestamp"]]
    if p.empty:
        return {}
    p = p.sort_values(["customer_id", "item_id", "timestamp"], kind="stable")
    same = (p["customer_id"].to_numpy()[1:] == p["customer_id"].to_numpy()[:-1]) & (
        p["item_id"].to_numpy()[1:] == p["item_id"].to_numpy()[:-1]
    )
    gaps = np.diff(p["timestamp"].to_numpy()) / SECONDS_PER_DAY
    items = p["item_id"].to_numpy()[1:][same]
    gap = gaps[same]
    keep = gap >= 1.0  # same-day duplicates are one basket, not a repurchase
    if not keep.any():
        return {}
    cats = pd.Series(items[keep]).map(catalog.set_index("item_id")["category"])
    med = pd.Series(gap[keep]).groupby(cats.to_numpy()).median()
    counts = pd.Series(gap[keep]).groupby(cats.to_numpy()).size()
    return {str(c): round(float(d), 2) for c, d in med.items() if counts[c] >= 5}


def catalog_snapshot(catalog: pd.DataFrame, pop: pd.Series) -> list[CatalogItem]:
    out = []
    popularity_of = pop.to_dict()
    for row in catalog.itertuples(index=False):
        out.append(
            CatalogItem(
                item_id=str(row.item_id),
                title=str(row.title),
                category=str(row.category),
                price=float(row.price),  # type: ignore[arg-type]
                cost=float(row.cost),  # type: ignore[arg-type]
                stock=int(row.stock),  # type: ignore[call-overload]
                url=str(row.url),
                image_url=str(row.image_url),
                active=bool(row.active),
                popularity=round(float(popularity_of.get(row.item_id, 0.0)), 3),
            )
        )
    return out
