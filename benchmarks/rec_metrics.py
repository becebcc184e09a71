"""Top-k metrics per user, catalog coverage, and bootstrap confidence intervals that resample users.

Every model of one evaluation is measured on the same resampled user sets (same seed), so differences
between models get paired intervals too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from training.metrics import hit_rate_at_k, ndcg_at_k, recall_at_k

F64 = npt.NDArray[np.float64]
METRICS = ("recall", "ndcg", "hit")  # per-user means; coverage is a property of the whole list set


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def per_user(lists: Sequence[Sequence[str]], truths: Sequence[set[str]], k: int) -> dict[str, F64]:
    """recall@k, NDCG@k (binary gains) and hit@k of each user, in user order."""
    pairs = list(zip(lists, truths, strict=True))
    return {
        "recall": np.array([recall_at_k(r, t, k) for r, t in pairs], dtype=np.float64),
        "ndcg": np.array([ndcg_at_k(r, t, k) for r, t in pairs], dtype=np.float64),
        "hit": np.array([hit_rate_at_k(r, t, k) for r, t in pairs], dtype=np.float64),
    }


def catalog_coverage(lists: Sequence[Sequence[str]], k: int, catalog_size: int) -> float:
    """Share of the catalog that appears in at least one user's top k."""
    if catalog_size <= 0:
        raise ValueError("catalog_size must be positive")
    return len({i for r in lists for i in r[:k]}) / catalog_size


def recommended_matrix(lists: Sequence[Sequence[str]], k: int, catalog: Sequence[str]) -> sp.csr_matrix:
    """Users × catalog indicator of the top-k items (items outside the catalog are ignored)."""
    pos = {item: n for n, item in enumerate(catalog)}
    rows, cols = [], []
    for u, recs in enumerate(lists):
        for item in dict.fromkeys(recs[:k]):
            if (c := pos.get(item)) is not None:
                rows.append(u)
                cols.append(c)
    data = np.ones(len(rows), dtype=np.float32)
    return sp.csr_matrix((data, (rows, cols)), shape=(len(lists), len(catalog)))


@dataclass(frozen=True)
class Bootstrap:
    """`resamples` user sets drawn with replacement, regenerated identically (seeded) for every statistic."""

    n_users: int
    resamples: int
    seed: int
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.resamples < 1:
            raise ValueError("a bootstrap needs at least one user and one resample")
        if not 0 < self.level < 1:
            raise ValueError("level must be in (0, 1)")

    def _chunks(self) -> Iterator[npt.NDArray[np.int64]]:
        rng = np.random.default_rng(self.seed)
        step = max(1, 2_000_000 // self.n_users)  # bounds memory at ~16 MB of indices whatever the user count
        for start in range(0, self.resamples, step):
            yield rng.integers(0, self.n_users, size=(min(step, self.resamples - start), self.n_users))

    def _quantiles(self, boot: F64) -> tuple[float, float]:
        tail = (1 - self.level) / 2
        lo, hi = np.quantile(boot, [tail, 1 - tail])
        return float(lo), float(hi)

    def mean(self, values: F64) -> Estimate:
        """Percentile interval of the mean over users."""
        if len(values) != self.n_users:
            raise ValueError(f"{len(values)} values for a bootstrap over {self.n_users} users")
        boot = np.concatenate([values[idx].mean(axis=1) for idx in self._chunks()])
        lo, hi = self._quantiles(boot)
        return Estimate(float(values.mean()), lo, hi)

    def coverage(self, recommended: sp.csr_matrix) -> Estimate:
        """Catalog coverage with the bootstrap's spread around the point estimate.

        A resample repeats users, so it holds only ~63 % distinct ones and its coverage is biased low (it
        can never exceed the full set's). The percentile interval is therefore shifted by the bootstrap
        bias (mean of the resamples minus the estimate): the spread is the bootstrap's, the centre is the estimate.
        """
        n_users, n_items = recommended.shape
        if n_users != self.n_users:
            raise ValueError(f"{n_users} users' lists for a bootstrap over {self.n_users} users")
        point = float(np.count_nonzero(recommended.getnnz(axis=0))) / n_items
        boot = []
        for idx in self._chunks():
            c, n = idx.shape
            counts = sp.csr_matrix(
                (np.ones(c * n, dtype=np.float32), (np.repeat(np.arange(c), n), idx.ravel())), shape=(c, n)
            )
            covered = (counts @ recommended).getnnz(axis=1)
            boot.append(covered / n_items)
        values = np.concatenate(boot)
        lo, hi = self._quantiles(values)
        bias = float(values.mean()) - point
        # min/max: with few distinct values (e.g. one list for everyone) the shifted quantiles can miss it.
        return Estimate(point, max(0.0, min(point, lo - bias)), min(1.0, max(point, hi - bias)))
