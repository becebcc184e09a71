"""One decision for a web placement: candidates → filters → score blend → diversity → backfill.

Everything is a function of plain values (profile, context, serving state), so a test or an offline
evaluation runs the exact pipeline the API serves.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engine import candidates as cs
from engine import policies
from engine.catalog import BoolArray, IntArray
from engine.ids import decision_rng, new_decision_id
from engine.rerank import blend, diversify
from engine.rules import Exploration, Greedy, Placement, ThompsonLift
from engine.state import ServingState
from engine.types import SECONDS_PER_DAY, Context, Decision, Profile, ShadowDecision, ShownItem

PERSONAL_SOURCES = frozenset({"als", "buy_again", "recent_neighbours"})
FALLBACK_SOURCES = {"neighbours": 1.0, "bestsellers": 0.5}
# Reason names as shown to callers.
REASON = {
    "als": "als",
    "buy_again": "buy_again",
    "neighbours": "similar_to_context",
    "recent_neighbours": "similar_to_recent",
    "bestseller": "bestseller",
    "category_bestseller": "category_bestseller",
}
REASON_BITS = tuple(REASON)
# Every combination of source bits mapped to its reason names once, so a request only looks them up.
REASONS_BY_MASK = tuple(
    tuple(dict.fromkeys(REASON[src] for k, src in enumerate(REASON_BITS) if mask >> k & 1))
    for mask in range(1 << len(REASON_BITS))
)
GREEDY = Greedy()


@dataclass(frozen=True, slots=True)
class Request:
    customer_id: str
    placement: str
    limit: int
    context: Context = field(default_factory=Context)


def _excluded(state: ServingState, placement: Placement, profile: Profile | None, context: Context) -> BoolArray:
    """Items that must not be shown: unavailable, in the context, or bought and not repurchasable."""
    cat = state.catalog
    banned = ~state.available
    if placement.filters.exclude_context and (context.item_id or context.cart):
        banned[cat.indices(context.item_ids)] = True
    if placement.filters.exclude_purchased and not placement.filters.allow_repurchase and profile is not None:
        bought = cat.indices([p.item_id for p in profile.purchases])
        if len(bought):
            banned[bought[~state.repurchase_category[cat.category[bought]]]] = True
    return banned


def _gather(
    state: ServingState,
    sources: dict[str, float],
    placement: Placement,
    req: Request,
    profile: Profile | None,
    now_day: int,
) -> list[tuple[cs.Candidates, float]]:
    n = placement.candidates_per_source
    out: list[tuple[cs.Candidates, float]] = []
    for source, weight in sources.items():
        if source == "als":
            c = cs.als(state, cs.user_vector(state, req.customer_id, profile), n)
        elif source == "buy_again":
            c = cs.buy_again(state, profile, now_day, placement.filters.allow_repurchase, n)
        elif source == "neighbours":
            c = cs.context_neighbours(state, req.context, n)
        elif source == "recent_neighbours":
            c = cs.recent_neighbours(state, profile, n)
        else:
            c = cs.bestsellers(state, cs.focus_categories(state, profile, req.context), n)
        out.append((c, weight))
    return out


def recommend(
    state: ServingState,
    req: Request,
    profile: Profile | None,
    *,
    fallback_reason: str | None = None,
    now: float | None = None,
    decision_id: str | None = None,
    explore: bool = True,
    arms: Mapping[str, policies.Arms] | None = None,
) -> Decision:
    """Decide the items for one placement. Never returns fewer items than are available to show.

    `fallback_reason` is set by the caller when the profile could not be read (store down, timeout);
    an unknown customer or one without personalisation consent falls back here, with its reason.
    With `explore`, the placement's exploration policy picks the shown items from the head of the
    ranking (seeded by the decision id, so the decision replays) and each item carries its propensity;
    `arms` holds the bandit state per placement, aligned with the catalog.
    """
    placement = state.rules.placement(req.placement)
    now_s = time.time() if now is None else now
    decision_id = decision_id or new_decision_id(int(now_s * 1000))
    spec: Exploration = placement.exploration if explore else GREEDY
    reason = fallback_reason
    if reason is None and state.model is None:
        reason = "model_unavailable"
    if reason is None and profile is None:
        reason = "unknown_customer"
    if reason is None and profile is not None and not profile.has_consent("personalization"):
        reason = "no_personalization_consent"
        profile = None  # respect the choice: nothing personal feeds this decision
    sources: dict[str, float] = (
        {str(k): v for k, v in placement.sources.items()} if reason is None else dict(FALLBACK_SOURCES)
    )

    gathered = _gather(state, sources, placement, req, profile, int(now_s // SECONDS_PER_DAY))
    n = len(state.catalog)
    affinity = np.zeros(n, dtype=np.float32)
    found = np.zeros(n, dtype=np.bool_)
    source_bits = np.zeros(n, dtype=np.uint16)
    for c, weight in gathered:
        if len(c.idx) == 0:
            continue
        np.add.at(affinity, c.idx, weight * c.score)
        found[c.idx] = True
        source_bits[c.idx] |= np.uint16(1 << REASON_BITS.index(c.source))

    banned = _excluded(state, placement, profile, req.context)
    final, margin_term = blend(state, req.placement, affinity, placement.rerank)
    candidates = found & ~banned
    cap = placement.rerank.max_per_category
    pool_size = max(spec.pool, req.limit)
    pool, overflow = diversify(final, candidates, state.catalog.category, cap, pool_size, req.limit)
    # The policy picks the shown items from the diversified head (any subset keeps the category cap).
    pool_scores = final[pool].astype(np.float64)
    pool_arms = _pool_arms(arms, req.placement, pool)
    rng = decision_rng(decision_id)
    selection = policies.choose(spec, pool_scores, req.limit, rng, pool_arms)
    chosen = pool[selection.order]
    propensity = selection.propensities
    lift = _lift_spec(spec, placement.shadow if explore else None)
    expected = policies.expected_rates(lift, pool_scores)[selection.order].round(6).tolist() if lift else []
    shadow = None
    if explore and placement.shadow is not None:
        # The shadow draws from the same generator only after the live choice is made: it never shifts
        # what is shown, and the whole decision still replays from its id.
        shadow = _shadow(placement.shadow, state, pool, pool_scores, selection.order, req.limit, rng, pool_arms)
    filled: IntArray = np.empty(0, dtype=np.int64)
    if len(chosen) < req.limit:
        # Never short: first relax diversity, then take bestsellers, then anything in stock.
        extra = overflow[: req.limit - len(chosen)]
        chosen = np.concatenate([chosen, extra])
    if len(chosen) < req.limit:
        taken = np.zeros(n, dtype=np.bool_)
        taken[chosen] = True
        pool = np.concatenate([state.bestsellers, np.argsort(-state.catalog.popularity, kind="stable")])
        pool = pool[~banned[pool] & ~taken[pool]]
        _, first = np.unique(pool, return_index=True)
        filled = pool[np.sort(first)][: req.limit - len(chosen)]
        chosen = np.concatenate([chosen, filled])

    reasons = _reasons(chosen, source_bits, margin_term, final, filled)
    ids = state.catalog.item_ids
    scores = final[chosen].astype(np.float64).round(4).tolist()  # float32 would print 0.9078999757…
    # Backfilled items are deterministic once the pool is used up: probability 1.
    props = propensity.tolist() + [1.0] * (len(chosen) - len(propensity))
    items = tuple(
        ShownItem(item_id=ids[i], position=pos + 1, score=scores[pos], reasons=reasons[pos], propensity=props[pos])
        for pos, i in enumerate(chosen.tolist())
    )
    return Decision(
        decision_id=decision_id,
        placement=req.placement,
        customer_id=req.customer_id,
        model_version=state.model_version,
        items=items,
        fallback=reason is not None,
        fallback_reason=reason,
        policy=spec.policy,
        policy_params=_params(spec),
        shadow=shadow,
        expected_clicks=tuple(expected + [0.0] * (len(items) - len(expected))) if lift else (),
    )


def _lift_spec(live: Exploration, shadow: Exploration | None) -> ThompsonLift | None:
    """The thompson_lift policy whose arms this decision feeds (the live one first), if any."""
    for spec in (live, shadow):
        if isinstance(spec, ThompsonLift):
            return spec
    return None


@functools.lru_cache(maxsize=256)
def _params(spec: Exploration) -> tuple[tuple[str, float], ...]:
    """A policy's parameters for the log (specs are frozen, so computed once per spec)."""
    return tuple(spec.params().items())


