"""Interaction data for the recommendation benchmark: the shop's events, MovieLens 100K, a user's
`user_id,item_id,timestamp[,weight]` CSV (validated with file, line and column), and the two time splits
(one global cut; each user's own last interactions)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from engine.types import SECONDS_PER_DAY
from training.als import EVENT_WEIGHT
from training.datafiles import MAX_ID_LEN, DataError

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_COLUMNS = ("weight",)
FRAME_COLUMNS = ("customer_id", "item_id", "type", "timestamp", "weight", "positive")


@dataclass(frozen=True)
class RecData:
    """Interactions sorted by time: customer_id, item_id, type, timestamp (unix s), weight, positive.

    `event_types`: `type` holds shop event types, so ALS weights them exactly as `nextbest train` does;
    otherwise `weight` is the interaction's own weight. `positive` marks what the benchmark predicts.
    """

    name: str
    frame: pd.DataFrame
    event_types: bool
    positive_label: str  # "purchase", "rating", "interaction": what a test positive is, for the report
    source: Path | None = None


SplitKind = Literal["global", "per-user"]
SPLIT_KINDS: tuple[SplitKind, ...] = ("global", "per-user")


@dataclass(frozen=True)
class Split:
    """`global`: train is strictly before `cut`, test at or after it. `per-user`: each user's own last
    interactions are the test set; `cut` is then one second after the last training interaction, the
    "now" of time decay and popularity windows (the moment the model would have been trained)."""

    cut: int  # unix seconds
    train: pd.DataFrame
    test: pd.DataFrame
    kind: SplitKind = "global"


def _frame(users: object, items: object, types: object, ts: object, weight: object, positive: object) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "customer_id": pd.Series(users, dtype=str).to_numpy(dtype=object),
            "item_id": pd.Series(items, dtype=str).to_numpy(dtype=object),
            "type": pd.Series(types, dtype=str).to_numpy(dtype=object),
            "timestamp": np.asarray(ts, dtype=np.int64),
            "weight": np.asarray(weight, dtype=np.float32),
            "positive": np.asarray(positive, dtype=bool),
        }
    )
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def shop_events(events: pd.DataFrame, name: str, source: Path | None = None) -> RecData:
    """The shop's validated events (`training.datafiles` frame): every weighted item event trains the
    models; purchases are what the benchmark predicts."""
    weight = events["type"].map(EVENT_WEIGHT).fillna(0.0).to_numpy(dtype=np.float32)
    keep = (weight > 0) & (events["item_id"] != "").to_numpy()
    e = events[keep]
    positive = (e["type"] == "purchase").to_numpy()
    if not positive.any():
        raise DataError(source or Path(name), None, "type", "no purchase events: the benchmark predicts purchases")
    return RecData(
        name,
        _frame(e["customer_id"], e["item_id"], e["type"], e["timestamp"], weight[keep], positive),
        True,
        "purchase",
        source,
    )


def movielens(path: Path, min_rating: float = 0.0) -> RecData:
    """MovieLens 100K as RecBole ships it (tab-separated, typed header): each rating of at least
    `min_rating` is one implicit interaction of weight 1."""
    df = pd.read_csv(path, sep="\t", dtype=str)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    rating = df["rating"].astype(float).to_numpy()
    df = df[rating >= min_rating]
    ts = df["timestamp"].astype(float).to_numpy().astype(np.int64)
    n = len(df)
    return RecData(
        "MovieLens 100K",
        _frame(df["user_id"], df["item_id"], ["rating"] * n, ts, np.ones(n), np.ones(n, dtype=bool)),
        False,
        "rating",
        path,
    )


def _first(bad: npt.NDArray[np.bool_]) -> int | None:
    rows = np.flatnonzero(bad)
    return int(rows[0]) if len(rows) else None


def load_interactions(path: Path) -> RecData:
    """A `user_id,item_id,timestamp[,weight]` CSV; timestamps as unix seconds or ISO-8601, weight > 0
    (default 1). The first bad row is reported with file, line and column; nothing is used then."""
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise DataError(path, None, None, f"not valid UTF-8 at byte {exc.start + 1}") from exc
    except csv.Error as exc:
        raise DataError(path, None, None, f"cannot be parsed as CSV: {exc}") from exc
    if not rows:
        raise DataError(path, 1, None, "empty file: expected a header user_id,item_id,timestamp[,weight]")
    header = [c.strip() for c in rows[0]]
    for name in INTERACTION_COLUMNS:
        if name not in header:
            raise DataError(path, 1, name, f"required column missing (have: {', '.join(header)})")
    unknown = [c for c in header if c not in INTERACTION_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise DataError(path, 1, unknown[0], "unknown column (expected user_id, item_id, timestamp, weight)")
    if len(set(header)) != len(header):
        raise DataError(path, 1, None, "a column name appears twice")
    body = rows[1:]
    for lineno, row in enumerate(body, start=2):
        if len(row) != len(header):
            col = header[len(row)] if len(row) < len(header) else None
            raise DataError(path, lineno, col, f"expected {len(header)} fields, found {len(row)}")
    if not body:
        raise DataError(path, 2, None, "no interactions after the header")
    cols = {name: pd.Series([r[header.index(name)].strip() for r in body], dtype=object) for name in header}
    errors: list[tuple[int, str, str]] = []

    def check(bad: npt.NDArray[np.bool_], column: str, reason: str) -> None:
        if (row := _first(bad)) is not None:
            errors.append((row, column, reason.format(value=str(cols[column].iloc[row])[:40])))

    for name in ("user_id", "item_id"):
        s = cols[name]
        check((s == "").to_numpy(), name, "empty value")
        check((s.str.len() > MAX_ID_LEN).to_numpy(), name, f"longer than {MAX_ID_LEN} characters")
        check(
            s.str.contains(r"[{}\s]", regex=True).to_numpy(), name, "identifier {value!r} contains braces or whitespace"
        )
    ts_text = cols["timestamp"]
    numeric = pd.to_numeric(ts_text, errors="coerce")
    iso = pd.to_datetime(ts_text.where(numeric.isna(), None), utc=True, errors="coerce", format="ISO8601")
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    seconds = np.where(
        numeric.notna(), numeric.fillna(0).to_numpy(dtype=float), ((iso.fillna(epoch) - epoch).dt.total_seconds())
    )
    check((numeric.isna() & iso.isna()).to_numpy(), "timestamp", "not unix seconds or an ISO-8601 timestamp: {value!r}")
    check(~np.isfinite(seconds), "timestamp", "not a finite number: {value!r}")
    weight = np.ones(len(body))
    if "weight" in cols:
        w = pd.to_numeric(cols["weight"], errors="coerce").to_numpy(dtype=float)
        check(np.isnan(w), "weight", "not a number: {value!r}")
        check(np.isfinite(w) & (w <= 0), "weight", "must be > 0: {value!r}")
        check(np.isinf(w), "weight", "not a finite number: {value!r}")
        weight = w
    if errors:
        first, column, reason = min(errors)
        raise DataError(path, first + 2, column, reason)
    count = len(body)
    frame = _frame(
        cols["user_id"], cols["item_id"], ["interaction"] * count, seconds, weight, np.ones(count, dtype=bool)
    )
    return RecData(path.name, frame, False, "interaction", path)


def cut_time(frame: pd.DataFrame, test_days: float | None, test_fraction: float | None) -> int:
    """The split time: `test_days` before the last interaction, or the time after which the last
    `test_fraction` of interactions fall."""
    if (test_days is None) == (test_fraction is None):
        raise ValueError("give exactly one of test_days and test_fraction")
    ts = np.sort(frame["timestamp"].to_numpy())
    if len(ts) < 2:
        raise ValueError("need at least two interactions to split in time")
    if test_days is not None:
        if test_days <= 0:
            raise ValueError("test_days must be positive")
        return int(ts[-1]) + 1 - round(test_days * SECONDS_PER_DAY)
    assert test_fraction is not None
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    return int(ts[min(len(ts) - 1, int(len(ts) * (1 - test_fraction)))])


def time_split(frame: pd.DataFrame, cut: int) -> Split:
    before = frame["timestamp"].to_numpy() < cut
    split = Split(cut, frame[before].reset_index(drop=True), frame[~before].reset_index(drop=True))
    if split.train.empty or split.test.empty:
        raise ValueError(
            f"the cut at {pd.Timestamp(cut, unit='s', tz='UTC')} leaves {len(split.train)} training and "
            f"{len(split.test)} test interactions; choose another --test-days/--test-fraction"
        )
    return split


def per_user_split(frame: pd.DataFrame, test_fraction: float) -> Split:
    """Per-user temporal leave-last-fraction-out: each user's last `test_fraction` of interactions in time
    (rounded, at least 1, at most all but one) are test, their earlier ones train.

    A user's test interactions are strictly later than their training ones: interactions at the boundary
    second go to test, or to train if the user has nothing earlier. A user with a single interaction, or
    with all interactions in one second (no order to split on), stays in training only. Other users'
    interactions are not cut at this user's time, so training holds some that happen after it.
    """
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    ts = frame["timestamp"].to_numpy(dtype=np.int64)
    codes, _ = pd.factorize(frame["customer_id"])
    order = np.lexsort((ts, codes))  # by user, then time
    counts = np.bincount(codes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    n_test = np.clip(np.floor(counts * test_fraction + 0.5).astype(np.int64), 1, np.maximum(counts - 1, 0))
    sorted_ts = ts[order]
    boundary = sorted_ts[starts + counts - np.maximum(n_test, 1)]  # first test interaction's time
    first = sorted_ts[starts]
    # Ties at the boundary go to test, unless nothing of the user's is earlier: then they go to train.
    later_only = boundary == first
    user_boundary, user_cut_strict = boundary[codes], later_only[codes]
    test = np.where(user_cut_strict, ts > user_boundary, ts >= user_boundary) & (counts[codes] >= 2)
    split = Split(0, frame[~test].reset_index(drop=True), frame[test].reset_index(drop=True), "per-user")
    if split.train.empty or split.test.empty:
        raise ValueError(
            f"the per-user split leaves {len(split.train)} training and {len(split.test)} test interactions; "
            "it needs users with interactions at two or more different times"
        )
    return Split(int(split.train["timestamp"].max()) + 1, split.train, split.test, "per-user")


@dataclass(frozen=True)
class SplitRule:
    """How to split: one global cut (`test_days` or `test_fraction`), or `per-user` with `test_fraction`.
    Applied to the full data for the test set and again to the training side for a validation set."""

    kind: SplitKind
    test_days: float | None = None
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise ValueError(f"unknown split {self.kind!r}; choose {' or '.join(SPLIT_KINDS)}")
        if self.kind == "per-user" and (self.test_fraction is None or self.test_days is not None):
            raise ValueError("the per-user split takes a test fraction (--test-fraction), not --test-days")
        if self.kind == "global" and (self.test_days is None) == (self.test_fraction is None):
            raise ValueError("the global split takes exactly one of --test-days and --test-fraction")

    def apply(self, frame: pd.DataFrame) -> Split:
        if self.kind == "per-user":
            assert self.test_fraction is not None
            return per_user_split(frame, self.test_fraction)
        return time_split(frame, cut_time(frame, self.test_days, self.test_fraction))

    def describe(self) -> str:
        if self.kind == "per-user":
            return f"each user's last {self.test_fraction:.0%} of interactions in time (at least one)"
        if self.test_days is not None:
            return f"last {self.test_days:g} days"
        return f"last {self.test_fraction:.0%} of interactions"
