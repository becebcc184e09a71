"""The shop's input files (catalog, customers, events, and optional offer exposures) in CSV or Parquet:
schema, reading, validation.

A file with one bad row is rejected whole, with the file, line (CSV) or row (Parquet), column and
reason, so nothing is loaded from it.
"""

from __future__ import annotations

import csv
import difflib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from engine.types import EVENT_TYPES


class DataError(ValueError):
    """A bad input file: where (file, line, column) and why."""

    def __init__(self, file: Path, line: int | None, column: str | None, reason: str, more: int = 0) -> None:
        self.file, self.line, self.column, self.reason, self.more = file, line, column, reason, more
        where = str(file)
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        suffix = f" (and {more} more bad row(s))" if more else ""
        super().__init__(f"{where}: {reason}{suffix}; nothing was loaded from this file")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # id | str | float | int | bool | timestamp | enum
    required: bool = True  # a value must be present in every row
    minimum: float | None = None
    default: object = None


CATALOG = (
    Column("item_id", "id"),
    Column("title", "str"),
    Column("category", "id"),
    Column("price", "float", minimum=0.0),
    Column("cost", "float", minimum=0.0),
    Column("stock", "int", minimum=0),
    Column("url", "str", required=False, default=""),
    Column("image_url", "str", required=False, default=""),
    Column("active", "bool", required=False, default=True),
)
CONSENT_COLUMNS = ("consent_email", "consent_sms", "consent_push", "consent_personalization")
CUSTOMERS = (
    Column("customer_id", "id"),
    Column("created_at", "timestamp"),
    Column("country", "str", required=False, default=""),
    *(Column(c, "bool", required=False, default=False) for c in CONSENT_COLUMNS),
)
EVENTS = (
    Column("event_id", "id"),
    Column("customer_id", "id"),
    Column("type", "enum"),
    Column("item_id", "id", required=False, default=""),
    Column("quantity", "int", required=False, minimum=1, default=1),
    Column("price", "float", required=False, minimum=0.0, default=0.0),
    Column("timestamp", "timestamp"),
)
# Offer impressions and whether the customer responded (optional: shops without it train no response models).
# true_p is the generator's true response probability; real logs leave it out.
EXPOSURES_FILE = "offer_exposures"
EXPOSURES = (
    Column("exposure_id", "id"),
    Column("customer_id", "id"),
    Column("offer_type", "id"),
    Column("channel", "str", required=False, default=""),
    Column("responded", "bool"),
    Column("true_p", "float", required=False, minimum=0.0, default=float("nan")),
    Column("timestamp", "timestamp"),
)
OFFER_TYPE = re.compile(r"[a-z0-9_]{1,40}")  # it names a model, response_<type>, which is also a file name
SCHEMAS = {"catalog": CATALOG, "customers": CUSTOMERS, "events": EVENTS, EXPOSURES_FILE: EXPOSURES}
UNIQUE = {"catalog": "item_id", "customers": "customer_id", "events": "event_id", EXPOSURES_FILE: "exposure_id"}
TRUE = frozenset({"true", "1", "yes", "t", "y"})
FALSE = frozenset({"false", "0", "no", "f", "n"})
MAX_ID_LEN = 128
# What an identifier must not contain: the same characters the API's ID_PATTERN refuses (braces are
# Redis hash tags; whitespace and control codes make ids that look alike but differ).
ID_FORBIDDEN = r"[{}\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
MAX_TEXT_LEN = 2048


@dataclass(frozen=True)
class ShopData:
    catalog: pd.DataFrame
    customers: pd.DataFrame
    events: pd.DataFrame  # sorted by timestamp; timestamp as int64 unix seconds


def find_file(data_dir: Path, name: str) -> Path:
    for ext in (".parquet", ".csv"):
        p = data_dir / f"{name}{ext}"
        if p.exists():
            return p
    raise DataError(data_dir / f"{name}.csv", None, None, f"missing: expected {name}.csv or {name}.parquet")


