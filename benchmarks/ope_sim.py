"""Validation of the off-policy estimators on a synthetic shop whose true click probabilities are known.

The environment: a shop made by `training.generator` (its truth.npz is the ground truth), a noisy click model
(the true log-odds plus Gaussian noise) that ranks a pool of the top `pool` items per customer, and our own
exploration policies (`engine.policies`) choosing `slots` of them. A decision's customer is drawn uniformly;
a shown item is clicked with its true probability (no position effect in the generator's truth, so the
item-position model holds and every weighting below has a known right answer).

The true value of a policy is computed from its probability of each item at each slot (exact enumeration of
the slot prefixes for greedy, epsilon-greedy and softmax; 400 Monte Carlo slates per customer for Thompson)
times the true click probabilities, averaged over all customers. Each run logs `decisions` decisions under the
logging policy and estimates every target's value three ways: with the policies' marginal item-position
probabilities (what the item-position model asks for), with the logged per-slot conditional probabilities
multiplied along the slate (cascade), and with the logged conditionals used as if they were marginals (the
naive per-row ratio).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import Progress

from benchmarks.report import Report
from engine import ope, policies
from engine.rules import EpsilonGreedy, Exploration, Greedy, Softmax, Thompson
from training.generator_truth import ShopTruth, load_truth, true_click_probability

FloatArray = ope.FloatArray
IntArray = ope.IntArray
Condition = Callable[[FloatArray, ope.BoolArray, int], FloatArray]

THOMPSON_MC_SLATES = 400


@dataclass(frozen=True)
class SimSpec:
    customers: int
    items: int
    decisions: int  # per run
    runs: int
    pool: int = 20
    slots: int = 4
    model_noise: float = 0.7  # sd of the Gaussian noise on the true log-odds: the ranker's error
    days: int = 30
    logging: Exploration = field(default_factory=lambda: Softmax(temperature=0.3))
    targets: tuple[tuple[str, Exploration], ...] = ()


@dataclass(frozen=True)
class Environment:
    """Per customer: the pool (item indices, best model score first), its scores, log-odds and true clicks."""

    items: IntArray  # (C, pool)
    scores: FloatArray  # model click probability / the pool's best, in (0, 1], descending
    model_logit: FloatArray  # the model's log-odds (the reward model's feature)
    p_click: FloatArray  # true P(click | shown)


def make_environment(truth: ShopTruth, spec: SimSpec, seed: int) -> Environment:
    n_c = min(spec.customers, len(truth.taste))
    n_i = len(truth.item_category)
    p = true_click_probability(truth, np.arange(n_c)[:, None], np.arange(n_i)[None, :])
    rng = np.random.default_rng(seed)
    logit = np.log(p) - np.log1p(-p) + rng.normal(0.0, spec.model_noise, p.shape)
    pool = np.argsort(-logit, axis=1, kind="stable")[:, : spec.pool]
    model_logit = np.take_along_axis(logit, pool, axis=1)
    model_p = 1.0 / (1.0 + np.exp(-model_logit))
    return Environment(pool, model_p / model_p[:, :1], model_logit, np.take_along_axis(p, pool, axis=1))


def shop_truth(spec: SimSpec, seed: int, shop: Path | None) -> ShopTruth:
    """The truth of `shop` (a folder written by `nextbest generate`), or of a small shop generated now."""
    if shop is not None:
        return load_truth(shop)
    from training.generator import ShopSpec, generate_shop

    with tempfile.TemporaryDirectory(prefix="nextbest-ope-") as tmp:
        generate_shop(ShopSpec(spec.customers, spec.items, spec.days, seed), Path(tmp))
        return load_truth(Path(tmp))


# ------------------------------------------------------------------------------ the policies' slot marginals


def _condition(policy: Exploration) -> Condition:
    """P(item | the taken set) for every (customer, taken set): (C, pool) scores × (P, pool) mask → (C, P, pool)."""
    if isinstance(policy, Softmax):
        temperature = policy.temperature

        def softmax(scores: FloatArray, taken: ope.BoolArray, slot: int) -> FloatArray:
            e = np.exp((scores - scores[:, :1]) / temperature)[:, None, :] * ~taken[None, :, :]
            return np.asarray(e / e.sum(axis=2, keepdims=True), dtype=np.float64)

        return softmax
    if isinstance(policy, Greedy | EpsilonGreedy):
        epsilon = policy.epsilon if isinstance(policy, EpsilonGreedy) else 0.0

        def walk(scores: FloatArray, taken: ope.BoolArray, slot: int) -> FloatArray:
            # The pool is sorted by score, so the best remaining item is the first untaken one (as the engine's
            # stable sort breaks ties), whatever the customer.
            alive = ~taken
            dist = alive * (epsilon / (taken.shape[1] - slot))
            dist[np.arange(len(taken)), np.argmax(alive, axis=1)] += 1.0 - epsilon
            return np.broadcast_to(dist, (len(scores), *dist.shape))

        return walk
    raise TypeError(f"no closed form for {policy.policy}")


def slot_marginals(policy: Exploration, scores: FloatArray, slots: int, rng: np.random.Generator) -> FloatArray:
    """(C, slots, pool): the probability that `policy` shows each pool item at each slot."""
    if isinstance(policy, Thompson):
        return _thompson_marginals(policy, scores, slots, rng)
    cond = _condition(policy)
    out = np.empty((len(scores), slots, scores.shape[1]))
    chunk = max(1, 400_000 // (scores.shape[1] ** 2 * max(1, slots - 1)))
    for start in range(0, len(scores), chunk):
        out[start : start + chunk] = _enumerate(cond, scores[start : start + chunk], slots)
    return out


def _enumerate(cond: Condition, scores: FloatArray, slots: int) -> FloatArray:
    """Walk every set of items taken so far (orders of the same set merged: the next slot only sees the set)."""
    n_c, m = scores.shape
    out = np.empty((n_c, slots, m))
    taken = np.zeros((1, m), dtype=np.bool_)
    prob = np.ones((n_c, 1))
    bit = np.int64(1) << np.arange(m, dtype=np.int64)
    for j in range(slots):
        dist = cond(scores, taken, j)
        out[:, j, :] = np.einsum("cp,cpm->cm", prob, dist)
        if j == slots - 1:
            break
        p_idx, a_idx = np.nonzero(~taken)
        grown = taken[p_idx].copy()
        grown[np.arange(len(p_idx)), a_idx] = True
        sets, first, inverse = np.unique(grown @ bit, return_index=True, return_inverse=True)
        merged = np.zeros((len(sets), n_c))
        np.add.at(merged, inverse, (prob[:, p_idx] * dist[:, p_idx, a_idx]).T)
        taken, prob = grown[first], merged.T
    return out


def _thompson_marginals(policy: Thompson, scores: FloatArray, slots: int, rng: np.random.Generator) -> FloatArray:
    """Monte Carlo slates exactly as the engine draws them: slot j takes the first untaken item of posterior row j."""
    n_c, m = scores.shape
    out = np.zeros((n_c, slots, m))
    for c in range(n_c):
        alpha, beta = policies._posterior(policy, scores[c], None)
        theta = rng.beta(alpha, beta, size=(THOMPSON_MC_SLATES, slots, m))
        taken = np.zeros((THOMPSON_MC_SLATES, m), dtype=np.bool_)
        rows = np.arange(THOMPSON_MC_SLATES)
        for j in range(slots):
            pick = np.argmax(np.where(taken, -np.inf, theta[:, j, :]), axis=1)
            out[c, j] = np.bincount(pick, minlength=m) / THOMPSON_MC_SLATES
            taken[rows, pick] = True
    return out


# ------------------------------------------------------------------------------ one run


VARIANTS: tuple[tuple[str, str], ...] = (
    ("IPS", "marginal"),
    ("IPS", "cascade"),
    ("IPS", "per-slot"),
    ("SNIPS", "marginal"),
    ("SNIPS", "cascade"),
    ("SNIPS", "per-slot"),
    ("DM", "reward model"),
    ("DR", "marginal"),
    ("DR", "cascade"),
    ("DR", "per-slot"),
)


@dataclass(frozen=True)
class Logged:
    customer: IntArray  # (n,)
    order: IntArray  # (n, slots): pool indices shown
    logging_cond: FloatArray  # per-slot conditional propensities, as the engine logs them
    target_cond: tuple[FloatArray, ...]  # per target
    reward: FloatArray


def log_decisions(env: Environment, spec: SimSpec, rng: np.random.Generator) -> Logged:
    n, k = spec.decisions, spec.slots
    customer = rng.integers(0, len(env.items), n)
    order = np.empty((n, k), dtype=np.int64)
    logging_cond = np.empty((n, k))
    targets = [np.empty((n, k)) for _ in spec.targets]
    for d, c in enumerate(customer.tolist()):
        sel = policies.choose(spec.logging, env.scores[c], k, rng)
        order[d], logging_cond[d] = sel.order, sel.propensities
        for t, (_, target) in enumerate(spec.targets):
            targets[t][d] = policies.evaluate(target, env.scores[c], sel.order, rng)
    p = env.p_click[customer[:, None], order]
    reward = (rng.random((n, k)) < p).astype(np.float64)
    return Logged(customer, order, logging_cond, tuple(targets), reward)


def fit_click_model(x: FloatArray, y: FloatArray, iterations: int = 25) -> FloatArray:
    """Logistic regression of y on [1, x] by Newton's method (a light ridge keeps it finite on separable data)."""
    design = np.column_stack([np.ones_like(x), x])
    coef = np.zeros(2)
    for _ in range(iterations):
        mu = 1.0 / (1.0 + np.exp(-(design @ coef)))
        grad = design.T @ (y - mu) - 1e-6 * coef
        hess = (design * (mu * (1 - mu))[:, None]).T @ design + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        coef = coef + step
        if np.abs(step).max() < 1e-9:
            break
    return coef


