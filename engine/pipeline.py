"""Decisions for a placement: candidates → filters → score blend → diversity → exploration → backfill.

Everything is a function of plain values (profiles, contexts, serving state), so a test or an offline
evaluation runs the exact pipeline the API serves. The stages up to the diversified pool run over a batch
of requests at once (`recommend_many`: an email batch's recipients); one web request is a batch of one.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from engine import candidates as cs
from engine import policies
from engine.catalog import BoolArray, FloatArray, IntArray
from engine.fastinit import fast_init
from engine.ids import decision_rng, new_decision_ids
from engine.rerank import blend, diversify_rows
from engine.rules import Exploration, Greedy, Placement, Softmax, ThompsonLift
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
_EMPTY_I = np.empty(0, dtype=np.int64)


@fast_init
@dataclass(frozen=True, slots=True)
class Request:
    customer_id: str
    placement: str
    limit: int
    context: Context = field(default_factory=Context)


def _excluded(
    state: ServingState, placement: Placement, reqs: Sequence[Request], profiles: Sequence[Profile | None]
) -> BoolArray:
    """Per row × catalog cell, whether the row must not show the item: unavailable, in the row's context, or
    bought by the row's customer and not repurchasable."""
    cat, n = state.catalog, len(state.catalog)
    index = cat.index
    filters = placement.filters
    context: list[int] = []
    bought_rows: list[int] = []
    bought: list[int] = []
    for r, (req, profile) in enumerate(zip(reqs, profiles, strict=True)):
        if filters.exclude_context and (req.context.item_id or req.context.cart):
            context += [r * n + index[i] for i in req.context.item_ids if i in index]
        if filters.exclude_purchased and not filters.allow_repurchase and profile is not None:
            items = [index[p.item_id] for p in profile.purchases if p.item_id in index]
            bought += items
            bought_rows += [r] * len(items)
    banned = np.empty(len(reqs) * n, dtype=np.bool_)
    np.logical_not(state.available, out=banned.reshape(len(reqs), n))  # every row starts with the unavailable
    if context:
        banned[np.asarray(context, dtype=np.int64)] = True
    if bought:
        items_a = np.asarray(bought, dtype=np.int64)
        durable = ~state.repurchase_category[cat.category[items_a]]
        banned[(np.asarray(bought_rows, dtype=np.int64) * n + items_a)[durable]] = True
    return banned


def _gather(
    state: ServingState,
    placement: Placement,
    reqs: Sequence[Request],
    profiles: Sequence[Profile | None],
    groups: Sequence[tuple[dict[str, float], list[int]]],
    now_day: int,
) -> list[tuple[cs.Candidates, float]]:
    """Every source's candidates for the rows that use it, source by source in each group's order."""
    n = placement.candidates_per_source
    contexts = [r.context for r in reqs]
    out: list[tuple[cs.Candidates, float]] = []
    for sources, rows in groups:
        for source, weight in sources.items():
            if source == "als":
                customers = [reqs[r].customer_id for r in rows]
                which, vectors = cs.user_vectors(state, customers, [profiles[r] for r in rows])
                if len(which):
                    out.append((cs.als(state, np.asarray(rows, dtype=np.int64)[which], vectors, n), weight))
            elif source == "buy_again":
                allow = placement.filters.allow_repurchase
                out.append((cs.buy_again(state, profiles, rows, now_day, allow, n), weight))
            elif source == "neighbours":
                out.append((cs.context_neighbours(state, contexts, rows, n), weight))
            elif source == "recent_neighbours":
                out.append((cs.recent_neighbours(state, profiles, rows, n), weight))
            else:
                out += [(c, weight) for c in cs.bestsellers(state, profiles, contexts, rows, n)]
    return out


@fast_init
@dataclass(frozen=True, slots=True)
class _Ranked:
    """One row's diversified ranking: the pool the policy picks from and the items the cap left out."""

    pool: IntArray
    pool_scores: FloatArray  # final scores of the pool, float32
    pool_bits: npt.NDArray[np.uint16]
    overflow: IntArray
    overflow_scores: FloatArray
    overflow_bits: npt.NDArray[np.uint16]


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
    (decision,) = recommend_many(
        state,
        [req],
        [profile],
        fallback_reasons=[fallback_reason],
        now=now,
        decision_ids=[decision_id] if decision_id else None,
        explore=explore,
        arms=arms,
    )
    return decision


