"""Offline evaluation on a time split: ALS and the served pipeline against simple baselines.

Two questions, two truth sets (both: purchases in the last `test_days`, for customers active before):
- discovery — items the customer had not bought before; ALS vs popularity, bought items excluded.
- next basket — every item bought; the served `home` list vs the customer's own most-frequent items
  ("buy it again" alone) and popularity. This is what a repeat-purchase shop cares about.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from engine.catalog import CatalogState
from engine.pipeline import Request, recommend
from engine.recmodel import RecModel
from engine.rules import Rules
from engine.state import build_state
from engine.types import SECONDS_PER_DAY
from training.als import AlsFit
from training.datafiles import ShopData
from training.metrics import mean_metrics
from training.profiles import build_profiles

KS = (5, 10, 20)


@dataclass(frozen=True)
class EvalParams:
    test_days: int = 14
    max_users: int = 3000
    served_users: int = 1500
    seed: int = 42


def split_time(shop: ShopData, test_days: int) -> int:
    return int(shop.events["timestamp"].max()) + 1 - test_days * SECONDS_PER_DAY


def _truth(test: pd.DataFrame) -> dict[str, set[str]]:
    p = test[test["type"] == "purchase"]
    return {str(c): set(g.tolist()) for c, g in p.groupby("customer_id")["item_id"]}


def _top_k_als(fit: AlsFit, users: list[str], exclude: dict[str, set[str]], k: int) -> list[list[str]]:
    rows = np.searchsorted(fit.user_ids, users)
    item_pos = {str(i): n for n, i in enumerate(fit.item_ids)}
    out = []
    for start in range(0, len(users), 512):
        batch = users[start : start + 512]
        scores = fit.user_factors[rows[start : start + 512]] @ fit.item_factors.T
        for r, u in enumerate(batch):
            bad = [item_pos[i] for i in exclude.get(u, ()) if i in item_pos]
            scores[r, bad] = -np.inf
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        out.extend([[str(fit.item_ids[j]) for j in row] for row in top])
    return out


def _popular(pop_ranked: list[str], exclude: set[str], k: int) -> list[str]:
    return [i for i in pop_ranked if i not in exclude][:k]


def evaluate(
    shop: ShopData,
    fit: AlsFit,
    model: RecModel,
    rules: Rules,
    split: int,
    params: EvalParams,
) -> dict[str, object]:
    """`fit`/`model` must have been trained on events before `split` only."""
    train = shop.events[shop.events["timestamp"] < split]
    test = shop.events[shop.events["timestamp"] >= split]
    truth = _truth(test)
    known = set(fit.user_ids.tolist())
    users = sorted(u for u in truth if u in known)
    rng = np.random.default_rng(params.seed)
    if len(users) > params.max_users:
        users = sorted(rng.choice(users, params.max_users, replace=False).tolist())
    bought_before = {
        str(c): set(g.tolist()) for c, g in train[train["type"] == "purchase"].groupby("customer_id")["item_id"]
    }
    k = max(KS)
    pop_window = train[train["timestamp"] >= split - 30 * SECONDS_PER_DAY]
    pop_ranked = pop_window[pop_window["type"] == "purchase"]["item_id"].value_counts().index.tolist()

    discovery_truth = [truth[u] - bought_before.get(u, set()) for u in users]
    keep = [i for i, t in enumerate(discovery_truth) if t]
    d_users = [users[i] for i in keep]
    d_truth = [discovery_truth[i] for i in keep]
    als_lists = _top_k_als(fit, d_users, bought_before, k)
    pop_lists = [_popular(pop_ranked, bought_before.get(u, set()), k) for u in d_users]
    discovery = {
        "users": len(d_users),
        "als": mean_metrics(als_lists, d_truth, KS),
        "popularity": mean_metrics(pop_lists, d_truth, KS),
    }

    # Next basket: the served pipeline sees each customer's profile as it stood at the split.
    served_users = users[: params.served_users]
    profiles = {
        p.customer_id: p
        for p in build_profiles(replace(shop, events=train), as_of=split)
        if p.customer_id in set(served_users)
    }
    items = [
        replace(it, stock=max(it.stock, 1), active=True) for it in model.catalog_snapshot
    ]  # history, not today's stock
    state = build_state(CatalogState.from_items(items, "eval"), model, rules)
    served, repeat, pop = [], [], []
    limit = min(k, rules.placement("home").max_limit)
    for u in served_users:
        prof = profiles.get(u)
        if prof is not None:
            prof = replace(prof, consents=prof.consents | {"personalization"})
        d = recommend(state, Request(u, "home", limit), prof, now=float(split), explore=False)
        served.append([it.item_id for it in d.items])
        counts = sorted(prof.purchases if prof else (), key=lambda p: (-p.count, -p.last_day))
        repeat.append([p.item_id for p in counts][:k])
        pop.append(pop_ranked[:k])
    s_truth = [truth[u] for u in served_users]
    ks = tuple(x for x in KS if x <= limit)
    basket = {
        "users": len(served_users),
        "served_home": mean_metrics(served, s_truth, ks),
        "own_most_frequent": mean_metrics(repeat, s_truth, ks),
        "popularity": mean_metrics(pop, s_truth, ks),
    }
    return {"split": split, "test_days": params.test_days, "discovery": discovery, "next_basket": basket}
