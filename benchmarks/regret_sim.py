"""The regret simulation: exploration policies choosing from the ranker's pool, scored against the known truth.

A round is one decision: a customer arrives, the pool (the ranker's top items, with their scores) is
fixed for that customer, a policy picks k items with `engine.policies.choose` exactly as the pipeline
calls it, and clicks are drawn from the true click probabilities. The bandit state is what production
keeps per placement and item — impressions of every shown item, a success on an item's first click in
a decision — and a policy only sees it as of the last refresh, every `refresh_every` decisions (the
workers re-read it every `arms_refresh_s`). Regret is measured in expected clicks (from the truth, not
from the sampled clicks) against the oracle that shows the pool's k truly best items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import stats

from engine.policies import Arms, choose, expected_rates
from engine.rules import Exploration, Greedy, Thompson, ThompsonLift

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Tick = Callable[[], None]


@dataclass(frozen=True)
class Pools:
    """Per customer (one row each): the ranker's pool, its scores and the truth about each pool item."""

    items: IntArray  # (customers, P): item index of each pool item, in the ranker's order
    scores: FloatArray  # (customers, P): the ranker's scores, descending along each row
    click: FloatArray  # (customers, P): true P(click | shown)
    revenue: FloatArray  # (customers, P): true expected revenue if shown, P(purchase | shown) × price
    n_items: int  # the catalog's size (item indices are below it): the bandit state has one arm per item

    def __post_init__(self) -> None:
        shape = self.items.shape
        if len(shape) != 2 or shape[1] == 0:
            raise ValueError(f"pools must be a (customers, pool size ≥ 1) array, got shape {shape}")
        for name in ("scores", "click", "revenue"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"pools.{name} has shape {getattr(self, name).shape}, items has {shape}")
        if shape[0] and (self.items.min() < 0 or self.items.max() >= self.n_items):
            raise ValueError(f"pool item indices must lie in [0, {self.n_items})")
        if np.any(np.diff(self.scores, axis=1) > 0):
            raise ValueError("pool scores must be sorted descending along each row (the ranker's order)")
        if np.any((self.click < 0) | (self.click > 1)):
            raise ValueError("true click probabilities must lie in [0, 1]")

    @property
    def size(self) -> int:
        return int(self.items.shape[1])

    def oracle_order(self, k: int) -> IntArray:
        """Per customer, the k pool positions with the highest true click probability (ties: ranker's order)."""
        return np.argsort(-self.click, axis=1, kind="stable")[:, :k].astype(np.int64)

    def oracle_clicks(self, k: int) -> FloatArray:
        """Per customer, the expected clicks of the oracle's k items."""
        return np.asarray(np.take_along_axis(self.click, self.oracle_order(k), axis=1).sum(axis=1), np.float64)


@dataclass(frozen=True)
class Contender:
    """A policy in the simulation: an exploration spec as the rules file writes it, or the oracle (None)."""

    name: str
    spec: Exploration | None = None

    @property
    def learns(self) -> bool:
        """Whether the policy reads the bandit state (production passes arms only to Thompson placements)."""
        return isinstance(self.spec, Thompson | ThompsonLift)


@dataclass(frozen=True)
class Trace:
    """One contender's run over one arrival sequence, per round."""

    expected_clicks: FloatArray  # Σ over the shown items of the true click probability
    expected_revenue: FloatArray  # Σ over the shown items of the true expected revenue
    clicks: IntArray  # clicks drawn from the truth (what the bandit state learned from)
    regret: FloatArray  # oracle's expected clicks − expected_clicks (≥ 0 up to rounding)


