"""The classical baselines of `nextbest bench ltv`: BG/NBD + Gamma-Gamma, fitted by maximum likelihood, and the
naive past average; and the check of that fit against the published CDNOW parameters.

BG/NBD (Fader, Hardie & Lee 2005, "Counting your customers the easy way") and Gamma-Gamma (Fader, Hardie & Lee
2005, "RFM and CLV"; Fader & Hardie 2013 note) are written out here from their closed forms with scipy rather
than taken from a library: `lifetimes` is unmaintained since 2020, `btyd` since 2022, and `pymc-marketing`
(maintained) supports Python 3.11 only up to 0.19.x, brings pymc, pytensor, numba and about 25 other packages,
compiles C at first use and, fitted by MAP, returns its priors' estimates rather than the published maximum
likelihood ones. The fit here reproduces the published CDNOW parameters (`published_cdnow_check`).

Time is in weeks; the inputs are `benchmarks.ltv_data.CalibrationSummary` (x, t_x, T, z̄ per customer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import optimize, special

from benchmarks.ltv_data import CalibrationSummary, read_cdnow, summarise
from benchmarks.public_data import CDNOW, PublicDataset, fetch

F64 = npt.NDArray[np.float64]
# Fader & Hardie's own 1/10 CDNOW sample and its calibration summary ship in the same lifetimes wheel.
CDNOW_SAMPLE = PublicDataset(
    name="CDNOW 1/10 sample and its 39-week summary (Fader & Hardie, in the lifetimes wheel)",
    package=CDNOW.package,
    version=CDNOW.version,
    wheel_sha256=CDNOW.wheel_sha256,
    members={
        "lifetimes/datasets/CDNOW_sample.txt": "6fae10155c0b0ba363c2c386e30f77990d22328220efd862a5edd1443420d94a",
        "lifetimes/datasets/cdnow_customers_summary_with_transactions.csv": (
            "7ddd11b55be3227edfc1d58675154e96971b0de3ad37ddd9280d1dba154b8b2f"
        ),
    },
)
PUBLISHED_BGNBD = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426, "log_likelihood": -9582.4}  # FHL 2005
PUBLISHED_GG = {"p": 6.25, "q": 3.74, "gamma": 15.44}  # Fader, Hardie & Lee 2005, "RFM and CLV"
CDNOW_CALIBRATION_END = 875_664_000  # 1997-10-01T00:00Z: 39 weeks after 1997-01-01
INFEASIBLE = 1e300  # the negative log-likelihood where parameters overflow it: the optimiser steps back


def _fit(nll: Callable[[F64], float], start: F64) -> tuple[F64, float]:
    """Minimise a negative log-likelihood over log-parameters (so they stay positive); (parameters, max LL)."""
    result = optimize.minimize(nll, np.log(start), method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-7})
    polished = optimize.minimize(nll, result.x, method="L-BFGS-B")
    best = polished if polished.success and polished.fun <= result.fun else result
    if not best.fun < INFEASIBLE:
        raise RuntimeError(f"maximum likelihood fit failed: {best.message}")
    return np.exp(best.x), float(-best.fun)


@dataclass(frozen=True)
class BgNbd:
    """Purchase rate λ ~ Gamma(r, α) while alive; after each purchase the customer drops out with p ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float
    log_likelihood: float = float("nan")

    @staticmethod
    def log_likelihood_of(params: F64, x: F64, t_x: F64, T: F64) -> F64:  # noqa: N803
        """Each customer's log-likelihood (FHL 2005, eq. 6) at params = (r, α, a, b)."""
        r, alpha, a, b = params
        head = (
            special.gammaln(r + x)
            - special.gammaln(r)
            + r * np.log(alpha)
            + special.betaln(a, b + x)
            - special.betaln(a, b)
        )
        still = -(r + x) * np.log(alpha + T)
        gone = np.log(a) - np.log(np.maximum(b + x - 1.0, 1e-300)) - (r + x) * np.log(alpha + t_x)
        return np.asarray(head + np.where(x > 0, np.logaddexp(still, gone), still), dtype=np.float64)

    @classmethod
    def fit(cls, x: F64, t_x: F64, T: F64) -> BgNbd:  # noqa: N803
        def nll(log_params: F64) -> float:
            value = -float(cls.log_likelihood_of(np.exp(log_params), x, t_x, T).sum())
            return value if np.isfinite(value) else INFEASIBLE

        params, ll = _fit(nll, np.array([1.0, max(float(np.mean(T)), 1.0), 1.0, 1.0]))
        r, alpha, a, b = map(float, params)
        return cls(r, alpha, a, b, log_likelihood=ll)

    def expected_purchases(self, t: float, x: F64, t_x: F64, T: F64) -> F64:  # noqa: N803
        """E[purchases in (T, T + t] | x, t_x, T] (FHL 2005, eq. 10)."""
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1.0, t / (alpha + T + t))
        tail = 1.0 - np.exp((r + x) * np.log((alpha + T) / (alpha + T + t))) * hyp
        alive_odds = np.where(
            x > 0, a / np.maximum(b + x - 1.0, 1e-300) * ((alpha + T) / (alpha + t_x)) ** (r + x), 0.0
        )
        return np.asarray((a + b + x - 1.0) / (a - 1.0) * tail / (1.0 + alive_odds), dtype=np.float64)