def _pool_arms(arms: Mapping[str, policies.Arms] | None, placement: str, pool: IntArray) -> policies.Arms | None:
    table = arms.get(placement) if arms else None
    if table is None:
        return None
    expected = table.expected[pool] if table.expected is not None else None
    return policies.Arms(table.trials[pool], table.successes[pool], expected)


def _shadow(
    spec: Exploration,
    state: ServingState,
    pool: IntArray,
    scores: policies.FloatArray,
    shown: IntArray,
    limit: int,
    rng: np.random.Generator,
    arms: policies.Arms | None,
) -> ShadowDecision:
    """The shadow policy's own picks, and its probabilities for what the live policy showed."""
    own = policies.choose(spec, scores, limit, rng, arms)
    targets = policies.evaluate(spec, scores, shown, rng, arms)
    ids = state.catalog.item_ids
    return ShadowDecision(
        policy=spec.policy,
        params=_params(spec),
        items=tuple((ids[i], p) for i, p in zip(pool[own.order].tolist(), own.propensities.tolist(), strict=True)),
        target_propensities=tuple(targets.tolist()),
    )


def _reasons(
    chosen: IntArray,
    source_bits: np.ndarray,  # type: ignore[type-arg]
    margin_term: np.ndarray,  # type: ignore[type-arg]
    final: np.ndarray,  # type: ignore[type-arg]
    filled: IntArray,
) -> list[tuple[str, ...]]:
    bits = source_bits[chosen].tolist()
    m, f = margin_term[chosen], final[chosen]
    boosted = ((f > 0) & (m >= 0.1 * f) & (m > 0.05)).tolist()
    was_filled = np.isin(chosen, filled).tolist() if len(filled) else [False] * len(bits)
    out = []
    for b, boost, fill in zip(bits, boosted, was_filled, strict=True):
        r = REASONS_BY_MASK[b] + (("fill",) if fill else ()) + (("margin_boost",) if boost else ())
        out.append(r or ("fill",))
    return out
