"""Point-in-time customer features, RFM scores and segments, and labelled training examples.

Everything is computed by DuckDB SQL over the shop's files (Parquet or CSV, see `training.datafiles`), so the
event history never has to fit in pandas: DuckDB streams the scan and spills to a temporary folder past
its memory limit. Only events with `timestamp < as_of` reach a feature, so a feature never sees the
future; an event exactly at `as_of` already belongs to the future (and to the labels).

"The last N days" is the half-open window [as_of − N·86400 s, as_of). An order is one distinct
(customer_id, timestamp) of purchase events; spend is Σ quantity × unit price over purchase lines.

| feature | meaning |
| --- | --- |
| recency_days | days (fractional) from the last purchase to as_of; `NEVER_DAYS` (9999) if never bought |
| frequency | orders before as_of |
| monetary | spend before as_of |
| avg_order_value | monetary / frequency; 0 if never bought |
| tenure_days | days (fractional) from the customer's created_at to as_of |
| days_since_last_visit | days (fractional) since the last event of any type; `NEVER_DAYS` if none |
| views_30d, views_90d | view_item events in the last 30 / 90 days |
| carts_30d | add_to_cart events in the last 30 days |
| purchases_30d, purchases_90d | orders in the last 30 / 90 days |
| spend_90d | spend in the last 90 days |
| email_opens_30d, email_opens_90d | email_open events in the last 30 / 90 days |
| email_clicks_30d, email_clicks_90d | email_click events in the last 30 / 90 days |
| distinct_items_bought | distinct items ever purchased |
| distinct_categories_bought | distinct catalog categories ever purchased |
| top_category_share | share of the top category among the last 90 days' view_item + purchase events (0 if none) |
| category_entropy | Shannon entropy, in bits, of that category distribution: 0 = one category, log2(k) = k alike |
| categories_90d | distinct categories among those events |

`NEVER_DAYS` rather than NaN: "longer ago than anything real" is what never means, so a tree model's
split `recency_days <= x` puts never-bought customers with the lapsed ones without any missing-value
handling, and linear models see a finite number. `top_category` (a string, None without such events;
ties go to the alphabetically first category) is returned beside the features, not among them.
Events whose item is not in the catalog count everywhere except in the category features.

RFM: R, F and M are quintile scores 1..5 over the customers who bought before as_of (more recent,
more orders, more spend = higher); never-bought customers score 0 and are `prospects`. Ties share a
score — score = 1 + ⌊5 × (share of buyers strictly below)⌋, by exact value — so two customers who
behaved alike always score alike and no score depends on row order. With most buyers on one order, F
therefore often takes only a few values (e.g. 1 for one order, 5 for repeat buyers). Segments come
from `SEGMENT_RULES`, a table whose first matching rule wins.

The files are expected to have passed `training.datafiles` validation (`nextbest load`); a value
DuckDB cannot convert still raises `DataError`.

Money is summed in millionths of the currency unit as integers, so a total does not depend on the order
in which DuckDB's threads add rows up: running twice, or on more data after as_of, gives equal floats.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pandas as pd

from engine.types import SECONDS_PER_DAY
from training.datafiles import DataError, find_file

FEATURE_COLUMNS: tuple[str, ...] = (
    "recency_days",
    "frequency",
    "monetary",
    "avg_order_value",
    "tenure_days",
    "days_since_last_visit",
    "views_30d",
    "views_90d",
    "carts_30d",
    "purchases_30d",
    "purchases_90d",
    "spend_90d",
    "email_opens_30d",
    "email_opens_90d",
    "email_clicks_30d",
    "email_clicks_90d",
    "distinct_items_bought",
    "distinct_categories_bought",
    "top_category_share",
    "category_entropy",
    "categories_90d",
)
SCORE_COLUMNS = ("r_score", "f_score", "m_score")
LABEL_COLUMNS = ("purchased_next_30d", "churned_next_90d", "value_next_90d", "email_click_next_30d")
NEVER_DAYS = 9999.0
LABEL_WINDOW_DAYS = 90  # the longest label window: an as-of date needs this many days of data after it
DUCKDB_THREADS = 2
MICROS = 1_000_000  # money is summed in millionths, as integers


@dataclass(frozen=True)
class SegmentRule:
    """A customer is in `segment` when every score lies in its inclusive range."""

    segment: str
    r: tuple[int, int]
    f: tuple[int, int]
    m: tuple[int, int] = (1, 5)

    def matches(self, r: int, f: int, m: int) -> bool:
        return all(lo <= v <= hi for v, (lo, hi) in ((r, self.r), (f, self.f), (m, self.m)))

    def sql(self) -> str:
        ranges = (("r_score", self.r), ("f_score", self.f), ("m_score", self.m))
        return " AND ".join(f"{col} BETWEEN {lo} AND {hi}" for col, (lo, hi) in ranges)


# First matching rule wins. Over R × F (M only matters for cant_lose), buyers are partitioned as:
#   R\F   1               2                    3                    4          5
#   5     new             potential_loyalists  potential_loyalists  champions  champions
#   4     promising       potential_loyalists  potential_loyalists  champions  champions
#   3     about_to_sleep  about_to_sleep       need_attention       loyal      loyal
#   1-2   hibernating     hibernating          at_risk              at_risk    at_risk (cant_lose if R=1, M>=4)
SEGMENT_RULES: tuple[SegmentRule, ...] = (
    SegmentRule("prospects", r=(0, 0), f=(0, 0), m=(0, 0)),  # never bought before as_of
    SegmentRule("champions", r=(4, 5), f=(4, 5)),
    SegmentRule("loyal", r=(3, 3), f=(4, 5)),
    SegmentRule("potential_loyalists", r=(4, 5), f=(2, 3)),
    SegmentRule("new", r=(5, 5), f=(1, 1)),
    SegmentRule("promising", r=(4, 4), f=(1, 1)),
    SegmentRule("need_attention", r=(3, 3), f=(3, 3)),
    SegmentRule("about_to_sleep", r=(3, 3), f=(1, 2)),
    SegmentRule("cant_lose", r=(1, 1), f=(5, 5), m=(4, 5)),
    SegmentRule("at_risk", r=(1, 2), f=(3, 5)),
    SegmentRule("hibernating", r=(1, 2), f=(1, 2)),
)
SEGMENTS: tuple[str, ...] = tuple(rule.segment for rule in SEGMENT_RULES)


def segment_of(r: int, f: int, m: int) -> str:
    """The segment of one (R, F, M) score triple, by the same table the SQL uses."""
    for rule in SEGMENT_RULES:
        if rule.matches(r, f, m):
            return rule.segment
    raise ValueError(f"no segment for scores r={r}, f={f}, m={m}")


def customer_features(
    data_dir: Path,
    as_of: datetime | int,
    *,
    customers: Sequence[str] | None = None,
    memory_limit: str = "2GB",
) -> pd.DataFrame:
    """Features, RFM scores and segment of every customer created before `as_of`, from events before it.

    `as_of` is unix seconds or a datetime (naive means UTC). `customers` restricts the rows returned,
    not the population: RFM quintiles are always taken over all buyers, so a customer's scores do not
    depend on who else was asked for. Rows are sorted by customer_id.
    """
    t = _unix(as_of)
    if isinstance(customers, str):
        raise TypeError("customers must be a sequence of ids, not one string")
    with _shop(Path(data_dir), memory_limit) as con:
        where = ""
        if customers is not None:
            con.execute("CREATE TEMP TABLE wanted AS SELECT unnest(?::VARCHAR[]) AS customer_id", [list(customers)])
            where = "WHERE customer_id IN (SELECT customer_id FROM wanted)"
        sql = f"SELECT * FROM ({_features_sql(t)}) {where} ORDER BY customer_id"
        return _run(con, sql, Path(data_dir))


def training_examples(
    data_dir: Path,
    as_of_dates: Sequence[datetime | int],
    *,
    memory_limit: str = "2GB",
    label_window_days: int = LABEL_WINDOW_DAYS,
) -> pd.DataFrame:
    """`customer_features` at each as-of date plus labels from the events in the window after it.

    Labels use only events in [as_of, as_of + N days): purchased_next_30d (0/1), churned_next_90d (1 if
    no purchase in the 90 days), value_next_90d (spend) and email_click_next_30d (0/1). A date whose
    90-day window does not end by the last event is refused with a ValueError naming it, because its
    labels would read "no purchase" where the data simply stops. Rows are sorted by as_of, customer_id.

    `label_window_days` (≥ 30) replaces the 90 days of churned_next_90d and value_next_90d, and of the
    refusal, for a caller predicting another horizon (the columns keep their names).
    """
    if label_window_days < 30:
        raise ValueError(f"label_window_days must be >= 30 (the 30-day labels lie inside it), got {label_window_days}")
    window = label_window_days
    dates = sorted({_unix(d) for d in as_of_dates})
    with _shop(Path(data_dir), memory_limit) as con:
        last = con.execute("SELECT max(ts) FROM events_v").fetchone()
        last_ts = None if last is None else last[0]
        for t in dates:
            if last_ts is None or t + window * SECONDS_PER_DAY > last_ts:
                seen = "there are no events" if last_ts is None else f"the last event is at {_iso(last_ts)}"
                raise ValueError(
                    f"as-of date {_iso(t)}: its {window}-day label window runs to "
                    f"{_iso(t + window * SECONDS_PER_DAY)} but {seen}"
                )
        frames = [_run(con, _examples_sql(t, window), Path(data_dir)) for t in dates]
    if not frames:
        columns = ["customer_id", "as_of", *FEATURE_COLUMNS, *SCORE_COLUMNS, "segment", "top_category"]
        return pd.DataFrame(columns=[*columns, *LABEL_COLUMNS])
    return pd.concat(frames, ignore_index=True)


# --- reading the files ------------------------------------------------------------------------------------


@contextmanager
def _shop(data_dir: Path, memory_limit: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with three normalised relations: customers_v, catalog_v, events_v.

    A query scans events_v several times. Parquet is scanned in place: cheap, and the time filter
    reaches its row groups. CSV events are first copied into a table of a temporary DuckDB database
    file, so the text is parsed once and the copy lives on disk, not in memory.
    """
    with tempfile.TemporaryDirectory(prefix="nextbest-features-") as spill:
        copy = find_file(data_dir, "events").suffix == ".csv"
        con = duckdb.connect(str(Path(spill) / "shop.duckdb") if copy else ":memory:")
        try:
            try:
                con.execute(f"SET memory_limit = {_literal(memory_limit)}")
            except duckdb.Error as exc:
                raise ValueError(f"memory_limit {memory_limit!r} is not a DuckDB memory size: {exc}") from exc
            con.execute(f"SET threads = {DUCKDB_THREADS}")
            con.execute(f"SET temp_directory = {_literal(spill)}")
            con.execute("SET TimeZone = 'UTC'")  # naive timestamps mean UTC, as in training.datafiles
            con.execute("SET preserve_insertion_order = false")
            con.execute("SET enable_progress_bar = false")
            _create_views(con, data_dir, copy)
            yield con
        finally:
            con.close()


