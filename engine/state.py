"""What one decision needs in memory: the catalog, the model aligned to it, and the rules.

A refresh of any of the three builds a new ServingState and swaps one reference, so a request
always sees a consistent triple.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.catalog import BoolArray, CatalogState, FloatArray, IntArray
from engine.recmodel import RecModel
from engine.rules import Rules


@dataclass(frozen=True, eq=False)
class ServingState:
    catalog: CatalogState
    model: RecModel | None
    rules: Rules
    # Derived arrays, all indexed by catalog position (see build_state).
    in_model: BoolArray
    any_in_model: bool  # in_model.any(), asked by every ALS candidate call
    item_factors: FloatArray  # zeros for items the model has not seen
    neighbours_idx: npt.NDArray[np.int64]  # catalog positions, -1 where unknown
    neighbours_sim: FloatArray
    bestsellers: IntArray  # catalog positions, best first
    bestsellers_by_category: Mapping[int, IntArray]
    repurchase_category: BoolArray  # per category code
    repurchase_days: FloatArray  # per category code
    available: BoolArray  # active and in stock
    value_terms: Mapping[str, tuple[FloatArray, FloatArray]]  # placement -> (margin + stock terms, margin term)

    @property
    def model_version(self) -> str | None:
        return self.model.version if self.model else None


def build_state(catalog: CatalogState, model: RecModel | None, rules: Rules) -> ServingState:
    n = len(catalog)
    ncat = len(catalog.categories)
    repurchase = np.array([c in rules.categories.repurchase for c in catalog.categories], dtype=np.bool_)
    days = np.full(ncat, rules.categories.default_repurchase_days, dtype=np.float32)
    if model is not None:
        for c, d in model.repurchase_days.items():
            if c in catalog.category_index and d > 0:
                days[catalog.category_index[c]] = d
        m2c = np.array([catalog.index.get(str(i), -1) for i in model.item_ids], dtype=np.int64)
        known = m2c >= 0
        in_model = np.zeros(n, dtype=np.bool_)
        in_model[m2c[known]] = True
        factors = np.zeros((n, model.item_factors.shape[1]), dtype=np.float32)
        factors[m2c[known]] = model.item_factors[known]
        nb = model.neighbours_idx
        nb_cat = np.where(nb >= 0, m2c[np.clip(nb, 0, None)], -1)
        nb_idx = np.full((n, nb.shape[1]), -1, dtype=np.int64)
        nb_sim = np.zeros((n, nb.shape[1]), dtype=np.float32)
        nb_idx[m2c[known]] = nb_cat[known]
        nb_sim[m2c[known]] = np.where(nb_cat[known] >= 0, model.neighbours_sim[known], 0.0)
        best = catalog.indices(model.bestsellers)
        by_cat = {
            catalog.category_index[c]: catalog.indices(ids)
            for c, ids in model.bestsellers_by_category.items()
            if c in catalog.category_index
        }
    else:
        in_model = np.zeros(n, dtype=np.bool_)
        factors = np.zeros((n, 1), dtype=np.float32)
        nb_idx = np.full((n, 1), -1, dtype=np.int64)
        nb_sim = np.zeros((n, 1), dtype=np.float32)
        best = np.empty(0, dtype=np.int64)
        by_cat = {}
    if len(best) == 0:
        # No model (or it knows no current item): rank by the popularity the catalog carries.
        best = np.argsort(-catalog.popularity, kind="stable").astype(np.int64)
    if not by_cat:
        by_cat = {c: best[catalog.category[best] == c] for c in range(ncat)}
    margin = catalog.margin
    value_terms = {}
    for name, placement in rules.placements.items():
        rr = placement.rerank
        stock_level = np.minimum(catalog.stock.astype(np.float32) / rr.stock_reference, 1.0)
        margin_term = (rr.margin * margin).astype(np.float32)
        value_terms[name] = ((margin_term + rr.stock * stock_level).astype(np.float32), margin_term)
    return ServingState(
        catalog=catalog,
        model=model,
        rules=rules,
        in_model=in_model,
        any_in_model=bool(in_model.any()),
        item_factors=factors,
        neighbours_idx=nb_idx,
        neighbours_sim=nb_sim,
        bestsellers=best,
        bestsellers_by_category=by_cat,
        repurchase_category=repurchase,
        repurchase_days=days,
        available=catalog.available,
        value_terms=value_terms,
    )
