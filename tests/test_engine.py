"""The decision pipeline as a plain function: real trained model, hand-built profiles and catalog states."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import candidates as cs
from engine.catalog import CatalogState
from engine.pipeline import Request, recommend
from engine.recmodel import load_rec_model
from engine.state import ServingState, build_state
from engine.types import SECONDS_PER_DAY, Context, Profile, PurchaseSummary

NOW = 1_793_000_000.0  # a fixed clock for deterministic due-ness
TODAY = int(NOW // SECONDS_PER_DAY)


@pytest.fixture(scope="module")
def model(trained):
    return load_rec_model(trained.registry.verify(trained.artifact.version))


@pytest.fixture(scope="module")
def state(model, rules) -> ServingState:
    items = [replace(it, stock=max(it.stock, 5), active=True) for it in model.catalog_snapshot]
    return build_state(CatalogState.from_items(items, "t"), model, rules)


def _known_customer(model) -> str:
    return str(model.user_ids[len(model.user_ids) // 2])


def decide(*args, **kw):  # type: ignore[no-untyped-def]
    """The ranking itself, greedy: these tests are about candidates, filters and order, not exploration."""
    return recommend(*args, **{"explore": False, **kw})


def _ids(decision):
    return [i.item_id for i in decision.items]


def test_known_customer_gets_personal_als_items(state, model):
    cid = _known_customer(model)
    d = decide(state, Request(cid, "home", 10), Profile(cid), now=NOW)
    assert not d.fallback and len(d.items) == 10
    assert any("als" in i.reasons for i in d.items)
    assert [i.position for i in d.items] == list(range(1, 11))
    assert all(round(i.score, 4) == i.score for i in d.items)  # scores print as 0.8123, not 0.8122999668


def test_unknown_customer_is_never_empty_and_marked_fallback(state):
    d = decide(state, Request("nobody", "home", 10), None, now=NOW)
    assert len(d.items) == 10 and d.fallback and d.fallback_reason == "unknown_customer"


def test_unknown_customer_with_context_gets_context_category_bestsellers(state):
    item = state.catalog.item_ids[0]
    d = decide(state, Request("nobody", "pdp", 8, Context(item_id=item)), None, now=NOW)
    cat = state.catalog.category[state.catalog.index[item]]
    shown_cats = [state.catalog.category[state.catalog.index[i]] for i in _ids(d)]
    assert len(d.items) == 8 and d.fallback
    assert shown_cats.count(cat) >= 4


def test_store_failure_falls_back_with_its_reason(state, model):
    d = decide(state, Request(_known_customer(model), "home", 6), None, fallback_reason="redis_unavailable", now=NOW)
    assert d.fallback_reason == "redis_unavailable" and len(d.items) == 6


def test_out_of_stock_and_inactive_items_never_appear(state, model):
    cat = state.catalog
    stock = cat.stock.copy()
    active = cat.active.copy()
    stock[::2] = 0  # half the catalog sells out
    active[1::4] = False
    sold_out = replace(cat, stock=stock, active=active)
    s2 = build_state(sold_out, model, state.rules)
    unavailable = {cat.item_ids[i] for i in np.flatnonzero((stock == 0) | ~active)}
    for cid in model.user_ids[:50]:
        for placement in ("home", "pdp", "cart"):
            d = decide(
                s2, Request(str(cid), placement, 10, Context(item_id=cat.item_ids[3])), Profile(str(cid)), now=NOW
            )
            assert len(d.items) == 10
            assert not unavailable & set(_ids(d))


def test_context_items_and_duplicates_are_excluded(state, model):
    cid = _known_customer(model)
    ctx = Context(item_id=state.catalog.item_ids[5], cart=(state.catalog.item_ids[6], state.catalog.item_ids[7]))
    for placement in ("home", "pdp", "cart"):
        d = decide(state, Request(cid, placement, 20, ctx), Profile(cid), now=NOW)
        ids = _ids(d)
        assert len(ids) == len(set(ids)) == 20
        assert not set(ctx.item_ids) & set(ids)


def _item_in(state: ServingState, repurchasable: bool) -> str:
    for i, iid in enumerate(state.catalog.item_ids):
        if bool(state.repurchase_category[state.catalog.category[i]]) == repurchasable:
            return iid
    raise AssertionError("no such item")


def test_bought_durable_items_are_not_recommended_again(state, model):
    cid = _known_customer(model)
    durable = _item_in(state, repurchasable=False)
    profile = Profile(cid, purchases=(PurchaseSummary(durable, 1, TODAY - 20, TODAY - 20),), recent_views=(durable,))
    for placement in ("home", "pdp", "cart"):
        d = decide(state, Request(cid, placement, 30), profile, now=NOW)
        assert durable not in _ids(d)


def test_consumables_due_for_repurchase_come_back_as_buy_again(state, model):
    cid = _known_customer(model)
    consumable = _item_in(state, repurchasable=True)
    # Bought every ~10 days, last time 10 days ago: due now.
    profile = Profile(cid, purchases=(PurchaseSummary(consumable, 5, TODAY - 50, TODAY - 10),))
    d = decide(state, Request(cid, "home", 10), profile, now=NOW)
    assert consumable in _ids(d)
    shown = next(i for i in d.items if i.item_id == consumable)
    assert "buy_again" in shown.reasons


def test_a_placement_allowing_repurchase_brings_back_durables(state, model, rules):
    home = rules.placements["home"]
    allowing = rules.model_copy(
        update={
            "placements": {
                "home": home.model_copy(update={"filters": home.filters.model_copy(update={"allow_repurchase": True})})
            }
        }
    )
    s2 = build_state(state.catalog, model, allowing)
    cid = _known_customer(model)
    durable = _item_in(state, repurchasable=False)
    profile = Profile(cid, purchases=(PurchaseSummary(durable, 4, TODAY - 40, TODAY - 10),))
    d = decide(s2, Request(cid, "home", 10), profile, now=NOW)
    assert durable in _ids(d)


def test_at_most_n_items_per_category(state, model, rules):
    cap = rules.placements["home"].rerank.max_per_category
    for cid in model.user_ids[:30]:
        d = decide(state, Request(str(cid), "home", 10), Profile(str(cid)), now=NOW)
        cats = [state.catalog.category[state.catalog.index[i]] for i in _ids(d)]
        assert max(np.bincount(cats)) <= cap


def test_a_new_customer_with_views_gets_folded_in_personal_items(state, model):
    viewed = tuple(state.catalog.item_ids[i] for i in range(10, 14))
    profile = Profile("brand-new", recent_views=viewed)
    d = decide(state, Request("brand-new", "home", 10), profile, now=NOW)
    assert not d.fallback
    assert any("als" in i.reasons for i in d.items)


def test_folded_in_factors_solve_the_als_normal_equations(state, model):
    """A batch's folded-in factors (Woodbury over the items touched) are the direct solve of the ALS step
    (YᵀY + Yᵤᵀ Wᵤ Yᵤ + λI) x = Yᵤᵀ (1 + wᵤ); items the model lacks are left out, and a customer left with
    none, like an unknown one without a profile, gets no factor. Known customers keep their trained one."""
    ids = state.catalog.item_ids
    known = _known_customer(model)
    profiles = [
        Profile("new-a", recent_views=(ids[3], ids[7], ids[3])),  # a repeated view counts twice
        Profile("new-b", cart=(ids[11],), purchases=(PurchaseSummary(ids[5], 9, first_day=19_000, last_day=19_600),)),
        Profile("new-c", recent_views=("no-such-item",)),
        None,
        Profile(known),
        Profile("new-d", recent_views=("no-such-item", ids[20])),
    ]
    which, vectors = cs.user_vectors(state, [p.customer_id if p else "nobody" for p in profiles], profiles)
    assert which.tolist() == [0, 1, 4, 5]
    assert np.array_equal(vectors[2], model.user_vector(known))
    y = np.asarray(model.item_factors, dtype=np.float64)
    direct = {
        0: ([ids[3], ids[7], ids[3]], [1.0, 0.85, 0.85**2]),
        1: ([ids[5], ids[11]], [8.0 * 5, 4.0]),  # a purchase counts at most 5 times
        3: ([ids[20]], [0.85]),
    }
    for at, (items, weights) in direct.items():
        yu = y[model.item_rows(items)]
        w = np.asarray(weights)
        a = y.T @ y + (yu.T * w) @ yu + model.regularization * np.eye(y.shape[1])
        expected = np.linalg.solve(a, yu.T @ (1.0 + w))
        np.testing.assert_allclose(vectors[at], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_ids_longer_than_any_the_model_knows_are_not_found_and_do_not_shadow_others(model):
    """Searched at the stored width, a long id is cut; the exact comparison must still reject it."""
    known = _known_customer(model)
    item = str(model.item_ids[7])
    rows = model.factor_rows([known + "-and-more", "x" * 64, known])
    assert rows.tolist() == [-1, -1, int(model.user_rows[list(model.user_ids).index(known)])]
    assert model.item_rows([item + "0000000000", item]).tolist() == [-1, 7]
    assert model.user_vector(known + "-and-more") is None and model.user_vector(known) is not None


def test_no_personalisation_consent_means_nothing_personal(state, model):
    cid = _known_customer(model)
    profile = Profile(cid, consents=frozenset({"email"}))
    d = decide(state, Request(cid, "home", 10), profile, now=NOW)
    assert d.fallback and d.fallback_reason == "no_personalization_consent"
    assert not any({"als", "buy_again", "similar_to_recent"} & set(i.reasons) for i in d.items)


def test_without_a_model_bestsellers_by_catalog_popularity_still_fill_the_widget(state, rules):
    s2 = build_state(state.catalog, None, rules)
    d = decide(s2, Request("c1", "home", 10), Profile("c1"), now=NOW)
    assert d.fallback_reason == "model_unavailable" and len(d.items) == 10


def test_limit_larger_than_available_items_returns_all_available(state, model):
    cat = state.catalog
    stock = np.zeros_like(cat.stock)
    stock[:7] = 3
    s2 = build_state(replace(cat, stock=stock), model, state.rules)
    d = decide(s2, Request(_known_customer(model), "home", 20), Profile("x"), now=NOW)
    assert sorted(_ids(d)) == sorted(cat.item_ids[:7])


def test_strict_diversity_looks_past_the_head_of_the_ranking(state, model, rules):
    home = rules.placements["home"]
    one_each = rules.model_copy(
        update={
            "placements": {
                "home": home.model_copy(update={"rerank": home.rerank.model_copy(update={"max_per_category": 1})})
            }
        }
    )
    s2 = build_state(state.catalog, model, one_each)
    cid = _known_customer(model)
    d = decide(s2, Request(cid, "home", 10), Profile(cid), now=NOW)
    cats = [s2.catalog.category[s2.catalog.index[i]] for i in _ids(d)]
    assert len(cats) == 10
    assert len(set(cats)) == min(10, len(s2.catalog.categories))


def test_decision_ids_are_unique_and_sort_by_time():
    from engine.ids import decision_seed, new_decision_id, new_decision_ids

    ids = [new_decision_id(1_700_000_000_000 + k) for k in range(200)]
    assert len(set(ids)) == 200 and ids == sorted(ids)
    assert all(len(i) == 26 and set(i) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids)
    assert decision_seed(ids[0]) == decision_seed(ids[0]) != decision_seed(ids[1])
    assert new_decision_id(1_469_918_176_385)[:10] == "01ARYZ6S41"  # the ULID specification's example time
    batch = new_decision_ids(500, 1_700_000_000_000)  # a batch's ids: one moment, each its own random bits
    assert len(set(batch)) == 500 and {i[:10] for i in batch} == {ids[0][:10]}
    assert all(len(i) == 26 and set(i) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in batch)


def test_a_decision_replays_exactly_from_its_id_and_greedy_is_the_ranking(state, model):
    req = Request(_known_customer(model), "home", 10)
    profile = Profile(req.customer_id)
    first = recommend(state, req, profile, decision_id="01KAQ3TV0X8B6D6M0R8N6C3Y7Z", now=1.8e9)
    again = recommend(state, req, profile, decision_id="01KAQ3TV0X8B6D6M0R8N6C3Y7Z", now=1.8e9)
    other = [recommend(state, req, profile, decision_id=f"01KAQ3TV0X8B6D6M0R8N6C3Y{c}Z", now=1.8e9) for c in "ABCD"]
    assert first.items == again.items and first.shadow == again.shadow  # same id: same draws
    assert any(o.items != first.items for o in other)  # home explores (softmax)
    assert first.policy == "softmax" and all(0 < i.propensity <= 1 for i in first.items)
    assert first.shadow is not None and first.shadow.policy == "thompson_lift"  # its arms learn from home's clicks
    assert len(first.expected_clicks) == len(first.items) and max(first.expected_clicks) <= 0.05
    greedy = recommend(state, req, profile, decision_id="01KAQ3TV0X8B6D6M0R8N6C3Y7Z", now=1.8e9, explore=False)
    assert greedy.policy == "greedy" and all(i.propensity == 1.0 for i in greedy.items) and greedy.shadow is None
    scores = [i.score for i in greedy.items]
    assert scores == sorted(scores, reverse=True) or any("fill" in i.reasons for i in greedy.items)


def _mixed_batch(state, model, shop_dir, placement: str, limit: int):  # type: ignore[no-untyped-def]
    """Requests and profiles of every kind a batch meets: known customers, folded-in newcomers, unknown
    recipients, no personalisation consent, a store failure; with contexts where the placement reads them."""
    from tests.conftest import _files_state, _load_input

    profiles, _ = _load_input(shop_dir.resolve(), _files_state(shop_dir))
    ids = state.catalog.item_ids
    reqs: list[Request] = []
    profs: list[Profile | None] = []
    reasons: list[str | None] = []
    for k, p in enumerate(profiles[:120]):
        profile: Profile | None = p
        cid, reason = p.customer_id, None
        if k % 7 == 1:
            cid, profile = f"new-{k}", replace(p, customer_id=f"new-{k}")  # not in the model: folded in
        elif k % 7 == 2:
            profile = None
        elif k % 7 == 3:
            profile = replace(p, consents=frozenset({"email"}))
        elif k % 7 == 4:
            reason = "redis_unavailable"
        context = Context()
        if placement == "pdp":
            context = Context(item_id=ids[(k * 37) % len(ids)])
        elif placement == "cart":
            context = Context(cart=tuple(ids[(k * j * 13) % len(ids)] for j in (1, 2, 3)))
        reqs.append(Request(cid, placement, limit, context))
        profs.append(profile)
        reasons.append(reason)
    return reqs, profs, reasons


@pytest.mark.parametrize(("placement", "limit"), [("email:weekly", 4), ("home", 10), ("pdp", 8), ("cart", 6)])
def test_a_batch_decides_for_each_request_what_it_would_decide_alone(state, model, shop_dir, placement, limit):
    """recommend_many runs the stages over the whole batch; each row still gets its own decision: the same
    items, reasons and policy as `recommend` for that request alone, the scores and propensities equal up to
    the float32 rounding of the batch's ALS matrix product."""
    from engine.ids import new_decision_id
    from engine.pipeline import recommend_many

    cat = state.catalog
    sold_out = replace(cat, stock=np.where(np.arange(len(cat)) % 9 == 0, 0, cat.stock))
    s2 = build_state(sold_out, model, state.rules)
    reqs, profs, reasons = _mixed_batch(s2, model, shop_dir, placement, limit)
    ids = [new_decision_id(int(NOW * 1000)) for _ in reqs]
    batch = recommend_many(s2, reqs, profs, fallback_reasons=reasons, now=NOW, decision_ids=ids)
    assert {d.fallback_reason for d in batch} >= {None, "unknown_customer", "no_personalization_consent"}
    for req, profile, reason, did, together in zip(reqs, profs, reasons, ids, batch, strict=True):
        alone = recommend(s2, req, profile, fallback_reason=reason, now=NOW, decision_id=did)
        assert [i.item_id for i in together.items] == [i.item_id for i in alone.items]
        assert [i.reasons for i in together.items] == [i.reasons for i in alone.items]
        assert np.allclose([i.score for i in together.items], [i.score for i in alone.items], atol=1e-4)
        assert np.allclose([i.propensity for i in together.items], [i.propensity for i in alone.items], rtol=1e-4)
        assert replace(together, items=(), shadow=None, expected_clicks=()) == replace(
            alone, items=(), shadow=None, expected_clicks=()
        )
        assert not any(s2.catalog.stock[s2.catalog.index[i.item_id]] == 0 for i in together.items)