def _create_views(con: duckdb.DuckDBPyConnection, data_dir: Path, copy_events: bool) -> None:
    customers = _Source(con, find_file(data_dir, "customers"), required=("customer_id", "created_at"))
    catalog = _Source(con, find_file(data_dir, "catalog"), required=("item_id", "category"))
    events = _Source(con, find_file(data_dir, "events"), required=("customer_id", "type", "timestamp"))
    con.execute(f"""
        CREATE VIEW customers_v AS
        SELECT {customers.text("customer_id")} AS customer_id, {_seconds(customers.moment("created_at"))} AS created_ts
        FROM {customers.relation}""")
    con.execute(f"""
        CREATE VIEW catalog_v AS
        SELECT {catalog.text("item_id")} AS item_id, {catalog.text("category")} AS category
        FROM {catalog.relation}""")
    moment = events.moment("timestamp")
    amount = f"{events.number('quantity', 1)} * {events.number('price', 0)} * {MICROS}"
    con.execute(f"""
        CREATE VIEW events_src AS
        SELECT {events.text("customer_id")} AS customer_id, {events.text("type")} AS type,
               {events.text("item_id")} AS item_id, CAST(round({amount}) AS BIGINT) AS micros,
               {moment} AS t, {_seconds(moment)} AS ts
        FROM {events.relation}""")
    if copy_events:
        _run_or_raise(con, "CREATE TABLE events_v AS SELECT * FROM events_src", data_dir)
    else:
        con.execute("CREATE VIEW events_v AS SELECT * FROM events_src")