class _Checker:
    """Collects the first bad row of each check; the earliest one is reported (in a row, the first check
    made, i.e. the leftmost column, not the alphabetically first)."""

    def __init__(self, path: Path, line_of: Callable[[int], int]) -> None:
        self.path, self.line_of = path, line_of
        self.errors: list[tuple[int, int, str | None, str, int]] = []

    def flag(self, bad: np.ndarray, column: str | None, reason: Callable[[int], str]) -> None:  # type: ignore[type-arg]
        rows = np.flatnonzero(bad)
        if len(rows):
            self.errors.append((int(rows[0]), len(self.errors), column, reason(int(rows[0])), len(rows)))

    def raise_first(self) -> None:
        if self.errors:
            row, _, column, reason, _ = min(self.errors)
            total = sum(e[4] for e in self.errors)
            raise DataError(self.path, self.line_of(row), column, reason, more=total - 1)


def _read_csv(path: Path, names: list[str]) -> pa.Table:
    """Every column as text, named as in the header without surrounding spaces (`names` may have them)."""
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=True, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        _locate_csv_problem(path, str(exc))
        raise DataError(path, None, None, f"cannot be parsed as CSV: {exc}") from exc
    # Without this, " price" in a header "item_id, title, price" left the column `price` unread (all defaults).
    return table.rename_columns([c.strip() for c in table.column_names])


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines as Arrow splits them (a bare \r ends a line too); bytes that are not UTF-8 come out
    as surrogate escapes, so a reader can say where they are instead of failing."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
        yield from enumerate(f, start=1)


def _not_utf8(text: str) -> int | None:
    """The 1-based byte offset of the first byte that is not UTF-8, if any."""
    bad = next((i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff"), None)
    return None if bad is None else len(text[:bad].encode("utf-8", errors="surrogateescape")) + 1


def _fields(path: Path, lineno: int, text: str) -> list[str]:
    try:
        return next(csv.reader([text]), [])
    except csv.Error as exc:
        raise DataError(path, lineno, None, f"cannot be parsed as CSV: {exc}") from exc


def _locate_csv_problem(path: Path, arrow_message: str) -> None:
    """Arrow's parse errors do not give line numbers reliably: rescan to find the bad line."""
    header: list[str] = []
    for lineno, text in _lines(path):
        byte = _not_utf8(text)
        if lineno == 1:
            if byte is not None:
                raise DataError(path, 1, None, "header is not valid UTF-8 (save the file as UTF-8)")
            header = [c.strip() for c in _fields(path, 1, text)]
            continue
        if byte is not None:
            before = _fields(path, lineno, text.encode("utf-8", errors="surrogateescape")[: byte - 1].decode())
            col = header[len(before) - 1] if 0 < len(before) <= len(header) else None
            msg = f"not valid UTF-8 at byte {byte} (is the file Latin-1 or Windows-1252? save it as UTF-8)"
            raise DataError(path, lineno, col, msg)
        if not text.strip():
            raise DataError(path, lineno, None, "empty line")
        row = _fields(path, lineno, text)
        if len(row) != len(header):
            col = header[len(row)] if len(row) < len(header) else None
            raise DataError(path, lineno, col, f"expected {len(header)} fields, found {len(row)}")


def _to_table(path: Path, kind: str) -> tuple[pa.Table, Callable[[int], int]]:
    schema = SCHEMAS[kind]
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(path, None, None, f"cannot be read as Parquet: {exc}") from exc
        columns = table.column_names
        line_of: Callable[[int], int] = lambda r: r + 1  # noqa: E731 — Parquet has rows, not lines
    else:
        raw_names = _csv_header(path)
        columns = [c.strip() for c in raw_names]
        table = _read_csv(path, raw_names)
        line_of = lambda r: r + 2  # noqa: E731 — line 1 is the header
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DataError(path, 1, twice[0], "the column appears more than once in the header")
    missing = [c.name for c in schema if c.required and c.name not in columns]
    if missing:
        raise DataError(path, 1, missing[0], f"required column missing (have: {', '.join(columns)})")
    _check_unknown_columns(path, columns, schema)
    if table.num_rows == 0:
        raise DataError(path, None, None, "no rows: the file holds no data")
    if path.suffix == ".parquet":
        _check_parquet_types(path, table, schema)
    return table, line_of


def _check_unknown_columns(path: Path, columns: list[str], schema: tuple[Column, ...]) -> None:
    """Other columns are allowed and ignored, but not a misspelt optional one: its default would apply
    silently (a header `activ` would make every item active)."""
    known = [c.name for c in schema]
    for name in columns:
        if name in known:
            continue
        if not name or not name.isprintable():
            raise DataError(path, 1, name, "a column name that is empty or has control characters")
        near = difflib.get_close_matches(name, [k for k in known if k not in columns], n=1, cutoff=0.8)
        if near:
            raise DataError(path, 1, name, f"unknown column; did you mean {near[0]!r}?")


def _csv_header(path: Path) -> list[str]:
    """The header's column names, after the checks that make a file with no usable header a clear error."""
    with path.open("rb") as f:
        start = f.read(4)
    for bom, encoding in ((b"\xff\xfe", "UTF-16 (or UTF-32) little-endian"), (b"\xfe\xff", "UTF-16 big-endian")):
        if start.startswith(bom):
            raise DataError(path, 1, None, f"encoded as {encoding} (byte-order mark); save it as UTF-8")
    lines = _lines(path)
    _, first = next(lines, (1, ""))
    if not first.strip():
        raise DataError(path, 1, None, "empty: the first line must be the header naming the columns")
    if _not_utf8(first) is not None:
        raise DataError(path, 1, None, "header is not valid UTF-8 (save the file as UTF-8)")
    if all(not text.strip() for _, text in lines):  # stops at the first data row
        raise DataError(path, 2, None, "no data rows: the file has only a header")
    return _fields(path, 1, first)


# Parquet column types each kind of column can be read from (text is checked row by row).
_ARROW_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], ...]] = {
    "id": (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer),
    "str": (pa.types.is_string, pa.types.is_large_string),
    "enum": (pa.types.is_string, pa.types.is_large_string),
    "float": (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_string),
    "int": (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal, pa.types.is_string),
    "bool": (pa.types.is_boolean, pa.types.is_integer, pa.types.is_string),
    "timestamp": (pa.types.is_timestamp, pa.types.is_date, pa.types.is_string, pa.types.is_large_string),
}
_KIND_NAMES = {
    "id": "identifiers (text or integers)",
    "str": "text",
    "enum": "text",
    "float": "numbers",
    "int": "whole numbers",
    "bool": "booleans",
    "timestamp": "timestamps (a timestamp or date type, or ISO-8601 text)",
}


