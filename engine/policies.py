"""Exploration policies: pick the shown items from a ranked pool, slot by slot, and say how likely each pick was.

Every policy reports slot-aware propensities (the probability of the item at slot j given the items in slots
before it), which is what off-policy evaluation of slates needs. The only randomness is the caller's
`numpy.random.Generator`, seeded per decision, so a logged decision replays exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.fastinit import fast_init
from engine.rules import EpsilonGreedy, Exploration, Greedy, Softmax, Thompson, ThompsonLift

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_PRIOR_FLOOR = 0.01  # the least prior click rate, as a share of the best candidate's
_MIN_BETA_PARAMETER = 1e-3


@dataclass(frozen=True, slots=True)
class Arms:
    """Observed feedback per pool item (aligned with the pool): impressions, clicks, and the clicks the
    ranker expected for those impressions (`expected_rates` summed; read by `thompson_lift`)."""

    trials: FloatArray
    successes: FloatArray
    expected: FloatArray | None = None


@fast_init
@dataclass(frozen=True, slots=True)
class Selection:
    """What a policy chose, slot by slot, and the probability it had of choosing it."""

    order: IntArray  # indices into the pool, one per slot
    propensities: FloatArray  # P(order[j] at slot j | order[:j]); every value in (0, 1]
    distributions: tuple[FloatArray, ...] = ()  # per slot, the distribution over the pool (when asked for)


def choose(
    spec: Exploration,
    scores: FloatArray,
    k: int,
    rng: np.random.Generator,
    arms: Arms | None = None,
    keep_distributions: bool = False,
) -> Selection:
    """Pick min(k, len(scores)) pool items for slots 1..k with policy `spec`.

    `scores` are the ranker's final scores of the pool, sorted descending; `arms` feeds Thompson sampling
    (None: no feedback yet) and is ignored by the other policies. The closed-form policies are computed
    for all slots at once (a decision has a budget of a millisecond, not a loop over numpy calls).
    """
    scores = _checked_scores(scores)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, len(scores))
    if k == 0:
        return Selection(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
    if isinstance(spec, Greedy):
        sel = _greedy(scores, k)
    elif isinstance(spec, EpsilonGreedy):
        u = rng.random(2 * k)
        sel = _epsilon_walk(spec.epsilon, scores, k, None, u)
    elif isinstance(spec, Softmax):
        logits = _logits(scores, spec.temperature)
        order = np.argsort(-(logits + rng.gumbel(size=len(scores))), kind="stable")[:k].astype(np.int64)
        sel = Selection(order, _plackett_luce(logits, order))
    else:
        return _thompson(spec, scores, k, rng, arms, keep_distributions)
    if keep_distributions:
        dists = _distributions(spec, scores, sel.order)
        props = np.asarray([d[i] for d, i in zip(dists, sel.order.tolist(), strict=True)], dtype=np.float64)
        sel = Selection(sel.order, props, dists)
    return sel


def softmax_many(
    spec: Softmax, pools: Sequence[npt.NDArray[np.floating]], ks: Sequence[int], gumbels: Sequence[FloatArray]
) -> list[Selection]:
    """`choose` for many pools under one softmax policy at once, each pool with its own Gumbel noise (what
    `choose` draws from the pool's generator: `rng.gumbel(size=len(pool))`).

    The same selections as one `choose` per pool, bit for bit: the pools are laid side by side, padded
    with -inf (which sorts after every real item), and logits, noise and the stable sort are the same
    float operations row by row, and so are the propensities (`plackett_luce_rows`).
    """
    lengths = np.asarray([len(p) for p in pools], dtype=np.int64)
    if not len(pools) or not lengths.max(initial=0):
        return [Selection(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)) for _ in pools]
    flat = np.concatenate(pools).astype(np.float64, copy=False)
    if not np.isfinite(flat).all():
        raise ValueError("scores must be a 1-d array of finite numbers")
    width = int(lengths.max())
    cells = np.arange(len(flat)) + np.repeat(np.arange(len(pools)) * width - np.cumsum(lengths) + lengths, lengths)
    scores = np.full((len(pools), width), -np.inf)
    scores.reshape(-1)[cells] = flat
    noise = np.zeros((len(pools), width))
    noise.reshape(-1)[cells] = np.concatenate(gumbels)
    peak = np.where(lengths > 0, scores.max(axis=1), 0.0)
    logits = (scores - peak[:, None]) / spec.temperature
    orders = np.argsort(-(logits + noise), axis=1, kind="stable")
    if len(ks) != len(pools) or any(k < 0 for k in ks):
        raise ValueError(f"one k >= 0 per pool needed, got {list(ks)} for {len(pools)} pools")
    taken = np.minimum(np.asarray(ks, dtype=np.int64), lengths)
    k_max = int(taken.max())
    propensities = plackett_luce_rows(logits, orders[:, :k_max], taken).tolist()
    return [
        Selection(orders[r, :k], np.asarray(propensities[r][:k], dtype=np.float64))
        for r, k in enumerate(taken.tolist())
    ]


def evaluate(
    spec: Exploration,
    scores: FloatArray,
    taken: IntArray,
    rng: np.random.Generator,
    arms: Arms | None = None,
) -> FloatArray:
    """Probability that policy `spec` would choose taken[j] at slot j given taken[:j] (may be 0).

    Used for a shadow policy's propensities on what the live policy showed, and for target propensities
    in off-policy evaluation. Thompson's probabilities are estimated from fresh draws of `rng`.
    """
    scores = _checked_scores(scores)
    taken = np.asarray(taken, dtype=np.int64)
    if taken.ndim != 1 or np.any((taken < 0) | (taken >= len(scores))) or len(np.unique(taken)) != len(taken):
        raise ValueError(f"taken must be distinct indices into a pool of {len(scores)}, got {taken.tolist()}")
    if len(taken) == 0:
        return np.empty(0, dtype=np.float64)
    if isinstance(spec, Greedy | EpsilonGreedy):
        epsilon = spec.epsilon if isinstance(spec, EpsilonGreedy) else 0.0
        return _epsilon_walk(epsilon, scores, len(taken), taken.tolist(), None).propensities
    if isinstance(spec, Softmax):
        return _plackett_luce(_logits(scores, spec.temperature), taken)
    slots = _ThompsonSlots(spec, scores, rng, arms)
    propensities = np.empty(len(taken), dtype=np.float64)
    for j, item in enumerate(taken.tolist()):
        propensities[j] = slots.distribution()[item]
        slots.take(item)
    return propensities


def _checked_scores(scores: FloatArray) -> FloatArray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise ValueError("scores must be a 1-d array of finite numbers")
    return values


def _greedy(scores: FloatArray, k: int) -> Selection:
    """Greedy without per-slot work: the stable descending sort is the ranker's order, ties to the lower index."""
    order = np.argsort(-scores, kind="stable")[:k].astype(np.int64, copy=False)
    return Selection(order, np.ones(k, dtype=np.float64))


def _epsilon_walk(
    epsilon: float, scores: FloatArray, k: int, given: list[int] | None, u: FloatArray | None
) -> Selection:
    """Epsilon-greedy slot by slot in plain Python integers (k and the pool are small).

    Slot j: with probability epsilon a uniformly random remaining item, else the best remaining one, so
    P(a) = epsilon/R + (1 - epsilon)·[a is the best remaining]. Choosing draws two uniforms per slot
    from `u`; evaluating walks the `given` order instead.
    """
    by_score = np.argsort(-scores, kind="stable").tolist()
    n = len(by_score)
    alive = [True] * n
    best_at = 0
    order: list[int] = []
    props: list[float] = []
    for j in range(k):
        while not alive[by_score[best_at]]:
            best_at += 1
        best, remaining = by_score[best_at], n - j
        if given is not None:
            item = given[j]
        elif u is not None and u[2 * j] < epsilon:
            pick = int(u[2 * j + 1] * remaining)  # the pick-th remaining item in pool order
            item = next(i for i in range(n) if alive[i] and (pick := pick - 1) < 0)
        else:
            item = best
        order.append(item)
        props.append(epsilon / remaining + ((1.0 - epsilon) if item == best else 0.0))
        alive[item] = False
    return Selection(np.asarray(order, dtype=np.int64), np.asarray(props, dtype=np.float64))


def _logits(scores: FloatArray, temperature: float) -> FloatArray:
    return (scores - float(scores.max())) / temperature


def _plackett_luce(logits: FloatArray, order: IntArray) -> FloatArray:
    """One pool's `plackett_luce_rows`: the same float operations on one row, in half the numpy calls (a
    single decision has every slot taken and no padding), so the same floats as the pool's row in a batch."""
    picked = logits[order]
    rest = logits.copy()
    rest[order] = -np.inf
    peak = rest.max() if len(rest) else -np.inf
    if not np.isfinite(peak):
        peak = np.float64(0.0)  # nothing left: exp gives 0s, the tail is -inf
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = peak + np.log(np.cumsum(np.exp(rest - peak))[-1:]) if len(rest) else np.full(1, -np.inf)
        tails = np.logaddexp.accumulate(np.concatenate([tail, picked[::-1]]))
        out: FloatArray = np.exp(picked - tails[:0:-1])
    return out


def plackett_luce_rows(logits: FloatArray, orders: IntArray, ks: IntArray) -> FloatArray:
    """Softmax without replacement, row by row: P(a_j | a_<j) = exp(l[a_j]) / Σ exp(l) over the items still
    there, for a_j = orders[r, j] and j < ks[r] (0 beyond; `orders` rows hold distinct indices).

    `logits` is rows × width, -inf where a row has no item. The remaining items at slot j are a_j.. plus
    everything never taken; their log-sum-exp is built from the back with logaddexp, so no probability
    suffers cancellation or underflow to 0/0. A row gets the same floats whatever rows come with it and
    however much padding: every step is elementwise or runs along its row in order (the never-taken items'
    sum is a cumulative sum, whose last value padding's zeros leave alone), so a batch's propensities are
    each single decision's to the last bit.
    """
    n_rows, width = logits.shape
    valid = np.arange(orders.shape[1]) < np.asarray(ks)[:, None]
    # A fresh copy with one more -inf column, to which the slots beyond a row's k point: it becomes the
    # never-taken items once the taken ones are set to -inf, and those slots pick -inf (probability 0).
    rest = np.empty((n_rows, width + 1))
    rest[:, :width] = logits
    rest[:, width] = -np.inf
    cells = (np.where(valid, orders, width) + np.arange(0, n_rows * (width + 1), width + 1)[:, None]).ravel()
    flat = rest.reshape(-1)
    picked = flat[cells].reshape(orders.shape)
    flat[cells] = -np.inf
    peak = rest.max(axis=1)
    peak[~np.isfinite(peak)] = 0.0  # a row with nothing left: exp gives 0s, its tail is -inf
    with np.errstate(divide="ignore", invalid="ignore"):
        # Contiguous inputs to exp and log on both paths: numpy may take a SIMD loop for those and a scalar
        # one for strided data, which can differ in the last bit.
        tail = peak + np.log(np.ascontiguousarray(np.cumsum(np.exp(rest - peak[:, None]), axis=1)[:, -1]))
        # Slot j's tail is logaddexp(slot j+1's tail, its pick), from the back: one left-to-right accumulate
        # over the reversed picks (column i holds the tail of slot k - i).
        tails = np.logaddexp.accumulate(np.concatenate([tail[:, None], picked[:, ::-1]], axis=1), axis=1)
        out: FloatArray = np.exp(picked - tails[:, :0:-1])
    out[~valid] = 0.0
    return out


def _distributions(
    spec: Greedy | EpsilonGreedy | Softmax, scores: FloatArray, order: IntArray
) -> tuple[FloatArray, ...]:
    """Each slot's full distribution over the pool (for tests and diagnostics; not on the request path)."""
    alive = np.ones(len(scores), dtype=np.bool_)
    out: list[FloatArray] = []
    for item in order.tolist():
        masked = np.where(alive, scores, -np.inf)
        if isinstance(spec, Softmax):
            logits = (masked - float(masked.max())) / spec.temperature
            weights = np.exp(logits)
            dist: FloatArray = weights / float(weights.sum())
        else:
            epsilon = spec.epsilon if isinstance(spec, EpsilonGreedy) else 0.0
            dist = np.where(alive, epsilon / int(alive.sum()), 0.0)
            dist[int(np.argmax(masked))] += 1.0 - epsilon
        out.append(dist)
        alive[item] = False
    return tuple(out)


def expected_rates(spec: Thompson | ThompsonLift, scores: FloatArray) -> FloatArray:
    """The click rate the ranker implies per pool item: `prior_ctr` × score relative to the pool's best."""
    peak = float(scores.max()) if len(scores) else 0.0
    if peak <= 0:
        return np.full(len(scores), spec.prior_ctr, dtype=np.float64)
    with np.errstate(over="ignore"):  # a subnormal peak overflows the ratio; the clip bounds it at 1 anyway
        share = np.clip(scores / peak, _PRIOR_FLOOR, 1.0)
    return np.asarray(spec.prior_ctr * share, dtype=np.float64)


def _draws(
    spec: Thompson | ThompsonLift, scores: FloatArray, rng: np.random.Generator, arms: Arms | None
) -> FloatArray:
    """`spec.samples` posterior draws of every pool item's click rate (samples × pool)."""
    if isinstance(spec, ThompsonLift):
        shape, rate = _lift_posterior(spec, scores, arms)
        lift = rng.gamma(shape, 1.0 / rate, size=(spec.samples, len(scores)))
        return np.asarray(expected_rates(spec, scores) * lift, dtype=np.float64)
    alpha, beta = _posterior(spec, scores, arms)
    return np.asarray(rng.beta(alpha, beta, size=(spec.samples, len(scores))), dtype=np.float64)


def _lift_posterior(spec: ThompsonLift, scores: FloatArray, arms: Arms | None) -> tuple[FloatArray, FloatArray]:
    """Gamma(shape, rate) of each item's lift: prior Gamma(k, k) (mean 1), plus clicks over expected clicks."""
    shape = np.full(len(scores), spec.prior_strength, dtype=np.float64)
    rate = shape.copy()
    if arms is not None:
        successes = np.asarray(arms.successes, dtype=np.float64)
        expected = np.zeros(len(scores)) if arms.expected is None else np.asarray(arms.expected, dtype=np.float64)
        if successes.shape != scores.shape or expected.shape != scores.shape:
            raise ValueError(f"arms must align with the pool of {len(scores)} items")
        shape = shape + np.maximum(successes, 0.0)
        rate = rate + np.maximum(expected, 0.0)
    return shape, rate


def _thompson(
    spec: Thompson | ThompsonLift,
    scores: FloatArray,
    k: int,
    rng: np.random.Generator,
    arms: Arms | None,
    keep: bool,
) -> Selection:
    if not keep:
        return _thompson_all_slots(_draws(spec, scores, rng, arms), k)
    slots = _ThompsonSlots(spec, scores, rng, arms)
    order = np.empty(k, dtype=np.int64)
    propensities = np.empty(k, dtype=np.float64)
    distributions: list[FloatArray] = []
    for j in range(k):
        dist = slots.distribution()
        item = slots.pick(j)
        order[j] = item
        propensities[j] = dist[item]
        if keep:
            distributions.append(dist)
        slots.take(item)
    return Selection(order, propensities, tuple(distributions))


def _thompson_all_slots(theta: FloatArray, k: int) -> Selection:
    """The same choices and probabilities as slot-by-slot, with no numpy call per slot.

    Row m of `theta` ranks the items by draw. Slot j takes the first untaken item of row j mod M. Item a
    wins row m given the items taken before it iff every item ranked above a in that row was taken, i.e.
    iff the number of earlier picks ranked above a equals a's rank; the slot's probability is the share
    of rows a wins.
    """
    samples, size = theta.shape
    by_draw = np.argsort(-theta, axis=1, kind="stable")
    rows = by_draw[: min(k, samples)].tolist()
    taken = [False] * size
    picks: list[int] = []
    for j in range(k):
        item = next(i for i in rows[j % samples] if not taken[i])
        taken[item] = True
        picks.append(item)
    order = np.asarray(picks, dtype=np.int64)
    rank = np.empty_like(by_draw)
    np.put_along_axis(rank, by_draw, np.arange(size)[None, :], axis=1)
    ranks = rank[:, order]  # samples × k: where each pick sits in each row
    earlier = np.triu(np.ones((k, k), dtype=np.bool_), 1)  # [i, j]: pick i came before pick j
    above = ((ranks[:, :, None] < ranks[:, None, :]) & earlier).sum(axis=1)
    return Selection(order, (above == ranks).mean(axis=0))


class _ThompsonSlots:
    """Beta-Bernoulli Thompson sampling, with each slot's probabilities estimated from M posterior draws.

    One M×P matrix of draws serves the whole decision: slot j acts on row j mod M, and its distribution is
    how often each remaining item wins a row. After a take, only the rows that item was winning change.
    """

    def __init__(
        self, spec: Thompson | ThompsonLift, scores: FloatArray, rng: np.random.Generator, arms: Arms | None
    ) -> None:
        self._theta = _draws(spec, scores, rng, arms)
        self._winners = self._theta.argmax(axis=1)
        self._size = len(scores)

    def distribution(self) -> FloatArray:
        counts = np.bincount(self._winners, minlength=self._size)
        return counts / len(self._winners)

    def pick(self, slot: int) -> int:
        return int(self._winners[slot % len(self._winners)])

    def take(self, item: int) -> None:
        self._theta[:, item] = -np.inf
        stale = (self._winners == item).nonzero()[0]
        if len(stale):
            self._winners[stale] = self._theta[stale].argmax(axis=1)


def _posterior(spec: Thompson, scores: FloatArray, arms: Arms | None) -> tuple[FloatArray, FloatArray]:
    """Beta parameters per item: the ranker's prior plus observed clicks and misses.

    The prior is on the click-rate scale: the best-scored pool item is expected to be clicked at
    `prior_ctr`, the others in proportion to their score (at least 1 % of it), with the weight of
    `prior_strength` impressions. A click is then as informative as it is in reality, where rates are a
    few percent. `prior_strength` 0 is the classic uniform Beta(1, 1) prior.
    """
    if spec.prior_strength == 0:
        alpha, beta = np.ones(len(scores)), np.ones(len(scores))
    else:
        mean = expected_rates(spec, scores)
        # Floored: Beta needs positive parameters, and a prior worth almost nothing is then just weak.
        alpha = np.maximum(spec.prior_strength * mean, _MIN_BETA_PARAMETER)
        beta = np.maximum(spec.prior_strength * (1.0 - mean), _MIN_BETA_PARAMETER)
    if arms is not None:
        trials = np.asarray(arms.trials, dtype=np.float64)
        successes = np.asarray(arms.successes, dtype=np.float64)
        if trials.shape != scores.shape or successes.shape != scores.shape:
            raise ValueError(f"arms must align with the pool of {len(scores)} items")
        alpha = alpha + np.maximum(successes, 0.0)
        beta = beta + np.maximum(trials - successes, 0.0)
    return alpha, beta