class _Source:
    """One input file as a DuckDB relation, with SQL expressions that normalise its columns.

    CSV is read as text and parsed here, as training.datafiles does; Parquet keeps its own types.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path, required: tuple[str, ...]) -> None:
        if path.suffix == ".parquet":
            self.relation = f"read_parquet({_literal(str(path))})"
        else:
            options = "header = true, delim = ',', quote = '\"', escape = '\"', all_varchar = true"
            self.relation = f"read_csv({_literal(str(path))}, {options})"
        try:
            rows = con.execute(f"DESCRIBE SELECT * FROM {self.relation}").fetchall()
        except duckdb.Error as exc:
            raise DataError(path, None, None, f"cannot be read by DuckDB: {exc}") from exc
        self.names = {str(row[0]).strip(): str(row[0]) for row in rows}  # "price " in a header is price
        self.types = {str(row[0]).strip(): str(row[1]) for row in rows}
        for name in required:
            if name not in self.types:
                raise DataError(path, 1, name, f"required column missing (have: {', '.join(self.types)})")

    def _column(self, name: str) -> str:
        return _ident(self.names[name])

    def text(self, name: str) -> str:
        if name not in self.types:
            return "CAST(NULL AS VARCHAR)"
        return f"NULLIF(trim(CAST({self._column(name)} AS VARCHAR)), '')"

    def number(self, name: str, default: float) -> str:
        if name not in self.types:
            return f"CAST({default} AS DOUBLE)"
        value = self._column(name)
        if self.types[name] == "VARCHAR":
            value = f"NULLIF(trim({value}), '')"
        return f"coalesce(CAST({value} AS DOUBLE), {default})"

    def moment(self, name: str) -> str:
        kind = self.types[name]
        if kind == "TIMESTAMP WITH TIME ZONE":
            return self._column(name)  # a bare column, so `t < ...` filters reach the Parquet row groups
        value = f"trim({self._column(name)})" if kind == "VARCHAR" else self._column(name)
        return f"CAST({value} AS TIMESTAMPTZ)"


def _seconds(moment: str) -> str:
    """Unix seconds, floored, as training.datafiles computes them."""
    return f"CAST(floor(epoch_us({moment}) / 1000000) AS BIGINT)"


def _run_or_raise(con: duckdb.DuckDBPyConnection, sql: str, data_dir: Path) -> duckdb.DuckDBPyConnection:
    try:
        return con.execute(sql)
    except (duckdb.ConversionException, duckdb.InvalidInputException) as exc:
        raise DataError(data_dir, None, None, f"a value in the shop's files cannot be read: {exc}") from exc


def _run(con: duckdb.DuckDBPyConnection, sql: str, data_dir: Path) -> pd.DataFrame:
    frame = _run_or_raise(con, sql, data_dir).df()
    # None, not NaN, for "no category": the column is a label for people, not a model feature.
    frame["top_category"] = frame["top_category"].astype(object).where(frame["top_category"].notna(), None)
    return frame


# --- the queries ------------------------------------------------------------------------------------------


def _features_sql(as_of: int) -> str:
    d30, d90 = as_of - 30 * SECONDS_PER_DAY, as_of - 90 * SECONDS_PER_DAY
    rank_score = "CAST(1 + floor(5 * (rank() OVER (ORDER BY {}) - 1) / count(*) OVER ()) AS BIGINT)"
    segment = " ".join(f"WHEN {rule.sql()} THEN '{rule.segment}'" for rule in SEGMENT_RULES)
    return f"""
    WITH
    ev AS NOT MATERIALIZED (SELECT * FROM events_v WHERE t < to_timestamp({as_of})),
    activity AS (
        SELECT customer_id,
            max(ts) AS last_event_ts,
            count(*) FILTER (WHERE type = 'view_item' AND ts >= {d30}) AS views_30d,
            count(*) FILTER (WHERE type = 'view_item' AND ts >= {d90}) AS views_90d,
            count(*) FILTER (WHERE type = 'add_to_cart' AND ts >= {d30}) AS carts_30d,
            count(*) FILTER (WHERE type = 'email_open' AND ts >= {d30}) AS email_opens_30d,
            count(*) FILTER (WHERE type = 'email_open' AND ts >= {d90}) AS email_opens_90d,
            count(*) FILTER (WHERE type = 'email_click' AND ts >= {d30}) AS email_clicks_30d,
            count(*) FILTER (WHERE type = 'email_click' AND ts >= {d90}) AS email_clicks_90d
        FROM ev GROUP BY customer_id
    ),
    purchases AS (  -- distinct counts only over purchase lines: a small share of all events
        SELECT ev.customer_id, ev.item_id, ev.ts, ev.micros, catalog_v.category
        FROM ev LEFT JOIN catalog_v USING (item_id) WHERE ev.type = 'purchase'
    ),
    buying AS (
        SELECT customer_id,
            max(ts) AS last_purchase_ts,
            count(DISTINCT ts) AS frequency,
            sum(micros) AS monetary_micros,
            count(DISTINCT ts) FILTER (WHERE ts >= {d30}) AS purchases_30d,
            count(DISTINCT ts) FILTER (WHERE ts >= {d90}) AS purchases_90d,
            sum(micros) FILTER (WHERE ts >= {d90}) AS spend_90d_micros,
            count(DISTINCT item_id) AS distinct_items_bought,
            count(DISTINCT category) AS distinct_categories_bought
        FROM purchases GROUP BY customer_id
    ),
    interest AS (
        SELECT customer_id, category, count(*) AS n,
            count(*) / sum(count(*)) OVER (PARTITION BY customer_id) AS p
        FROM (
            SELECT customer_id, category FROM purchases WHERE ts >= {d90} AND category IS NOT NULL
            UNION ALL
            SELECT ev.customer_id, catalog_v.category FROM ev JOIN catalog_v USING (item_id)
            WHERE ev.type = 'view_item' AND ev.t >= to_timestamp({d90}) AND catalog_v.category IS NOT NULL
        )
        GROUP BY customer_id, category
    ),
    affinity AS (
        SELECT customer_id,
            first(category ORDER BY n DESC, category) AS top_category,
            max(p) AS top_category_share,
            0.0 - list_sum(list(p * log2(p) ORDER BY category)) AS category_entropy,
            count(*) AS categories_90d
        FROM interest GROUP BY customer_id
    ),
    base AS (
        SELECT c.customer_id, c.created_ts, a.last_event_ts, b.last_purchase_ts,
            coalesce(b.frequency, 0) AS frequency, coalesce(b.monetary_micros, 0) AS monetary_micros,
            a.* EXCLUDE (customer_id, last_event_ts),
            b.* EXCLUDE (customer_id, last_purchase_ts, frequency, monetary_micros),
            f.* EXCLUDE (customer_id)
        FROM customers_v c
        LEFT JOIN activity a USING (customer_id)
        LEFT JOIN buying b USING (customer_id)
        LEFT JOIN affinity f USING (customer_id)
        WHERE c.created_ts < {as_of}
    ),
    rfm AS (
        SELECT customer_id,
            {rank_score.format("last_purchase_ts")} AS r_score,
            {rank_score.format("frequency")} AS f_score,
            {rank_score.format("monetary_micros")} AS m_score
        FROM base WHERE frequency > 0
    ),
    scored AS (
        SELECT base.*, coalesce(r_score, 0) AS r_score, coalesce(f_score, 0) AS f_score,
            coalesce(m_score, 0) AS m_score
        FROM base LEFT JOIN rfm USING (customer_id)
    )
    SELECT customer_id, CAST({as_of} AS BIGINT) AS as_of, {_feature_expressions(as_of)},
        r_score, f_score, m_score, CASE {segment} END AS segment, top_category
    FROM scored"""


def _feature_expressions(as_of: int) -> str:
    """The SELECT list of FEATURE_COLUMNS, in order; a count is itself, or 0 without any event."""
    day, money = float(SECONDS_PER_DAY), f"CAST(monetary_micros AS DOUBLE) / {MICROS}"
    special = {
        "recency_days": f"coalesce(({as_of} - last_purchase_ts) / {day}, {NEVER_DAYS})",
        "monetary": money,
        "avg_order_value": f"CASE WHEN frequency > 0 THEN {money} / frequency ELSE 0 END",
        "tenure_days": f"({as_of} - created_ts) / {day}",
        "days_since_last_visit": f"coalesce(({as_of} - last_event_ts) / {day}, {NEVER_DAYS})",
        "spend_90d": f"coalesce(CAST(spend_90d_micros AS DOUBLE) / {MICROS}, 0)",
    }
    return ", ".join(f"CAST({special.get(c, f'coalesce({c}, 0)')} AS DOUBLE) AS {c}" for c in FEATURE_COLUMNS)


def _examples_sql(as_of: int, window_days: int = LABEL_WINDOW_DAYS) -> str:
    end30, end90 = as_of + 30 * SECONDS_PER_DAY, as_of + window_days * SECONDS_PER_DAY
    return f"""
    WITH
    features AS ({_features_sql(as_of)}),
    labels AS (
        SELECT customer_id,
            count(*) FILTER (WHERE type = 'purchase' AND ts < {end30}) AS next_purchases_30d,
            count(*) FILTER (WHERE type = 'purchase') AS next_purchases_90d,
            sum(micros) FILTER (WHERE type = 'purchase') AS next_value_micros,
            count(*) FILTER (WHERE type = 'email_click' AND ts < {end30}) AS next_clicks_30d
        FROM events_v
        WHERE t >= to_timestamp({as_of}) AND t < to_timestamp({end90}) AND type IN ('purchase', 'email_click')
        GROUP BY customer_id
    )
    SELECT features.*,
        CAST(coalesce(next_purchases_30d, 0) > 0 AS BIGINT) AS purchased_next_30d,
        CAST(coalesce(next_purchases_90d, 0) = 0 AS BIGINT) AS churned_next_90d,
        coalesce(CAST(next_value_micros AS DOUBLE) / {MICROS}, 0) AS value_next_90d,
        CAST(coalesce(next_clicks_30d, 0) > 0 AS BIGINT) AS email_click_next_30d
    FROM features LEFT JOIN labels USING (customer_id)
    ORDER BY customer_id"""


# --- small helpers ----------------------------------------------------------------------------------------


def _unix(moment: datetime | int) -> int:
    """Unix seconds (floored) of an as-of date; a naive datetime is taken as UTC."""
    if isinstance(moment, bool):
        raise TypeError("an as-of date must be a datetime or unix seconds, not a bool")
    if isinstance(moment, datetime):
        aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
        return math.floor(aware.timestamp())
    return int(moment)


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
