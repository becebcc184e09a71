"""Off-policy estimators: the value of a target policy, from decisions another policy made and logged.

A decision shows a slate of up to K items; the data are decisions × positions matrices (`SlateLog`): the reward
of each shown item, the logging policy's probability of it, the target policy's probability of it, and, for the
model-based estimators, a reward model's predictions. The policy value is the expected total reward of one
decision (e.g. clicks per decision, summed over its slots) under the target policy.

Slates are handled per (decision, position), with one of two models of the reward (`Weighting`):

- ``item_position``: the reward of the item at position j depends only on the context, that item and j (the
  "independent" or item-position model, Li et al. 2018). The weight of a shown item is
  π(item at j | context) / μ(item at j | context), where both probabilities are the *marginal* probabilities of
  that item at that position. This is the lowest-variance unbiased choice, but the policies' marginals are
  not in our decision log: it logs the probability of each slot *given the slots above* (conditional). Fed
  conditionals, the item-position weights estimate a hybrid policy (the logging policy's slots above, the
  target's slot j) and are biased beyond slot 1; `bench ope` measures how much.
- ``cascade``: the reward at position j may depend on the items at positions 1..j (weaker than independence).
  The weight is the product of the per-slot conditional ratios over positions 1..j, i.e. the ratio of the
  probabilities of the whole prefix: exactly what our log's conditional propensities give, unbiased, with a
  variance that grows with the depth (Kiyohara et al. 2022's cascade model, used here without their control
  variate).

Intervals: the normal approximation on per-*decision* contributions (the slots of one decision share a context
and are not independent; the ratio estimator SNIPS uses the delta method), or a percentile bootstrap that
resamples decisions. Both assume decisions are independent. Estimators follow st-tech/zr-obp's
`obp/ope/estimators.py`: one small frozen dataclass each, with `estimate_policy_value` and `estimate_interval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

Weighting = Literal["item_position", "cascade"]
WEIGHTINGS: tuple[Weighting, ...] = ("item_position", "cascade")
IntervalMethod = Literal["normal", "bootstrap"]


@dataclass(frozen=True)
class SlateLog:
    """Logged bandit feedback as (decisions, K) matrices; `shown` marks the cells that hold a logged row.

    `reward_hat` is the reward model's prediction for the logged item at its position; `target_reward_hat` is
    the model's expected reward at that decision and position under the target policy, E_{a~π(·|x, j)} q̂(x,a,j).
    The target is evaluated on the same slots as were logged. Cells that were not shown are ignored.
    """

    reward: FloatArray
    logging_prob: FloatArray
    target_prob: FloatArray
    shown: BoolArray
    reward_hat: FloatArray | None = None
    target_reward_hat: FloatArray | None = None

    def __post_init__(self) -> None:
        shape = self.shown.shape
        if len(shape) != 2 or shape[0] == 0:
            raise ValueError(f"a slate log needs a (decisions, positions) matrix with decisions, got shape {shape}")
        named = {"reward": self.reward, "logging_prob": self.logging_prob, "target_prob": self.target_prob}
        if self.reward_hat is not None:
            named["reward_hat"] = self.reward_hat
        if self.target_reward_hat is not None:
            named["target_reward_hat"] = self.target_reward_hat
        for name, values in named.items():
            if values.shape != shape:
                raise ValueError(f"{name} has shape {values.shape}, expected {shape}")
            bad = self.shown & ~np.isfinite(values)
            if bad.any():
                d, j = np.argwhere(bad)[0]
                raise ValueError(f"{name} is not a finite number at decision {d}, position {j + 1}")
        _check_range(self.logging_prob, self.shown, "logging_prob", low_open=True)
        _check_range(self.target_prob, self.shown, "target_prob", low_open=False)

    @property
    def n_decisions(self) -> int:
        return int(self.shown.shape[0])

    @classmethod
    def from_rows(
        cls,
        decision: npt.ArrayLike,
        position: npt.ArrayLike,
        reward: npt.ArrayLike,
        logging_prob: npt.ArrayLike,
        target_prob: npt.ArrayLike,
        reward_hat: npt.ArrayLike | None = None,
        target_reward_hat: npt.ArrayLike | None = None,
    ) -> SlateLog:
        """Build the matrices from one row per shown item: decision key (any values), 1-based position, ..."""
        keys = np.asarray(decision)
        pos = np.asarray(position, dtype=np.int64)
        if keys.ndim != 1 or pos.shape != keys.shape or len(keys) == 0:
            raise ValueError("decision and position must be 1-d arrays of the same, non-zero length")
        if (pos < 1).any():
            raise ValueError(f"position must be >= 1 (1-based), got {int(pos.min())} at row {int(np.argmin(pos))}")
        _, d = np.unique(keys, return_inverse=True)
        n, k = int(d.max()) + 1, int(pos.max())
        cell = d * k + (pos - 1)
        uniq, counts = np.unique(cell, return_counts=True)
        if (counts > 1).any():
            dup = np.flatnonzero(cell == uniq[np.argmax(counts > 1)])
            raise ValueError(f"rows {int(dup[0])} and {int(dup[1])} are the same decision and position")

        def matrix(values: npt.ArrayLike, fill: float) -> FloatArray:
            v = np.asarray(values, dtype=np.float64)
            if v.shape != keys.shape:
                raise ValueError(f"every column needs {len(keys)} rows, got {v.shape}")
            out = np.full(n * k, fill, dtype=np.float64)
            out[cell] = v
            return out.reshape(n, k)

        shown = np.zeros(n * k, dtype=np.bool_)
        shown[cell] = True
        return cls(
            reward=matrix(reward, 0.0),
            logging_prob=matrix(logging_prob, 1.0),
            target_prob=matrix(target_prob, 0.0),
            shown=shown.reshape(n, k),
            reward_hat=None if reward_hat is None else matrix(reward_hat, 0.0),
            target_reward_hat=None if target_reward_hat is None else matrix(target_reward_hat, 0.0),
        )


def _check_range(values: FloatArray, shown: BoolArray, name: str, *, low_open: bool) -> None:
    low_bad = values <= 0 if low_open else values < 0
    bad = shown & (low_bad | (values > 1.0 + 1e-9))
    if bad.any():
        d, j = np.argwhere(bad)[0]
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} {values[d, j]!r} at decision {d}, position {j + 1} is outside {interval}")


def importance_weights(log: SlateLog, weighting: Weighting, max_weight: float | None = None) -> FloatArray:
    """Per-cell weights under the chosen slate model (see the module docstring); 0 where nothing was shown.

    `max_weight` clips every weight from above (less variance, a bias towards the logging policy).
    """
    ratio = np.where(log.shown, log.target_prob / log.logging_prob, 0.0)
    if weighting == "cascade":
        gap = log.shown[:, 1:] & ~log.shown[:, :-1]
        if gap.any():
            d, j = np.argwhere(gap)[0]
            raise ValueError(f"cascade weights need positions 1..j: decision {d} has position {j + 2} but not {j + 1}")
        ratio = np.cumprod(ratio, axis=1)
    elif weighting != "item_position":
        raise ValueError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    if max_weight is not None:
        if not max_weight > 0:
            raise ValueError(f"max_weight must be > 0, got {max_weight}")
        ratio = np.minimum(ratio, max_weight)
    return ratio


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    std_error: float
    method: IntervalMethod
    alpha: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class _Estimator:
    """V = Σ_j S_j · mean_d(A_dj) / mean_d(B_dj): a plain mean when B ≡ 1, self-normalised otherwise."""

    name = ""

    def _terms(self, log: SlateLog) -> tuple[FloatArray, FloatArray | None]:
        """(A, B) per decision and position; B None means B ≡ 1."""
        raise NotImplementedError

    def estimate_policy_value(self, log: SlateLog) -> float:
        """Expected total reward per decision under the target policy (NaN if a self-normaliser is all 0)."""
        a, b = self._terms(log)
        return float(_combine(log, a.mean(axis=0), None if b is None else b.mean(axis=0)))

    def estimate_interval(
        self,
        log: SlateLog,
        alpha: float = 0.05,
        method: IntervalMethod = "normal",
        n_bootstrap: int = 1000,
        seed: int = 0,
    ) -> Interval:
        """A 1 - alpha confidence interval: normal approximation over decisions, or a percentile bootstrap."""
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        a, b = self._terms(log)
        n = log.n_decisions
        estimate = float(_combine(log, a.mean(axis=0), None if b is None else b.mean(axis=0)))
        if method == "normal":
            if b is None:
                influence = a.sum(axis=1)
            else:
                a_bar, b_bar = a.mean(axis=0), b.mean(axis=0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    per_pos = a_bar / b_bar
                    influence = (_scale(log) * (a - per_pos * b) / b_bar).sum(axis=1)
            se = float(np.std(influence, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            z = NormalDist().inv_cdf(1 - alpha / 2)
            return Interval(estimate, estimate - z * se, estimate + z * se, se, method, alpha)
        if method != "bootstrap":
            raise ValueError(f"unknown interval method {method!r}; use normal or bootstrap")
        rng = np.random.default_rng(seed)
        values = np.empty(n_bootstrap, dtype=np.float64)
        chunk = max(1, min(n_bootstrap, 2_000_000 // max(n, 1)))
        for start in range(0, n_bootstrap, chunk):
            m = min(chunk, n_bootstrap - start)
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64) / n
            values[start : start + m] = _combine(log, counts @ a, None if b is None else counts @ b)
        low, high = np.nanquantile(values, [alpha / 2, 1 - alpha / 2])
        return Interval(estimate, float(low), float(high), float(np.nanstd(values, ddof=1)), method, alpha)


def _scale(log: SlateLog) -> FloatArray:
    """S_j: the share of decisions that filled slot j (the self-normalised mean is per filled slot)."""
    return np.asarray(log.shown.mean(axis=0), dtype=np.float64)


def _combine(log: SlateLog, a_bar: FloatArray, b_bar: FloatArray | None) -> FloatArray:
    """Σ_j over the last axis; a_bar is (K,) or (bootstraps, K)."""
    if b_bar is None:
        return np.asarray(a_bar.sum(axis=-1), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_pos = np.where(_scale(log) > 0, _scale(log) * a_bar / b_bar, 0.0)
    return np.asarray(per_pos.sum(axis=-1), dtype=np.float64)


def _model_terms(log: SlateLog, who: str) -> tuple[FloatArray, FloatArray]:
    if log.reward_hat is None or log.target_reward_hat is None:
        raise ValueError(f"{who} needs reward-model predictions: reward_hat and target_reward_hat")
    return log.reward_hat, log.target_reward_hat


@dataclass(frozen=True)
class InverseProbabilityWeighting(_Estimator):
    """IPS: Σ_j w_j r_j per decision, averaged. Unbiased under full support of the logging policy."""

    weighting: Weighting = "item_position"
    max_weight: float | None = None
    name = "IPS"

    def _terms(self, log: SlateLog) -> tuple[FloatArray, FloatArray | None]:
        return importance_weights(log, self.weighting, self.max_weight) * log.reward, None


@dataclass(frozen=True)
class SelfNormalizedInverseProbabilityWeighting(_Estimator):
    """SNIPS: per position Σ w r / Σ w (times the share of decisions filling it). Biased, bounded, consistent."""

    weighting: Weighting = "item_position"
    max_weight: float | None = None
    name = "SNIPS"

    def _terms(self, log: SlateLog) -> tuple[FloatArray, FloatArray | None]:
        w = importance_weights(log, self.weighting, self.max_weight)
        return w * log.reward, w


@dataclass(frozen=True)
class DirectMethod(_Estimator):
    """DM: Σ_j E_π[q̂] per decision, from the reward model alone (biased as the model is; no weights)."""

    name = "DM"

    def _terms(self, log: SlateLog) -> tuple[FloatArray, FloatArray | None]:
        _, target_hat = _model_terms(log, "DirectMethod")
        return np.where(log.shown, target_hat, 0.0), None


@dataclass(frozen=True)
class DoublyRobust(_Estimator):
    """DR: Σ_j (E_π[q̂] + w_j (r_j - q̂(a_j))) per decision. Unbiased if the weights are right or q̂ is exact.

    With cascade weights the correction at slot j uses the prefix weight, which stays unbiased because q̂
    depends on (context, item, position) only and E_π[q̂] is the target's own expectation at that slot.
    """

    weighting: Weighting = "item_position"
    max_weight: float | None = None
    name = "DR"

    def _terms(self, log: SlateLog) -> tuple[FloatArray, FloatArray | None]:
        hat, target_hat = _model_terms(log, "DoublyRobust")
        w = importance_weights(log, self.weighting, self.max_weight)
        return np.where(log.shown, target_hat + w * (log.reward - hat), 0.0), None