def _check_parquet_types(path: Path, table: pa.Table, schema: tuple[Column, ...]) -> None:
    for col in schema:
        if col.name not in table.column_names:
            continue
        t = table.schema.field(col.name).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not pa.types.is_null(t) and not any(ok(t) for ok in _ARROW_TYPES[col.kind]):
            raise DataError(path, None, col.name, f"a Parquet column of type {t} cannot hold {_KIND_NAMES[col.kind]}")


def _csv_rows(path: Path, table: pa.Table, chk: _Checker) -> None:
    """What a CSV row can get wrong that the columns' checks would misreport (all columns are text here)."""
    empty = [pc.equal(pc.binary_length(table[name]), 0) for name in table.column_names]
    # A blank line comes out of Arrow as a row of empty fields: say so rather than "empty item_id".
    blank = functools.reduce(pc.and_, empty)
    chk.flag(blank.to_numpy(zero_copy_only=False), None, lambda r: "empty line")
    # A quoted value spanning lines would shift every later row's line number: refuse it where it starts.
    # Only a quoted value can hold a line break, so a file without quotes needs no scan of its values.
    with path.open("rb") as f:
        if not any(b'"' in chunk for chunk in iter(lambda: f.read(1 << 24), b"")):
            return
    for name in table.column_names:
        broken = pc.or_(pc.match_substring(table[name], "\n"), pc.match_substring(table[name], "\r"))
        chk.flag(broken.to_numpy(zero_copy_only=False), name, lambda r: "a line break inside a quoted value")