def recommend_many(
    state: ServingState,
    reqs: Sequence[Request],
    profiles: Sequence[Profile | None],
    *,
    fallback_reasons: Sequence[str | None] | None = None,
    now: float | None = None,
    decision_ids: Sequence[str] | None = None,
    explore: bool = True,
    arms: Mapping[str, policies.Arms] | None = None,
) -> list[Decision]:
    """`recommend` for many requests of one placement at once (an email batch's recipients), one decision each.

    Candidates, filters, the blend and the diversity cap run over the whole batch in flat arrays; the
    exploration policy then picks each row's items from its own pool with its own generator. A row decides
    what it would decide alone, except that the batch's ALS product may round a score's last bit
    differently (see `engine.candidates`).
    """
    if not reqs:
        return []
    names = {r.placement for r in reqs}
    if len(names) != 1:
        raise ValueError(f"recommend_many decides for one placement at a time, got {sorted(names)}")
    placement_name = reqs[0].placement
    placement = state.rules.placement(placement_name)
    now_s = time.time() if now is None else now
    now_ms = int(now_s * 1000)
    ids = list(decision_ids) if decision_ids is not None else new_decision_ids(len(reqs), now_ms)
    spec: Exploration = placement.exploration if explore else GREEDY
    profiles = list(profiles)
    reasons: list[str | None] = list(fallback_reasons) if fallback_reasons is not None else [None] * len(reqs)
    for r, profile in enumerate(profiles):
        if reasons[r] is None and state.model is None:
            reasons[r] = "model_unavailable"
        if reasons[r] is None and profile is None:
            reasons[r] = "unknown_customer"
        if reasons[r] is None and profile is not None and not profile.has_consent("personalization"):
            reasons[r] = "no_personalization_consent"
            profiles[r] = None  # respect the choice: nothing personal feeds this decision
    personal = [r for r in range(len(reqs)) if reasons[r] is None]
    fallback = [r for r in range(len(reqs)) if reasons[r] is not None]
    groups = [
        (sources, rows)
        for sources, rows in (
            ({str(k): v for k, v in placement.sources.items()}, personal),
            (dict(FALLBACK_SOURCES), fallback),
        )
        if rows
    ]
    ranked = _rank(state, placement_name, placement, reqs, profiles, groups, int(now_s // SECONDS_PER_DAY), spec)
    selections: list[policies.Selection | None] = [None] * len(reqs)
    if isinstance(spec, Softmax) and len(reqs) > 1 and not (explore and placement.shadow is not None):
        # One pass for the whole batch; each row still draws its noise from its own generator. (A shadow
        # policy draws from that generator after the live choice, so with one each row chooses alone.)
        gumbels = [decision_rng(ids[r]).gumbel(size=len(ranked[r].pool)) for r in range(len(reqs))]
        pools = [ranked[r].pool_scores for r in range(len(reqs))]
        selections = list(policies.softmax_many(spec, pools, [r.limit for r in reqs], gumbels))
    picks = [
        _pick(state, placement, reqs[r], profiles[r], ids[r], spec, ranked[r], explore, arms, selections[r])
        for r in range(len(reqs))
    ]
    return _decisions(state, placement_name, reqs, reasons, ids, spec, picks)


def _rank(
    state: ServingState,
    name: str,
    placement: Placement,
    reqs: Sequence[Request],
    profiles: Sequence[Profile | None],
    groups: Sequence[tuple[dict[str, float], list[int]]],
    now_day: int,
    spec: Exploration,
) -> list[_Ranked]:
    """Each row's pool and overflow: gathered candidates, their affinity, filters, the blend, the cap."""
    n_rows, m = len(reqs), len(state.catalog)
    # Row × catalog arrays: each (row, item)'s affinity adds its sources' weighted scores in source order.
    affinity = np.zeros(n_rows * m, dtype=np.float32)
    source_bits = np.zeros(n_rows * m, dtype=np.uint16)
    gathered: list[IntArray] = []
    for c, weight in _gather(state, placement, reqs, profiles, groups, now_day):
        if len(c) == 0:
            continue
        cells = c.idx if n_rows == 1 else c.row * m + c.idx
        np.add.at(affinity, cells, weight * c.score)
        source_bits[cells] |= np.uint16(1 << REASON_BITS.index(c.source))
        gathered.append(cells)
    peak = affinity.reshape(n_rows, m).max(axis=1) if m else np.zeros(n_rows, dtype=np.float32)
    # The cells some source gathered, ascending (row by row, items in catalog order), less the excluded: a few
    # hundred per row, found from the sources' own cells rather than by scanning every row × catalog cell.
    cells = np.sort(cs.distinct(np.concatenate(gathered), n_rows * m)) if gathered else _EMPTY_I
    cells = cells[~_excluded(state, placement, reqs, profiles)[cells]]
    rows, items = cs.split_cells(cells, n_rows, m)
    final = blend(state, name, rows, items, affinity[cells], peak, placement.rerank)
    source_bits = source_bits[cells]
    limits = np.asarray([r.limit for r in reqs], dtype=np.int64)
    cap, need = placement.rerank.max_per_category, np.maximum(spec.pool, limits)
    pool_at, over_at = diversify_rows(rows, final, state.catalog.category[items], cap, need, limits, n_rows)
    pool_bounds = cs.row_starts(rows[pool_at], n_rows).tolist()
    over_bounds = cs.row_starts(rows[over_at], n_rows).tolist()
    # Gathered once for every row; each row's arrays are slices (views) of these, read only from here on.
    pool_items, pool_final, pool_bits = items[pool_at], final[pool_at], source_bits[pool_at]
    over_items, over_final, over_bits = items[over_at], final[over_at], source_bits[over_at]
    out = []
    for r in range(n_rows):
        a, b, c, d = pool_bounds[r], pool_bounds[r + 1], over_bounds[r], over_bounds[r + 1]
        out.append(
            _Ranked(pool_items[a:b], pool_final[a:b], pool_bits[a:b], over_items[c:d], over_final[c:d], over_bits[c:d])
        )
    return out


@fast_init
@dataclass(frozen=True, slots=True)
class _Picked:
    """One row's shown items, before they become a Decision: the policy's picks, then any backfill."""

    chosen: IntArray  # catalog positions, slot by slot
    scores: npt.NDArray[np.float32]
    bits: npt.NDArray[np.uint16]
    propensities: npt.NDArray[np.float64]  # of the policy's picks (backfilled items have probability 1)
    filled: int  # how many of the last items are bestseller backfill
    expected: list[float]  # expected clicks of the picks (thompson_lift), else empty
    lift: bool
    shadow: ShadowDecision | None


def _pick(
    state: ServingState,
    placement: Placement,
    req: Request,
    profile: Profile | None,
    decision_id: str,
    spec: Exploration,
    ranked: _Ranked,
    explore: bool,
    arms: Mapping[str, policies.Arms] | None,
    selection: policies.Selection | None = None,
) -> _Picked:
    """One row's items from its ranking: the policy's picks with their propensities (unless the batch
    chose for every row at once: `selection`), then backfill."""
    pool = ranked.pool
    # The policy picks the shown items from the diversified head (any subset keeps the category cap).
    pool_scores = ranked.pool_scores.astype(np.float64)
    pool_arms = _pool_arms(arms, req.placement, pool)
    rng: np.random.Generator | None = None
    if selection is None:
        rng = decision_rng(decision_id)
        selection = policies.choose(spec, pool_scores, req.limit, rng, pool_arms)
    chosen = pool[selection.order]
    chosen_scores = ranked.pool_scores[selection.order]
    chosen_bits = ranked.pool_bits[selection.order]
    lift = _lift_spec(spec, placement.shadow if explore else None)
    expected = policies.expected_rates(lift, pool_scores)[selection.order].round(6).tolist() if lift else []
    shadow = None
    if explore and placement.shadow is not None and rng is not None:
        # The shadow draws from the same generator only after the live choice is made: it never shifts
        # what is shown, and the whole decision still replays from its id.
        shadow = _shadow(placement.shadow, state, pool, pool_scores, selection.order, req.limit, rng, pool_arms)
    filled: IntArray = _EMPTY_I
    if len(chosen) < req.limit:
        # Never short: first relax diversity, then take bestsellers, then anything in stock.
        k = req.limit - len(chosen)
        chosen = np.concatenate([chosen, ranked.overflow[:k]])
        chosen_scores = np.concatenate([chosen_scores, ranked.overflow_scores[:k]])
        chosen_bits = np.concatenate([chosen_bits, ranked.overflow_bits[:k]])
    if len(chosen) < req.limit:
        banned = _excluded(state, placement, [req], [profile])
        taken = np.zeros(len(state.catalog), dtype=np.bool_)
        taken[chosen] = True
        fill = np.concatenate([state.bestsellers, np.argsort(-state.catalog.popularity, kind="stable")])
        fill = fill[~banned[fill] & ~taken[fill]]
        _, first = np.unique(fill, return_index=True)
        filled = fill[np.sort(first)][: req.limit - len(chosen)]
        # Everything the row gathered is shown by now, so a filled item's affinity is 0: its score is its value.
        value, _ = state.value_terms[req.placement]
        chosen = np.concatenate([chosen, filled])
        chosen_scores = np.concatenate([chosen_scores, value[filled]])
        chosen_bits = np.concatenate([chosen_bits, np.zeros(len(filled), dtype=np.uint16)])
    return _Picked(
        chosen, chosen_scores, chosen_bits, selection.propensities, len(filled), expected, lift is not None, shadow
    )


def _decisions(
    state: ServingState,
    placement: str,
    reqs: Sequence[Request],
    fallback_reasons: Sequence[str | None],
    ids: Sequence[str],
    spec: Exploration,
    picks: Sequence[_Picked],
) -> list[Decision]:
    """The rows' decisions: reasons, rounded scores and propensities computed over all rows' items at once."""
    chosen = np.concatenate([p.chosen for p in picks])
    scores32 = np.concatenate([p.scores for p in picks])
    # Backfilled items are deterministic once the pool is used up: probability 1.
    propensities = [*itertools.chain.from_iterable(p.propensities.tolist() for p in picks)]
    was_filled = [
        *itertools.chain.from_iterable([False] * (len(p.chosen) - p.filled) + [True] * p.filled for p in picks)
    ]
    reasons = _reasons(state, placement, chosen, np.concatenate([p.bits for p in picks]), scores32, was_filled)
    scores = scores32.astype(np.float64).round(4).tolist()  # float32 would print 0.9078999757…
    item_ids = state.catalog.item_ids
    shown = [item_ids[i] for i in chosen.tolist()]
    out = []
    at = taken = 0
    for r, pick in enumerate(picks):
        n, k = len(pick.chosen), len(pick.propensities)
        props = propensities[taken : taken + k] + [1.0] * (n - k)
        # ShownItem(item_id, position, score, reasons, propensity), positionally: half the cost of keywords.
        items = tuple(
            map(ShownItem, shown[at : at + n], range(1, n + 1), scores[at : at + n], reasons[at : at + n], props)
        )
        at, taken = at + n, taken + k
        reason = fallback_reasons[r]
        out.append(
            # Positionally, in field order (a third cheaper than keywords: one per recipient of a batch).
            Decision(
                ids[r],
                placement,
                reqs[r].customer_id,
                state.model_version,
                items,
                reason is not None,
                reason,
                spec.policy,
                _params(spec),
                pick.shadow,
                tuple(pick.expected + [0.0] * (n - len(pick.expected))) if pick.lift else (),
            )
        )
    return out


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
    state: ServingState,
    placement: str,
    chosen: IntArray,
    bits: npt.NDArray[np.uint16],
    final: FloatArray,
    was_filled: list[bool],
) -> list[tuple[str, ...]]:
    _, margin_term = state.value_terms[placement]
    m = margin_term[chosen]
    boosted = ((final > 0) & (m >= 0.1 * final) & (m > 0.05)).tolist()
    out = []
    for b, boost, fill in zip(bits.tolist(), boosted, was_filled, strict=True):
        r = REASONS_BY_MASK[b] + (("fill",) if fill else ()) + (("margin_boost",) if boost else ())
        out.append(r or ("fill",))
    return out
