"""The transactions `nextbest bench ltv` reads (CDNOW, a user's CSV, or the purchases of an events file), and their
split into a calibration period, summarised per customer, and the holdout spend the models are scored against.

Transactions are a frame of customer_id (str), ts (unix seconds), amount, quantity and item_id. Purchases are
counted per calendar day (UTC), as in the BG/NBD literature: the first purchase day starts a customer's clock, x
is the number of later purchase days in the calibration period, t_x the week of the last one, T the week of the
calibration period's last day, z̄ the mean spend of the repeat days.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from engine.types import SECONDS_PER_DAY
from training.datafiles import Column, DataError, _Checker, _column, _read_csv, read_table

F64 = npt.NDArray[np.float64]
WEEK = 7 * SECONDS_PER_DAY
DAYS_PER_WEEK = 7.0
TRANSACTION_COLUMNS = (
    Column("customer_id", "id"),
    Column("timestamp", "timestamp"),
    Column("amount", "float", minimum=0.0),
)


def _frame(
    customer_id: pd.Series, ts: pd.Series, amount: pd.Series, quantity: pd.Series, item: pd.Series
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": customer_id.astype(str).to_numpy(),
            "ts": ts.to_numpy(dtype=np.int64),
            "amount": amount.to_numpy(dtype=np.float64),
            "quantity": quantity.to_numpy(dtype=np.int64),
            "item_id": item.astype(str).to_numpy(),
        }
    ).sort_values(["ts", "customer_id"], kind="stable", ignore_index=True)


def read_cdnow(path: Path, sample: bool = False) -> pd.DataFrame:
    """CDNOW: whitespace-separated `customer_id date(YYYYMMDD) n_cds amount` (the sample has a second id first)."""
    names = (
        ["original_id", "customer_id", "date", "n_cds", "amount"]
        if sample
        else ["customer_id", "date", "n_cds", "amount"]
    )
    raw = pd.read_csv(path, sep=r"\s+", header=None, names=names, dtype=str, comment=None)
    raw = raw[raw["date"].str.fullmatch(r"\d{8}")]  # the lifetimes copy starts with a header line
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    ts = (pd.to_datetime(raw["date"], format="%Y%m%d", utc=True) - epoch) // pd.Timedelta(seconds=1)
    n_cds = pd.to_numeric(raw["n_cds"]).clip(lower=1)
    return _frame(
        raw["customer_id"].str.lstrip("0"), ts, pd.to_numeric(raw["amount"]), n_cds, pd.Series(["cd"] * len(raw))
    )


def read_transactions_csv(path: Path) -> pd.DataFrame:
    """A CSV `customer_id,timestamp,amount` (ISO-8601, amount ≥ 0), checked as the shop's files are."""
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    with path.open("rb") as f:
        first = f.readline()
    try:
        header = [c.strip() for c in next(csv.reader([first.decode("utf-8-sig")]), [])]
    except UnicodeDecodeError as exc:
        raise DataError(path, 1, None, "header is not valid UTF-8") from exc
    missing = [c.name for c in TRANSACTION_COLUMNS if c.name not in header]
    if missing:
        raise DataError(path, 1, missing[0], f"required column missing (have: {', '.join(header)})")
    df = _read_csv(path, header).to_pandas()
    checker = _Checker(path, lambda row: row + 2)  # line 1 is the header
    cols = {c.name: _column(df, c, checker) for c in TRANSACTION_COLUMNS}
    checker.raise_first()
    one = pd.Series(np.ones(len(df), dtype=np.int64))
    return _frame(cols["customer_id"], cols["timestamp"], cols["amount"], one, pd.Series(["item"] * len(df)))


def read_purchase_events(path: Path) -> pd.DataFrame:
    """The purchase lines of an events file (CSV or Parquet, validated by training.datafiles); spend = qty × price."""
    ev = read_table(path, "events")
    ev = ev[ev["type"] == "purchase"]
    return _frame(ev["customer_id"], ev["timestamp"], ev["quantity"] * ev["price"], ev["quantity"], ev["item_id"])


# ---------------------------------------------------------------- the split


@dataclass(frozen=True)
class Windows:
    start: int  # midnight UTC of the first transaction's day
    calibration_end: int  # exclusive
    holdout_end: int  # exclusive
    calibration_weeks: int
    holdout_weeks: int