def test_a_batch_of_one_is_the_single_decision_bit_for_bit(state, model, shop_dir):
    from engine.ids import new_decision_id
    from engine.pipeline import recommend_many

    reqs, profs, reasons = _mixed_batch(state, model, shop_dir, "home", 10)
    for req, profile, reason in zip(reqs[:20], profs[:20], reasons[:20], strict=True):
        did = new_decision_id(int(NOW * 1000))
        (one,) = recommend_many(state, [req], [profile], fallback_reasons=[reason], now=NOW, decision_ids=[did])
        assert one == recommend(state, req, profile, fallback_reason=reason, now=NOW, decision_id=did)


def test_a_batch_is_one_placement(state):
    from engine.pipeline import recommend_many

    with pytest.raises(ValueError, match="one placement at a time"):
        recommend_many(state, [Request("a", "home", 4), Request("b", "pdp", 4)], [None, None])


@settings(max_examples=200, deadline=None)
@given(
    cells=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 40)), unique=True, max_size=120),
    pool=st.lists(st.sampled_from([0.5, 0.25, 1.0, 3e-39, 7.0, 0.125]), min_size=1, max_size=6),
    n=st.integers(1, 12),
    wide=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_top_per_row_is_each_rows_n_best_by_score_then_lower_item(cells, pool, n, wide, seed):
    """Entries in any order (a shuffled list of distinct (row, item)) and tied scores: each row's n best,
    rows ascending, best first, ties to the lower item. `wide` takes the lexsort path (float64 scores)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cells))
    rows = np.asarray([cells[k][0] for k in order], dtype=np.int64)
    items = np.asarray([cells[k][1] for k in order], dtype=np.int64)
    scores = np.asarray([pool[(r * 7 + i) % len(pool)] for r, i in zip(rows, items, strict=True)], dtype=np.float32)
    if wide:
        scores = scores.astype(np.float64)
    row, item, score = cs.top_per_row(rows, items, scores, n, 41)
    expected = sorted(
        zip(rows.tolist(), items.tolist(), scores.tolist(), strict=True), key=lambda e: (e[0], -e[2], e[1])
    )
    kept = [e for k, e in enumerate(expected) if sum(1 for f in expected[:k] if f[0] == e[0]) < n]
    assert list(zip(row.tolist(), item.tolist(), score.tolist(), strict=True)) == kept
    assert score.dtype == scores.dtype


@settings(max_examples=100, deadline=None)
@given(values=st.lists(st.integers(0, 63), max_size=200))
def test_distinct_is_each_value_once(values):
    out = cs.distinct(np.asarray(values, dtype=np.int64), 64)
    assert sorted(out.tolist()) == sorted(set(values))


def test_a_similarity_that_vanishes_in_float32_is_no_neighbour_candidate(state):
    """Seed weights may come as float64: a weighted similarity that rounds to 0 in float32 is left out, in a
    batch as alone, and every candidate keeps a positive score (its row's best scales it)."""
    seed = int(np.flatnonzero((state.neighbours_idx >= 0).any(axis=1))[0])
    seeds = np.asarray([seed, seed], dtype=np.int64)
    weights = np.asarray([1.0, 1e-50])
    batch = cs.neighbours(state, 2, np.asarray([0, 1]), seeds, weights, 50, "neighbours")
    assert len(batch) > 0 and set(batch.row.tolist()) == {0}
    assert np.isfinite(batch.score).all() and (batch.score > 0).all()
    alone = cs.neighbours(state, 1, np.zeros(1, dtype=np.int64), seeds[1:], weights[1:], 50, "neighbours")
    assert len(alone) == 0
    first = cs.neighbours(state, 1, np.zeros(1, dtype=np.int64), seeds[:1], weights[:1], 50, "neighbours")
    assert batch.idx.tolist() == first.idx.tolist() and batch.score.tolist() == first.score.tolist()