def reward_model(env: Environment, logged: Logged, rng: np.random.Generator) -> FloatArray:
    """q̂ for every pool item of each decision (n, pool): the ranker's log-odds recalibrated on logged clicks.

    Cross-fitted in two halves of the decisions, so no decision's own rewards shape its predictions.
    """
    n = len(logged.customer)
    fold = rng.permutation(n) % 2
    logit_all = env.model_logit[logged.customer]  # (n, pool)
    shown_logit = np.take_along_axis(logit_all, logged.order, axis=1)
    q_hat = np.empty_like(logit_all)
    for f in (0, 1):
        train = fold != f
        coef = fit_click_model(shown_logit[train].ravel(), logged.reward[train].ravel())
        q_hat[fold == f] = 1.0 / (1.0 + np.exp(-(coef[0] + coef[1] * logit_all[fold == f])))
    return q_hat


def estimate_run(
    env: Environment,
    logged: Logged,
    logging_marg: FloatArray,
    target_margs: tuple[FloatArray, ...],
    rng: np.random.Generator,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(estimates, CI lows, CI highs), each (targets, variants), 95 % normal intervals over decisions."""
    n, k = logged.order.shape
    q_hat = reward_model(env, logged, rng)
    reward_hat = np.take_along_axis(q_hat, logged.order, axis=1)
    slot = np.arange(k)[None, :]
    log_marg = logging_marg[logged.customer[:, None], slot, logged.order]
    shape = (len(target_margs), len(VARIANTS))
    est, low, high = np.empty(shape), np.empty(shape), np.empty(shape)
    for t, marg in enumerate(target_margs):
        target_hat = np.einsum("nkm,nm->nk", marg[logged.customer], q_hat)
        common = {"reward_hat": reward_hat, "target_reward_hat": target_hat, "shown": np.ones((n, k), np.bool_)}
        marginal = ope.SlateLog(logged.reward, log_marg, marg[logged.customer[:, None], slot, logged.order], **common)
        conditional = ope.SlateLog(logged.reward, logged.logging_cond, logged.target_cond[t], **common)
        cases: list[tuple[ope.SlateLog, ope._Estimator]] = []
        for cls in (ope.InverseProbabilityWeighting, ope.SelfNormalizedInverseProbabilityWeighting):
            cases += [(marginal, cls()), (conditional, cls(weighting="cascade")), (conditional, cls())]
        cases.append((marginal, ope.DirectMethod()))
        cases += [
            (marginal, ope.DoublyRobust()),
            (conditional, ope.DoublyRobust(weighting="cascade")),
            (conditional, ope.DoublyRobust()),
        ]
        for v, (data, estimator) in enumerate(cases):
            interval = estimator.estimate_interval(data)
            est[t, v], low[t, v], high[t, v] = interval.estimate, interval.low, interval.high
    return est, low, high


@dataclass(frozen=True)
class SimResult:
    truth: FloatArray  # (targets,)
    logging_value: float
    estimates: FloatArray  # (runs, targets, variants)
    lows: FloatArray
    highs: FloatArray
    setup_s: float
    runs_s: float


def run_simulation(spec: SimSpec, seed: int, console: Console, shop: Path | None = None) -> SimResult:
    import time

    started = time.perf_counter()
    with console.status("building the environment: shop truth, pools, the policies' slot probabilities"):
        env = make_environment(shop_truth(spec, seed, shop), spec, seed)
        rng = np.random.default_rng([seed, 1])
        logging_marg = slot_marginals(spec.logging, env.scores, spec.slots, rng)
        target_margs = tuple(slot_marginals(p, env.scores, spec.slots, rng) for _, p in spec.targets)

    def value(marg: FloatArray) -> float:
        return float(np.einsum("ckm,cm->", marg, env.p_click) / len(env.p_click))

    truth = np.asarray([value(m) for m in target_margs])
    setup_s = time.perf_counter() - started
    shape = (spec.runs, len(spec.targets), len(VARIANTS))
    est, low, high = np.empty(shape), np.empty(shape), np.empty(shape)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{spec.runs} runs × {spec.decisions:,} decisions", total=spec.runs)
        for r in range(spec.runs):
            rng = np.random.default_rng([seed, 2, r])
            logged = log_decisions(env, spec, rng)
            est[r], low[r], high[r] = estimate_run(env, logged, logging_marg, target_margs, rng)
            bar.advance(task)
    return SimResult(truth, value(logging_marg), est, low, high, setup_s, time.perf_counter() - started - setup_s)


# ------------------------------------------------------------------------------ report


def add_to_report(report: Report, spec: SimSpec, result: SimResult) -> None:
    truth = result.truth[None, :, None]
    err = result.estimates - truth
    covered = (result.lows <= truth) & (truth <= result.highs)
    width = result.highs - result.lows
    rows: list[list[object]] = []
    for t, (label, _) in enumerate(spec.targets):
        for v, (estimator, weights) in enumerate(VARIANTS):
            e = err[:, t, v]
            ok = np.isfinite(e)
            rows.append(
                [
                    label,
                    estimator,
                    weights,
                    round(float(result.truth[t]), 4),
                    round(float(np.mean(e[ok])), 4) if ok.any() else None,
                    round(float(np.sqrt(np.mean(e[ok] ** 2))), 4) if ok.any() else None,
                    round(float(np.mean(covered[ok, t, v])), 2) if ok.any() else None,
                    round(float(np.median(width[ok, t, v])), 4) if ok.any() else None,
                    int((~ok).sum()),
                ]
            )
    report.add_table(
        f"Bias, RMSE and 95 % CI coverage over {spec.runs} runs of {spec.decisions:,} logged decisions",
        ["target", "estimator", "weights", "true value", "bias", "RMSE", "coverage", "median CI width", "no estimate"],
        rows,
        note=f"value = expected clicks per decision over {spec.slots} slots; logging policy "
        f"{_name(spec.logging)} (true value {result.logging_value:.4f}). Bias = mean(estimate - truth); "
        "coverage = share of runs whose normal 95 % interval (over decisions) holds the truth; 'no estimate': "
        "runs where SNIPS had no non-zero weight at some slot.",
    )
    report.add_text(
        "Weights: 'marginal' (item-position model) divides the target's marginal probability of the item at "
        "that slot by the logging policy's (unbiased under the item-position model, which the generator's truth "
        "satisfies: no position effect). 'cascade' multiplies the per-slot conditional ratios the decision log "
        "holds along the slate (unbiased with no assumption on later slots). 'per-slot' uses the logged "
        "conditional ratio of each row alone, as `shown.target_propensity / shown.propensity` does: it estimates "
        "a hybrid policy (the logging policy's slots above, the target's slot) and is biased beyond slot 1. "
        "DM's interval covers its sampling noise only, not the reward model's bias."
    )
    fig = Figure(figsize=(12, 3.2 * math.ceil(len(spec.targets) / 2)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(spec.targets) / 2), 2, squeeze=False)).ravel()
    short = [f"{e} {w}" for e, w in VARIANTS]
    for t, (label, _) in enumerate(spec.targets):
        ax = axes[t]
        data = [err[np.isfinite(err[:, t, v]), t, v] for v in range(len(VARIANTS))]
        ax.boxplot(data, tick_labels=short, showfliers=True, flierprops={"markersize": 2})
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"target {label} (true value {result.truth[t]:.3f})")
        ax.set_ylabel("estimate - truth")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    for ax in axes[len(spec.targets) :]:
        ax.set_visible(False)
    report.add_figure(fig, "ope_errors.png", f"Error of each estimator over {spec.runs} runs, per target policy")
    report.add_text(
        f"Timing: environment and exact slot probabilities {result.setup_s:.1f} s; {spec.runs} runs "
        f"{result.runs_s:.1f} s ({result.runs_s / spec.runs:.2f} s per run of {spec.decisions:,} decisions, "
        f"{len(spec.targets)} targets). Thompson's slot probabilities are Monte Carlo estimates "
        f"({THOMPSON_MC_SLATES} slates per customer): the truth's Monte Carlo standard error is at most "
        f"{spec.slots / 2 / math.sqrt(THOMPSON_MC_SLATES * spec.customers):.4f} (a slate's value lies in "
        f"[0, {spec.slots}])."
    )


def _name(policy: Exploration) -> str:
    params = ", ".join(f"{k}={v}" for k, v in policy.params().items() if k != "pool")
    return f"{policy.policy}({params})"