@dataclass(frozen=True)
class GammaGamma:
    """Spend per purchase ~ Gamma(p, ν) around each customer's mean; ν ~ Gamma(q, γ) across customers."""

    p: float
    q: float
    gamma: float
    log_likelihood: float = float("nan")

    @staticmethod
    def log_likelihood_of(params: F64, x: F64, zbar: F64) -> F64:
        """Each repeat customer's log-likelihood of its mean spend z̄ over x purchases (x > 0, z̄ > 0)."""
        p, q, g = params
        px = p * x
        return np.asarray(
            special.gammaln(px + q)
            - special.gammaln(px)
            - special.gammaln(q)
            + q * np.log(g)
            + (px - 1.0) * np.log(zbar)
            + px * np.log(x)
            - (px + q) * np.log(g + x * zbar),
            dtype=np.float64,
        )

    @classmethod
    def fit(cls, x: F64, zbar: F64) -> GammaGamma:
        """Fit on the customers with repeat purchases of positive mean value (the others carry no information)."""
        keep = (x > 0) & (zbar > 0)
        if keep.sum() < 3:
            raise ValueError(f"Gamma-Gamma needs repeat customers with spend; found {int(keep.sum())}")
        xs, zs = x[keep], zbar[keep]

        def nll(log_params: F64) -> float:
            value = -float(cls.log_likelihood_of(np.exp(log_params), xs, zs).sum())
            return value if np.isfinite(value) else INFEASIBLE

        params, ll = _fit(nll, np.array([1.0, 2.0, float(np.mean(zs))]))
        p, q, gamma = map(float, params)
        return cls(p, q, gamma, log_likelihood=ll)

    def expected_spend(self, x: F64, zbar: F64) -> F64:
        """E[spend per purchase | x, z̄]: the population mean pγ/(q − 1) shrunk toward z̄ as x grows."""
        return np.asarray(self.p * (self.gamma + x * zbar) / (self.p * x + self.q - 1.0), dtype=np.float64)


def bgnbd_gamma_gamma(summary: CalibrationSummary, holdout_weeks: float) -> tuple[F64, BgNbd, GammaGamma]:
    """Expected holdout spend = E[purchase days in the holdout] × E[spend per purchase day], and the fits."""
    bg = BgNbd.fit(summary.x, summary.t_x, summary.T)
    gg = GammaGamma.fit(summary.x, summary.zbar)
    purchases = bg.expected_purchases(holdout_weeks, summary.x, summary.t_x, summary.T)
    return purchases * gg.expected_spend(summary.x, summary.zbar), bg, gg


def past_average(summary: CalibrationSummary, calibration_weeks: float, holdout_weeks: float) -> F64:
    """Calibration spend per week of the calibration period × the holdout's weeks."""
    return np.asarray(summary.spend / calibration_weeks * holdout_weeks, dtype=np.float64)


@dataclass(frozen=True)
class PublishedCheck:
    rows: list[list[object]]  # model, parameter, fitted here, published
    summary_diff: dict[str, float]  # largest |ours − theirs| of x, t_x, T, z̄ over the sample's customers
    customers: int
    paths: tuple[Path, Path]  # the sample's transactions, their summary


def published_cdnow_check() -> PublishedCheck:
    """Fit both models on Fader & Hardie's 2,357-customer summary and compare with the published estimates; and
    summarise the sample's transactions here to compare with their summary (the data preparation)."""
    fh_path = fetch(CDNOW_SAMPLE, "cdnow_customers_summary_with_transactions.csv")
    sample_path = fetch(CDNOW_SAMPLE, "CDNOW_sample.txt")
    fh = pd.read_csv(fh_path).sort_values("ID", ignore_index=True)
    x, t_x, T, zbar = (fh[c].to_numpy(dtype=np.float64) for c in ("x", "t_x", "T", "zbar"))  # noqa: N806
    fits = (
        ("BG/NBD", asdict(BgNbd.fit(x, t_x, T)), PUBLISHED_BGNBD),
        ("Gamma-Gamma", asdict(GammaGamma.fit(x, zbar)), PUBLISHED_GG),
    )
    rows: list[list[object]] = [
        [model, name, f"{fitted[name]:.{1 if name == 'log_likelihood' else 3}f}", f"{value:g}"]
        for model, fitted, published in fits
        for name, value in published.items()
    ]
    ours = summarise(read_cdnow(sample_path, sample=True), CDNOW_CALIBRATION_END)
    order = np.argsort(ours.customer_id.astype(np.int64))  # ours is sorted as text, theirs by number
    diff = {k: float(np.max(np.abs(getattr(ours, k)[order] - fh[k].to_numpy()))) for k in ("x", "t_x", "T", "zbar")}
    return PublishedCheck(rows, diff, len(fh), (sample_path, fh_path))