def windows_for(transactions: pd.DataFrame, calibration_weeks: int, holdout_weeks: int) -> Windows:
    """Calibration from the first transaction's day; refused unless the data reaches the holdout's last week."""
    if len(transactions) == 0:
        raise ValueError("there are no transactions")
    if calibration_weeks < 1 or holdout_weeks < 1:
        raise ValueError("calibration and holdout must each be at least one week")
    start = int(transactions["ts"].min()) // SECONDS_PER_DAY * SECONDS_PER_DAY
    w = Windows(
        start,
        start + calibration_weeks * WEEK,
        start + (calibration_weeks + holdout_weeks) * WEEK,
        calibration_weeks,
        holdout_weeks,
    )
    last = int(transactions["ts"].max())
    if last < w.holdout_end - WEEK:
        end, day = pd.Timestamp(w.holdout_end - 1, unit="s").date(), pd.Timestamp(last, unit="s").date()
        raise ValueError(
            f"the holdout runs to {end} but the transactions end on {day}: shorten the calibration or holdout weeks"
        )
    return w


def split(transactions: pd.DataFrame, w: Windows) -> tuple[pd.DataFrame, CalibrationSummary, F64]:
    """(calibration transactions, their per-customer summary, holdout spend of those customers).

    Customers first buying in the holdout are left out: no model could know them.
    """
    calibration = transactions[transactions["ts"] < w.calibration_end].reset_index(drop=True)
    summary = summarise(calibration, w.calibration_end)
    hold = transactions[(transactions["ts"] >= w.calibration_end) & (transactions["ts"] < w.holdout_end)]
    spend = hold.groupby("customer_id")["amount"].sum()
    actual = spend.reindex(summary.customer_id, fill_value=0.0).to_numpy(dtype=np.float64)
    return calibration, summary, actual


# ---------------------------------------------------------------- the calibration summary


@dataclass(frozen=True)
class CalibrationSummary:
    """One row per customer who bought before the end of the calibration period, sorted by customer_id."""

    customer_id: npt.NDArray[np.object_]
    x: F64  # repeat purchase days
    t_x: F64  # weeks from the first to the last purchase day
    T: F64  # weeks from the first purchase day to the calibration period's last day
    zbar: F64  # mean spend per repeat purchase day (0 without repeats)
    spend: F64  # all calibration spend, first purchase included


def summarise(transactions: pd.DataFrame, calibration_end: int) -> CalibrationSummary:
    """The summary of `transactions` (customer_id, ts in unix seconds, amount) before `calibration_end`.

    Transactions at or after calibration_end are ignored, so a caller cannot leak the holdout through here.
    """
    cal = transactions.loc[transactions["ts"] < calibration_end, ["customer_id", "ts", "amount"]]
    days = (
        cal.assign(day=cal["ts"].to_numpy(dtype=np.int64) // SECONDS_PER_DAY)
        .groupby(["customer_id", "day"], sort=True)["amount"]
        .sum()
        .reset_index()
    )
    by = days.groupby("customer_id", sort=True)
    first = by["day"].transform("min").to_numpy(dtype=np.float64)
    repeat = days["day"].to_numpy(dtype=np.float64) > first
    last_day = (calibration_end - 1) // SECONDS_PER_DAY
    per = pd.DataFrame(
        {
            "customer_id": days["customer_id"],
            "first": first,
            "t": (days["day"].to_numpy(dtype=np.float64) - first) / DAYS_PER_WEEK,
            "repeat": repeat.astype(np.float64),
            "repeat_amount": np.where(repeat, days["amount"].to_numpy(dtype=np.float64), 0.0),
            "amount": days["amount"].to_numpy(dtype=np.float64),
        }
    ).groupby("customer_id", sort=True)
    agg = per.agg(
        first=("first", "min"),
        t_x=("t", "max"),
        x=("repeat", "sum"),
        repeat_amount=("repeat_amount", "sum"),
        spend=("amount", "sum"),
    )
    x = agg["x"].to_numpy(dtype=np.float64)
    return CalibrationSummary(
        customer_id=agg.index.to_numpy(dtype=object),
        x=x,
        t_x=agg["t_x"].to_numpy(dtype=np.float64),
        T=(last_day - agg["first"].to_numpy(dtype=np.float64)) / DAYS_PER_WEEK,
        zbar=np.divide(agg["repeat_amount"].to_numpy(dtype=np.float64), x, out=np.zeros_like(x), where=x > 0),
        spend=agg["spend"].to_numpy(dtype=np.float64),
    )
