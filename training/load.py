"""What `nextbest load` writes besides profiles: the catalog with recent popularity."""

from __future__ import annotations

from engine.catalog import CatalogItem
from training.artifacts import catalog_snapshot, popularity
from training.datafiles import ShopData

POPULARITY_WINDOW_DAYS = 30


def catalog_items(shop: ShopData) -> list[CatalogItem]:
    ev = shop.events
    now = int(ev["timestamp"].max()) + 1 if len(ev) else 0
    return catalog_snapshot(shop.catalog, popularity(ev, now, POPULARITY_WINDOW_DAYS))