def _string(df: pd.DataFrame, name: str) -> pd.Series:
    s = df[name]
    if s.dtype == object or pd.api.types.is_string_dtype(s):
        return s.fillna("").astype(str)
    return s.astype(str)


def _column(df: pd.DataFrame, col: Column, chk: _Checker) -> pd.Series:
    """Validate and convert one column; bad rows are flagged on the checker."""
    n = len(df)
    if col.name not in df.columns:
        return pd.Series([col.default] * n)
    raw = df[col.name]
    if col.kind in ("id", "str", "enum"):
        s = _string(df, col.name).str.strip()
        empty = (s == "").to_numpy()
        if col.required:
            chk.flag(empty, col.name, lambda r: "empty value")
        limit = MAX_ID_LEN if col.kind == "id" else MAX_TEXT_LEN
        chk.flag((s.str.len() > limit).to_numpy(), col.name, lambda r: f"longer than {limit} characters")
        if col.kind == "id":
            bad = s.str.contains(ID_FORBIDDEN, regex=True).to_numpy()
            chk.flag(bad, col.name, lambda r: f"identifier {s.iloc[r]!r} contains braces, whitespace or control codes")
        if col.kind == "enum":
            bad = ~s.isin(EVENT_TYPES).to_numpy()
            chk.flag(bad, col.name, lambda r: f"unknown event type {s.iloc[r]!r}")
        return s
    elif col.kind in ("float", "int"):
        if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
            num = raw.astype(float)
            blank = num.isna().to_numpy()
            unparsable = np.zeros(n, dtype=bool)
        else:
            text = _string(df, col.name).str.strip()
            blank = (text == "").to_numpy()
            num = pd.to_numeric(text.where(~blank, None), errors="coerce")
            unparsable = num.isna().to_numpy() & ~blank
        chk.flag(unparsable, col.name, lambda r: f"not a number: {str(raw.iloc[r])[:40]!r}")
        if col.required:
            chk.flag(blank, col.name, lambda r: "empty value")
        values = num.to_numpy(dtype=float, na_value=np.nan)
        finite = np.isfinite(values)
        chk.flag(~finite & ~blank & ~unparsable, col.name, lambda r: "not a finite number")
        if col.kind == "int":
            chk.flag(finite & (values != np.round(values)), col.name, lambda r: "not a whole number")
        if col.minimum is not None:
            chk.flag(finite & (values < col.minimum), col.name, lambda r: f"must be >= {col.minimum:g}")
        filled = np.where(np.isfinite(values), values, float(col.default or 0))  # type: ignore[arg-type]
        return pd.Series(filled.astype(np.int64 if col.kind == "int" else np.float64))
    elif col.kind == "bool":
        if col.required:
            blank = (raw.isna() | (_string(df, col.name).str.strip() == "")).to_numpy()
            chk.flag(blank, col.name, lambda r: "empty value")
        if pd.api.types.is_bool_dtype(raw):
            return raw.fillna(bool(col.default)).astype(bool)
        text = _string(df, col.name).str.strip().str.lower()
        ok = text.isin(TRUE | FALSE) | (text == "")
        chk.flag(~ok.to_numpy(), col.name, lambda r: f"not a boolean (true/false): {str(raw.iloc[r])[:40]!r}")
        return text.isin(TRUE) | ((text == "") & bool(col.default))
    elif col.kind == "timestamp":
        if pd.api.types.is_datetime64_any_dtype(raw):
            ts = pd.to_datetime(raw, utc=True)
            blank = raw.isna().to_numpy()
        else:
            text = _string(df, col.name).str.strip()
            ts = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
            blank = ((text == "") | raw.isna()).to_numpy()
        chk.flag(blank, col.name, lambda r: "empty value")
        bad = ts.isna().to_numpy() & ~blank
        chk.flag(bad, col.name, lambda r: f"not an ISO-8601 timestamp: {str(raw.iloc[r])[:40]!r}")
        epoch = pd.Timestamp("1970-01-01", tz="UTC")
        seconds = (ts.fillna(epoch) - epoch) // pd.Timedelta(seconds=1)
        return pd.Series(seconds.to_numpy(dtype=np.int64))
    raise ValueError(f"unknown column kind {col.kind!r}")