def simulate(
    pools: Pools,
    contenders: Sequence[Contender],
    arrivals: IntArray,
    k: int,
    refresh_every: int,
    seed: int,
    tick: Tick | None = None,
) -> dict[str, Trace]:
    """Run every contender over the same arrivals (rows of `pools`); `tick()` after each contender.

    Each contender has its own bandit state and random stream; the click draws share one stream of
    uniforms (common random numbers), so sampled differences between policies are not draw noise.
    """
    if not 1 <= k <= pools.size:
        raise ValueError(f"k must be between 1 and the pool size {pools.size}, got {k}")
    if refresh_every < 1:
        raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
    arrivals = np.asarray(arrivals, dtype=np.int64)
    if len(arrivals) and (arrivals.min() < 0 or arrivals.max() >= len(pools.items)):
        raise ValueError(f"arrivals must be rows of the pools (0 … {len(pools.items) - 1})")
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be distinct, got {names}")
    seq = np.random.SeedSequence(seed)
    click_seed, *policy_seeds = seq.spawn(len(contenders) + 1)
    uniforms = np.random.default_rng(click_seed).random((len(arrivals), k))
    best = pools.oracle_clicks(k)[arrivals]
    out: dict[str, Trace] = {}
    for contender, policy_seed in zip(contenders, policy_seeds, strict=True):
        if contender.spec is None:
            shown = pools.oracle_order(k)[arrivals]
        else:
            shown = _run_policy(
                pools, contender, arrivals, k, refresh_every, uniforms, np.random.default_rng(policy_seed)
            )
        rows = arrivals[:, None]
        expected = pools.click[rows, shown].sum(axis=1)
        clicked = (uniforms < pools.click[rows, shown]).sum(axis=1).astype(np.int64)
        out[contender.name] = Trace(
            expected_clicks=expected,
            expected_revenue=pools.revenue[rows, shown].sum(axis=1),
            clicks=clicked,
            regret=best - expected,
        )
        if tick is not None:
            tick()
    return out


def _run_policy(
    pools: Pools,
    contender: Contender,
    arrivals: IntArray,
    k: int,
    refresh_every: int,
    uniforms: FloatArray,
    rng: np.random.Generator,
) -> IntArray:
    """The pool positions the policy shows in each round, learning from its own clicks if it learns."""
    spec = contender.spec
    assert spec is not None
    shown = np.empty((len(arrivals), k), dtype=np.int64)
    trials = np.zeros(pools.n_items, dtype=np.float64)
    successes = np.zeros(pools.n_items, dtype=np.float64)
    expected = np.zeros(pools.n_items, dtype=np.float64)  # clicks the ranker expected (thompson_lift)
    seen_trials, seen_successes, seen_expected = trials.copy(), successes.copy(), expected.copy()
    items, scores, click = pools.items, pools.scores, pools.click
    learns = contender.learns
    lift = spec if isinstance(spec, ThompsonLift) else None
    for t, row in enumerate(arrivals.tolist()):
        pool = items[row]
        arms = None
        if learns:
            if t % refresh_every == 0:
                seen_trials, seen_successes, seen_expected = trials.copy(), successes.copy(), expected.copy()
            arms = Arms(seen_trials[pool], seen_successes[pool], seen_expected[pool])
        order = choose(spec, scores[row], k, rng, arms).order
        shown[t] = order
        if learns:
            picked = pool[order]  # distinct items, so plain fancy-index increments are exact
            trials[picked] += 1.0
            successes[picked] += uniforms[t] < click[row, order]
            if lift is not None:
                expected[picked] += expected_rates(lift, scores[row])[order]
    return shown


@dataclass(frozen=True)
class Summary:
    """One contender over all seeds: means with 95 % confidence intervals (t over seeds)."""

    name: str
    expected_ctr: float  # expected clicks per impression
    sampled_ctr: float  # drawn clicks per impression
    clicks_per_1k: float  # expected clicks per 1,000 decisions
    revenue_per_1k: float  # expected revenue per 1,000 decisions
    final_regret: float  # cumulative regret after the last round, mean over seeds
    final_regret_ci: float  # half-width of its 95 % CI
    late_regret_per_1k: float  # regret per 1,000 decisions over the last quarter of the rounds
    vs_reference_per_1k: float  # expected clicks per 1,000 decisions minus the reference's (paired by seed)
    vs_reference_ci: float


