"""The catalog as the engine sees it: one numpy array per attribute, indexed by catalog position."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """One product as shops export it (the `catalog` data file)."""

    item_id: str
    title: str
    category: str
    price: float
    cost: float
    stock: int
    url: str = ""
    image_url: str = ""
    active: bool = True
    popularity: float = 0.0  # recent sales, used to rank bestsellers when no model is loaded


@dataclass(frozen=True, eq=False)
class CatalogState:
    """Immutable columnar catalog; a refresh builds a new one and swaps the reference."""

    version: str
    item_ids: tuple[str, ...]
    index: Mapping[str, int]
    titles: tuple[str, ...]
    urls: tuple[str, ...]
    image_urls: tuple[str, ...]
    categories: tuple[str, ...]  # category names, indexed by category code
    category_index: Mapping[str, int]
    category: IntArray  # category code per item
    price: FloatArray
    cost: FloatArray
    stock: IntArray
    active: BoolArray
    popularity: FloatArray

    @classmethod
    def from_items(cls, items: Iterable[CatalogItem], version: str) -> CatalogState:
        rows = sorted(items, key=lambda it: it.item_id)
        categories = tuple(sorted({it.category for it in rows}))
        cat_index = {c: i for i, c in enumerate(categories)}
        return cls(
            version=version,
            item_ids=tuple(it.item_id for it in rows),
            index={it.item_id: i for i, it in enumerate(rows)},
            titles=tuple(it.title for it in rows),
            urls=tuple(it.url for it in rows),
            image_urls=tuple(it.image_url for it in rows),
            categories=categories,
            category_index=cat_index,
            category=np.array([cat_index[it.category] for it in rows], dtype=np.int64),
            price=np.array([it.price for it in rows], dtype=np.float32),
            cost=np.array([it.cost for it in rows], dtype=np.float32),
            stock=np.array([it.stock for it in rows], dtype=np.int64),
            active=np.array([it.active for it in rows], dtype=np.bool_),
            popularity=np.array([it.popularity for it in rows], dtype=np.float32),
        )

    def patched(self, items: Iterable[CatalogItem], version: str) -> CatalogState:
        """A new state with some items changed (copy on write); new items mean a full rebuild."""
        changes = list(items)
        if any(it.item_id not in self.index or it.category not in self.category_index for it in changes):
            merged = {i: self.item(n) for n, i in enumerate(self.item_ids)}
            merged.update({it.item_id: it for it in changes})
            return CatalogState.from_items(merged.values(), version)
        price, cost, stock = self.price.copy(), self.cost.copy(), self.stock.copy()
        active, popularity, category = self.active.copy(), self.popularity.copy(), self.category.copy()
        titles, urls, image_urls = list(self.titles), list(self.urls), list(self.image_urls)
        for it in changes:
            n = self.index[it.item_id]
            price[n], cost[n], stock[n], active[n] = it.price, it.cost, it.stock, it.active
            popularity[n], category[n] = it.popularity, self.category_index[it.category]
            titles[n], urls[n], image_urls[n] = it.title, it.url, it.image_url
        return replace(
            self,
            version=version,
            titles=tuple(titles),
            urls=tuple(urls),
            image_urls=tuple(image_urls),
            category=category,
            price=price,
            cost=cost,
            stock=stock,
            active=active,
            popularity=popularity,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def available(self) -> BoolArray:
        """Items that may be shown at all: active and in stock."""
        return self.active & (self.stock > 0)

    @property
    def margin(self) -> FloatArray:
        """Gross margin share in [0, 1]; items sold at a loss count as 0."""
        with np.errstate(divide="ignore", invalid="ignore"):
            m = np.where(self.price > 0, (self.price - self.cost) / self.price, 0.0)
        return np.clip(m, 0.0, 1.0).astype(np.float32)

    def indices(self, item_ids: Sequence[str]) -> IntArray:
        """Catalog positions of the known ids, in order; unknown ids are skipped."""
        idx = [self.index[i] for i in item_ids if i in self.index]
        return np.asarray(idx, dtype=np.int64)

    def item(self, i: int) -> CatalogItem:
        return CatalogItem(
            item_id=self.item_ids[i],
            title=self.titles[i],
            category=self.categories[int(self.category[i])],
            price=float(self.price[i]),
            cost=float(self.cost[i]),
            stock=int(self.stock[i]),
            url=self.urls[i],
            image_url=self.image_urls[i],
            active=bool(self.active[i]),
            popularity=float(self.popularity[i]),
        )