def _validate(df: pd.DataFrame, kind: str, chk: _Checker) -> pd.DataFrame:
    out = {}
    for col in SCHEMAS[kind]:
        out[col.name] = _column(df, col, chk)
    frame = pd.DataFrame(out)
    key = UNIQUE[kind]
    chk.flag(frame[key].duplicated().to_numpy(), key, lambda r: f"duplicate {key} {frame[key].iloc[r]!r}")
    return frame


def read_table(path: Path, kind: str) -> pd.DataFrame:
    """Read and validate one file of the given kind (catalog, customers, events or offer_exposures)."""
    return _read_checked(path, kind, lambda _frame, _chk: None)


def _read_checked(path: Path, kind: str, more: Callable[[pd.DataFrame, _Checker], None]) -> pd.DataFrame:
    """`read_table` with `more` checks on the converted frame, reported with the column checks (earliest first)."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown data kind {kind!r}")
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    table, line_of = _to_table(path, kind)
    chk = _Checker(path, line_of)
    if path.suffix != ".parquet":
        _csv_rows(path, table, chk)
    df = table.to_pandas()
    frame = _validate(df, kind, chk)
    if kind == "events":
        needs_item = frame["type"] != "email_open"
        chk.flag((needs_item & (frame["item_id"] == "")).to_numpy(), "item_id", lambda r: "empty for an item event")
    more(frame, chk)
    chk.raise_first()
    return frame


def find_exposures(data_dir: Path) -> Path | None:
    """The shop's offer_exposures file (Parquet or CSV), or None when it has none."""
    for ext in (".parquet", ".csv"):
        p = Path(data_dir) / f"{EXPOSURES_FILE}{ext}"
        if p.exists():
            return p
    return None


def read_exposures(path: Path, customers: pd.Series | None = None) -> pd.DataFrame:
    """Read and validate an offer exposures file, sorted by timestamp (int64 unix seconds).

    Beyond the column checks: offer_type must be lower-case letters, digits and underscores (it names the
    model response_<type>), true_p must lie in [0, 1] when given, and with `customers` every customer_id
    must be one of them.
    """

    def checks(frame: pd.DataFrame, chk: _Checker) -> None:
        kinds = frame["offer_type"]
        bad_type = ~kinds.str.fullmatch(OFFER_TYPE.pattern).to_numpy(dtype=bool) & (kinds != "").to_numpy()
        chk.flag(
            bad_type,
            "offer_type",
            lambda r: (
                f"offer type {kinds.iloc[r]!r} must be 1-40 lower-case letters, digits or underscores "
                "(it names the model response_<type>)"
            ),
        )
        chk.flag((frame["true_p"] > 1.0).to_numpy(), "true_p", lambda r: "must be <= 1 (a probability)")
        if customers is not None:
            cust = frame["customer_id"]
            unknown = (~cust.isin(customers) & (cust != "")).to_numpy()
            chk.flag(unknown, "customer_id", lambda r: f"unknown customer {cust.iloc[r]!r}")

    frame = _read_checked(Path(path), EXPOSURES_FILE, checks)
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def read_shop(data_dir: Path) -> ShopData:
    """Read the three files and check that events refer to known customers and items."""
    catalog = read_table(find_file(data_dir, "catalog"), "catalog")
    customers = read_table(find_file(data_dir, "customers"), "customers")
    events_path = find_file(data_dir, "events")
    events = read_table(events_path, "events")
    line_of = (lambda r: r + 1) if events_path.suffix == ".parquet" else (lambda r: r + 2)
    chk = _Checker(events_path, line_of)
    cust = events["customer_id"]
    chk.flag(
        (~cust.isin(customers["customer_id"])).to_numpy(), "customer_id", lambda r: f"unknown customer {cust[r]!r}"
    )
    items = events["item_id"]
    unknown = (items != "") & ~items.isin(catalog["item_id"])
    chk.flag(unknown.to_numpy(), "item_id", lambda r: f"unknown item {items[r]!r}")
    chk.raise_first()
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    return ShopData(catalog=catalog, customers=customers, events=events)