def ci_half_width(values: FloatArray) -> float:
    """Half-width of the 95 % t interval of the mean (0 with one value: no spread to measure)."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n))


def summarize(runs: Sequence[dict[str, Trace]], k: int, reference: str) -> list[Summary]:
    """Per contender (in the runs' order), the figures of the report's table over the seeds in `runs`."""
    if not runs:
        raise ValueError("no runs to summarize")
    out = []
    for name in runs[0]:
        traces = [run[name] for run in runs]
        rounds = len(traces[0].regret)
        late = slice(rounds - max(rounds // 4, 1), rounds)
        clicks = np.array([t.expected_clicks.mean() for t in traces])
        final = np.array([t.regret.sum() for t in traces])
        diff = clicks - np.array([run[reference].expected_clicks.mean() for run in runs])
        out.append(
            Summary(
                name=name,
                expected_ctr=float(clicks.mean() / k),
                sampled_ctr=float(np.mean([t.clicks.mean() for t in traces]) / k),
                clicks_per_1k=float(clicks.mean() * 1000),
                revenue_per_1k=float(np.mean([t.expected_revenue.mean() for t in traces]) * 1000),
                final_regret=float(final.mean()),
                final_regret_ci=ci_half_width(final),
                late_regret_per_1k=float(np.mean([t.regret[late].mean() for t in traces]) * 1000),
                vs_reference_per_1k=float(diff.mean() * 1000),
                vs_reference_ci=ci_half_width(diff) * 1000,
            )
        )
    return out


def cumulative_bands(runs: Sequence[dict[str, Trace]], name: str) -> tuple[FloatArray, FloatArray]:
    """Mean and standard deviation over seeds of a contender's cumulative regret, per round."""
    curves = np.stack([np.cumsum(run[name].regret) for run in runs])
    sd = curves.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(curves.shape[1])
    return curves.mean(axis=0), sd


def greedy_reference(contenders: Sequence[Contender]) -> str:
    """The name of the no-exploration reference among the contenders (the first greedy one)."""
    for c in contenders:
        if isinstance(c.spec, Greedy):
            return c.name
    raise ValueError("the contenders need a greedy policy as the no-exploration reference")


@dataclass
class ServedRanker:
    """A shop's truth, and the serving state of ALS trained on its events: the pools a placement would offer."""

    shop_dir: Path
    placement: str = "home"

    def __post_init__(self) -> None:
        from engine.catalog import CatalogState
        from engine.rules import load_rules
        from engine.state import build_state
        from training.datafiles import read_shop
        from training.generator_truth import TRUTH_JSON, TRUTH_NPZ, load_truth
        from training.profiles import build_profiles
        from training.train import TrainParams, fit_parts

        for name in (TRUTH_JSON, TRUTH_NPZ):
            if not (self.shop_dir / name).exists():
                raise FileNotFoundError(
                    f"{self.shop_dir / name}: missing; regret needs a shop with its hidden truth, "
                    "as written by `nextbest generate`"
                )
        self.truth = load_truth(self.shop_dir)
        shop = read_shop(self.shop_dir)
        self.now = int(shop.events["timestamp"].max()) + 1
        self.train_params = TrainParams()
        parts = fit_parts(shop.catalog, shop.events, self.now, self.train_params)
        model = parts.rec_model("regret-bench", self.train_params.als.regularization)
        self.state = build_state(CatalogState.from_items(model.catalog_snapshot, "regret"), model, load_rules())
        self.spec = self.state.rules.placement(self.placement)
        self.profiles = {p.customer_id: p for p in build_profiles(shop)}
        self.customer_ids = shop.customers["customer_id"].to_numpy(dtype=str)
        catalog = self.state.catalog
        self.item_of = np.array([int(i[1:]) for i in catalog.item_ids], dtype=np.int64)  # 'i5' -> truth row 5
        self.customer_of = np.array([int(c[1:]) for c in self.customer_ids], dtype=np.int64)
        self.available_items = self.item_of[self.state.available]

    def arrival_weights(self) -> FloatArray:
        """Who arrives: customers still active at the window's end, in proportion to their activity rate."""
        t, c = self.truth, self.customer_of
        end = int(t.params["window"]["end_unix"])
        weight = t.activity_rate[c].astype(np.float64) * (t.churn_at[c] > end) * (t.created_at[c] < end)
        if weight.sum() <= 0:
            raise ValueError(f"{self.shop_dir}: no customer is active at the end of the window")
        return np.asarray(weight / weight.sum(), dtype=np.float64)

    def pool(self, customer: int, size: int) -> tuple[IntArray, FloatArray] | None:
        """Truth item rows and scores of shop customer row `customer`'s pool; None when the ranking is too short.

        `recommend` with greedy and limit=size lists the top `size` items of the diversified ranking, which
        is the pool the placement's policy chooses from; when the ranking is shorter the list ends with
        backfill (items beyond the category cap, or marked `fill`), which a policy never sees.
        """
        from engine.pipeline import Request, recommend

        cid = str(self.customer_ids[customer])
        state = self.state
        decision = recommend(
            state, Request(cid, self.placement, size), self.profiles.get(cid), now=self.now, explore=False
        )
        per_category: dict[int, int] = {}
        for shown in decision.items:
            category = int(state.catalog.category[state.catalog.index[shown.item_id]])
            per_category[category] = per_category.get(category, 0) + 1
            if per_category[category] > self.spec.rerank.max_per_category or "fill" in shown.reasons:
                return None
        if len(decision.items) < size:
            return None
        rows = np.array([state.catalog.index[i.item_id] for i in decision.items], dtype=np.int64)
        return self.item_of[rows], np.array([i.score for i in decision.items], dtype=np.float64)

    def pools(self, customers: IntArray, size: int) -> tuple[Pools, IntArray]:
        """Pools of shop customer rows; returns them and the rows kept (a too-short ranking is left out)."""
        from training.generator_truth import true_click_probability, true_purchase_probability

        items, scores, kept = [], [], []
        for c in customers.tolist():
            got = self.pool(c, size)
            if got is not None:
                items.append(got[0])
                scores.append(got[1])
                kept.append(c)
        rows = np.array(items, dtype=np.int64).reshape(len(kept), size)
        who = self.customer_of[np.array(kept, dtype=np.int64)][:, None]
        click = true_click_probability(self.truth, who, rows)
        revenue = true_purchase_probability(self.truth, who, rows) * self.truth.item_price[rows]
        ranked = np.array(scores, dtype=np.float64).reshape(len(kept), size)
        return Pools(rows, ranked, click, revenue, len(self.truth.item_price)), np.array(kept, dtype=np.int64)

    def catalog_oracle_clicks(self, customers: IntArray, k: int, block: int = 256) -> FloatArray:
        """Expected clicks of the k truly best available items of the whole catalog, per shop customer row."""
        from training.generator_truth import true_click_probability

        out = np.empty(len(customers), dtype=np.float64)
        items = self.available_items
        top = min(k, len(items))
        for start in range(0, len(customers), block):
            c = self.customer_of[customers[start : start + block]]
            p = true_click_probability(self.truth, c[:, None], items[None, :])
            out[start : start + block] = np.partition(p, len(items) - top, axis=1)[:, len(items) - top :].sum(axis=1)
        return out


@dataclass(frozen=True)
class Workload:
    """Arrival sequences (one per seed, as rows of `pools`) and the pools of every customer who arrives."""

    pools: Pools
    customers: IntArray  # shop customer row of each pool row
    arrivals: list[IntArray]


def draw_arrivals(weights: FloatArray, rounds: int, seed: int, seeds: int) -> list[IntArray]:
    """Per simulation seed, the sequence of arriving shop customer rows."""
    return [np.random.default_rng([seed, s]).choice(len(weights), size=rounds, p=weights) for s in range(seeds)]


def served_workload(ranker: ServedRanker, rounds: int, seed: int, seeds: int) -> Workload:
    """Arrivals for every seed and the served pool of each arriving customer (built once per customer).

    A customer whose ranking is shorter than the pool cannot be simulated like the others; such customers
    are taken out of the arrival distribution and the arrivals drawn again.
    """
    size = ranker.spec.exploration.pool
    weights = ranker.arrival_weights()
    row_of: dict[int, int] = {}  # shop customer row -> pool row
    parts: list[Pools] = []
    for _ in range(3):
        arrivals = draw_arrivals(weights, rounds, seed, seeds)
        new = np.array([c for c in np.unique(np.concatenate(arrivals)).tolist() if c not in row_of], dtype=np.int64)
        pools, kept = ranker.pools(new, size)
        row_of.update({c: len(row_of) + r for r, c in enumerate(kept.tolist())})
        parts.append(pools)
        if len(kept) == len(new):
            break
        weights[np.setdiff1d(new, kept)] = 0.0
        weights /= weights.sum()
    else:
        raise RuntimeError(f"customers with rankings shorter than the pool of {size} keep arriving")
    stacked = Pools(
        items=np.concatenate([p.items for p in parts]),
        scores=np.concatenate([p.scores for p in parts]),
        click=np.concatenate([p.click for p in parts]),
        revenue=np.concatenate([p.revenue for p in parts]),
        n_items=len(ranker.truth.item_price),
    )
    customers = np.empty(len(row_of), dtype=np.int64)
    customers[list(row_of.values())] = list(row_of)
    return Workload(stacked, customers, [np.array([row_of[c] for c in a.tolist()], dtype=np.int64) for a in arrivals])
