"""Bad input files are refused whole, with the file, line and column of the first problem.

Complements tests/test_datafiles.py (bad values in single cells, short rows, unknown references) with
broken files: truncated, wrongly encoded, huge, wrongly typed Parquet, empty, and random corruption.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from api.cli import app
from api.settings import get_settings
from training.datafiles import MAX_ID_LEN, MAX_TEXT_LEN, TRUE, DataError, read_table

CATALOG_HEADER = "item_id,title,category,price,cost,stock,url,image_url,active"
CATALOG = [
    "i1,Oat Milk,groceries,2.50,1.20,40,https://s/p/i1,https://s/i/i1.jpg,true",
    "i2,Kettle,kitchen,30.00,18.00,3,https://s/p/i2,https://s/i/i2.jpg,true",
    "i3,Lamp,home_decor,45.00,20.00,0,https://s/p/i3,https://s/i/i3.jpg,false",
]
CUSTOMERS_HEADER = "customer_id,created_at,country,consent_email"
EVENTS_HEADER = "event_id,customer_id,type,item_id,quantity,price,timestamp"


def _csv(rows: list[str], header: str = CATALOG_HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def _refused(tmp_path: Path, data: bytes, kind: str = "catalog", name: str | None = None) -> DataError:
    path = tmp_path / (name or f"{kind}.csv")
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_table(path, kind)
    err = info.value
    assert err.file == path and str(path) in str(err) and "nothing was loaded" in str(err)
    return err


# ---- truncated rows ---------------------------------------------------------------------------------


def test_a_file_cut_in_the_middle_of_its_last_line_names_that_line_and_the_first_missing_column(tmp_path):
    data = _csv(CATALOG)
    cut = data[: data.index(b",20.00,")]  # the download stopped inside line 4
    err = _refused(tmp_path, cut)
    assert (err.line, err.column) == (4, "cost") and "expected 9 fields, found 4" in err.reason


def test_a_row_with_too_many_fields_is_located(tmp_path):
    err = _refused(tmp_path, _csv([CATALOG[0], CATALOG[1] + ",surplus", CATALOG[2]]))
    assert err.line == 3 and "expected 9 fields, found 10" in err.reason


def test_an_unclosed_quote_is_located_at_its_line(tmp_path):
    err = _refused(tmp_path, _csv([CATALOG[0], 'i9,"Lamp, tall,home_decor,1,1,1,u,v,true', CATALOG[1]]))
    assert err.line == 3 and "fields" in err.reason


def test_a_quoted_line_break_is_refused_where_it_starts_so_later_lines_keep_their_numbers(tmp_path):
    rows = [CATALOG[0], 'i9,"Two\nlines",home_decor,1,1,1,u,v,true', "i8,Soap,household,abc,1,1,u,v,true"]
    err = _refused(tmp_path, _csv(rows))
    assert (err.line, err.column) == (3, "title") and "line break inside a quoted value" in err.reason


def test_a_blank_line_between_rows_is_called_an_empty_line(tmp_path):
    err = _refused(tmp_path, _csv([CATALOG[0], "", CATALOG[1]]))
    assert (err.line, err.column, err.reason) == (3, None, "empty line")


# ---- encodings ----------------------------------------------------------------------------------------


def test_a_latin1_byte_in_a_row_names_the_line_and_the_column(tmp_path):
    data = _csv([CATALOG[0]]) + "i5,Café au lait,groceries,3.10,1.50,9,u,v,true\n".encode("latin-1")
    err = _refused(tmp_path, data)
    assert (err.line, err.column) == (3, "title") and "UTF-8" in err.reason


def test_a_latin1_header_is_refused_at_line_one(tmp_path):
    data = "item_id,título,category,price,cost,stock\ni1,a,c,1,1,1\n".encode("latin-1")
    err = _refused(tmp_path, data)
    assert err.line == 1 and "UTF-8" in err.reason


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_file_with_a_byte_order_mark_is_refused_as_utf16(tmp_path, encoding):
    text = "\n".join([CATALOG_HEADER, *CATALOG]) + "\n"
    data = text.encode(encoding) if encoding == "utf-16" else b"\xfe\xff" + text.encode(encoding)
    err = _refused(tmp_path, data)
    assert err.line == 1 and "UTF-16" in err.reason and "save it as UTF-8" in err.reason


def test_a_utf8_byte_order_mark_and_crlf_line_ends_read_like_a_plain_file(tmp_path):
    plain = tmp_path / "plain.csv"
    plain.write_bytes(_csv(CATALOG))
    windows = tmp_path / "windows.csv"
    windows.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join([CATALOG_HEADER, *CATALOG]) + "\r\n").encode())
    pd.testing.assert_frame_equal(read_table(windows, "catalog"), read_table(plain, "catalog"))


# ---- huge fields --------------------------------------------------------------------------------------


def test_a_ten_megabyte_title_is_refused_at_its_line(tmp_path):
    huge = f"i9,{'x' * 10_000_000},home_decor,1,1,1,u,v,true"
    err = _refused(tmp_path, _csv([CATALOG[0], huge, CATALOG[1]]))
    assert (err.line, err.column) == (3, "title") and f"longer than {MAX_TEXT_LEN}" in err.reason


def test_an_id_longer_than_the_limit_is_refused(tmp_path):
    rows = [
        "e1,c1,view_item,i1,1,2.5,2026-02-01T10:00:00Z",
        f"e2,{'c' * (MAX_ID_LEN + 1)},view_item,i1,1,2.5,2026-02-01",
    ]
    err = _refused(tmp_path, _csv(rows, EVENTS_HEADER), "events")
    assert (err.line, err.column) == (3, "customer_id") and f"longer than {MAX_ID_LEN}" in err.reason


def test_an_id_with_a_control_code_is_refused_like_the_api_refuses_it(tmp_path):
    err = _refused(tmp_path, _csv([CATALOG[0], "i\x1f9,Soap,household,1,1,1,u,v,true"]))
    assert (err.line, err.column) == (3, "item_id") and "control codes" in err.reason


# ---- wrong types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "reason"), [("-0.01", "must be >= 0"), ("inf", "not a finite number"), ("1,5", "expected 9 fields")]
)
def test_a_bad_price_is_refused_at_its_line(tmp_path, cell, reason):
    err = _refused(tmp_path, _csv([CATALOG[0], f"i9,Soap,household,{cell},1,1,u,v,true"]))
    assert err.line == 3 and reason in err.reason


def test_a_day_first_date_is_not_an_iso_timestamp(tmp_path):
    rows = ["c1,2026-01-01T00:00:00Z,DE,true", "c2,31/12/2026,FR,false"]
    err = _refused(tmp_path, _csv(rows, CUSTOMERS_HEADER), "customers")
    assert (err.line, err.column) == (3, "created_at") and "ISO-8601" in err.reason


def test_a_header_with_spaces_after_the_commas_still_reads_every_column(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(_csv(["i1, Oat Milk, groceries, 2.50, 1.20, 40"], "item_id, title, category, price, cost, stock"))
    row = read_table(path, "catalog").iloc[0]
    assert (row["title"], row["category"], row["price"], row["stock"]) == ("Oat Milk", "groceries", 2.5, 40)


def test_a_column_named_twice_in_the_header_is_refused(tmp_path):
    err = _refused(tmp_path, _csv([CATALOG[0] + ",3.00"], CATALOG_HEADER + ",price"))
    assert (err.line, err.column) == (1, "price") and "more than once" in err.reason


def test_a_misspelt_optional_column_is_refused_rather_than_defaulted(tmp_path):
    header = CATALOG_HEADER.replace("active", "activ")  # every item would silently be active
    err = _refused(tmp_path, _csv(CATALOG, header))
    assert (err.line, err.column) == (1, "activ") and "did you mean 'active'" in err.reason


def test_other_extra_columns_are_ignored(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(_csv([row + ",Acme" for row in CATALOG], CATALOG_HEADER + ",brand"))
    assert list(read_table(path, "catalog")["item_id"]) == ["i1", "i2", "i3"]


def _parquet(tmp_path: Path, kind: str, table: pa.Table) -> Path:
    path = tmp_path / f"{kind}.parquet"
    pq.write_table(table, path)
    return path


CATALOG_COLUMNS = {
    "item_id": ["i1", "i2"],
    "title": ["Oat Milk", "Kettle"],
    "category": ["groceries", "kitchen"],
    "price": [2.5, 30.0],
    "cost": [1.2, 18.0],
    "stock": [40, 3],
}


@pytest.mark.parametrize(
    ("kind", "column", "values", "what"),
    [
        ("catalog", "price", [True, False], "cannot hold numbers"),
        ("catalog", "title", [["Oat", "Milk"], ["Kettle"]], "cannot hold text"),
        ("catalog", "stock", [{"n": 1}, {"n": 2}], "cannot hold whole numbers"),
        ("customers", "created_at", [1767225600, 1767312000], "cannot hold timestamps"),
    ],
)
def test_a_parquet_column_of_the_wrong_type_is_refused_by_name(tmp_path, kind, column, values, what):
    base = CATALOG_COLUMNS if kind == "catalog" else {"customer_id": ["c1", "c2"], "created_at": ["2026-01-01"] * 2}
    path = _parquet(tmp_path, kind, pa.table({**base, column: values}))
    with pytest.raises(DataError) as info:
        read_table(path, kind)
    err = info.value
    assert (err.file, err.line, err.column) == (path, None, column) and what in err.reason


def test_text_in_a_parquet_number_column_is_refused_at_its_row(tmp_path):
    path = _parquet(tmp_path, "catalog", pa.table({**CATALOG_COLUMNS, "cost": ["1.20", "eighteen"]}))
    with pytest.raises(DataError) as info:
        read_table(path, "catalog")
    assert (info.value.line, info.value.column) == (2, "cost") and "not a number" in info.value.reason


def test_a_missing_parquet_timestamp_is_an_empty_value(tmp_path):
    created = pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC), None], pa.timestamp("s", tz="UTC"))
    path = _parquet(tmp_path, "customers", pa.table({"customer_id": ["c1", "c2"], "created_at": created}))
    with pytest.raises(DataError) as info:
        read_table(path, "customers")
    assert (info.value.line, info.value.column, info.value.reason) == (2, "created_at", "empty value")


# ---- empty files and duplicates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (b"", 1, "the first line must be the header"),
        (b"\n\n", 1, "the first line must be the header"),
        (CATALOG_HEADER.encode(), 2, "only a header"),
        (CATALOG_HEADER.encode() + b"\n\n", 2, "only a header"),
    ],
)
def test_an_empty_or_header_only_csv_is_refused(tmp_path, data, line, reason):
    err = _refused(tmp_path, data)
    assert err.line == line and reason in err.reason


def test_an_empty_or_row_less_parquet_file_is_refused(tmp_path):
    empty = tmp_path / "catalog.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        read_table(empty, "catalog")
    schema = pa.table(CATALOG_COLUMNS).schema
    path = _parquet(tmp_path, "catalog", schema.empty_table())
    with pytest.raises(DataError, match="no rows"):
        read_table(path, "catalog")


@pytest.mark.parametrize(
    ("kind", "header", "rows", "key"),
    [
        (
            "customers",
            CUSTOMERS_HEADER,
            ["c1,2026-01-01,DE,true", "c2,2026-01-02,FR,no", "c1,2026-01-03,IT,no"],
            "customer_id",
        ),
        (
            "events",
            EVENTS_HEADER,
            ["e1,c1,view_item,i1,1,2.5,2026-02-01", "e2,c1,purchase,i1,1,2.5,2026-02-02"] * 2,
            "event_id",
        ),
    ],
)
def test_a_duplicate_id_is_refused_at_its_second_occurrence(tmp_path, kind, header, rows, key):
    err = _refused(tmp_path, _csv(rows, header), kind)
    assert (err.line, err.column) == (4, key) and "duplicate" in err.reason


# ---- random corruption --------------------------------------------------------------------------------

SMALL = _csv(CATALOG)
INTERESTING = b',"\n\r\x00\xff\xe9 {-.0123456789e'
byte = st.one_of(st.sampled_from(list(INTERESTING)), st.integers(0, 255))
mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, len(SMALL) - 1), byte),
    st.tuples(st.just("insert"), st.integers(0, len(SMALL)), byte),
    st.tuples(st.just("delete"), st.integers(0, len(SMALL) - 1), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, len(SMALL) - 1), st.just(0)),
)


def _mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, at, value in edits:
        pos = min(at, len(buf))
        if op == "replace" and pos < len(buf):
            buf[pos] = value
        elif op == "insert":
            buf[pos:pos] = bytes([value])
        elif op == "delete":
            del buf[pos : pos + 1]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


def _oracle(data: bytes) -> dict[str, list[str] | None]:
    """Each column's values as Python's csv module splits the text (None: not in the header, so the
    default applies): what a correct read must hold."""
    text = data.decode("utf-8").removeprefix("\ufeff")
    header, *rows = list(csv.reader(io.StringIO(text, newline="")))
    names = [name.strip() for name in header]
    return {
        name: [row[names.index(name)].strip() for row in rows] if name in names else None
        for name in CATALOG_HEADER.split(",")
    }


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=st.lists(mutation, min_size=1, max_size=3))
def test_a_randomly_corrupted_csv_reads_exactly_or_is_refused_naming_the_file(tmp_path, edits):
    data = _mutate(SMALL, edits)
    path = tmp_path / "catalog.csv"
    path.write_bytes(data)
    try:
        frame = read_table(path, "catalog")
    except DataError as err:  # any other exception fails the test
        assert err.file == path and str(path) in str(err)
        assert err.line is None or 1 <= err.line <= data.count(b"\n") + data.count(b"\r") + 2
        return
    # Accepted: it must be exactly what the bytes say, every row and every value (no partial read).
    expected = _oracle(data)
    ids = expected["item_id"]
    assert ids is not None and list(frame["item_id"]) == ids
    assert list(frame["title"]) == expected["title"] and list(frame["category"]) == expected["category"]
    assert list(frame["price"]) == [float(v) for v in expected["price"] or []]
    assert list(frame["stock"]) == [int(float(v)) for v in expected["stock"] or []]
    active = expected["active"]
    assert list(frame["active"]) == (
        [True] * len(ids) if active is None else [v.lower() in TRUE if v else True for v in active]
    )
    assert list(frame["url"]) == (expected["url"] or [""] * len(ids))


# ---- the command line ---------------------------------------------------------------------------------


@pytest.fixture
def bad_shop(tmp_path: Path) -> Path:
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "catalog.csv").write_bytes(_csv(CATALOG[:2]) + "i3,Crème brûlée,desserts,4,2,5,u,v,true\n".encode("cp1252"))
    (shop / "customers.csv").write_bytes(_csv(["c1,2026-01-01T00:00:00Z,DE,true"], CUSTOMERS_HEADER))
    (shop / "events.csv").write_bytes(_csv(["e1,c1,purchase,i1,1,2.5,2026-02-01T10:00:00Z"], EVENTS_HEADER))
    return shop


@pytest.mark.parametrize("command", ["load", "train"])
def test_load_and_train_exit_2_naming_file_line_and_column_and_write_nothing(
    command, bad_shop, tmp_path, monkeypatch, redis_url, keys
):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("NEXTBEST_KEY_PREFIX", keys.prefix)
    monkeypatch.setenv("NEXTBEST_DATA_DIR", str(tmp_path / "var"))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, [command, "--data", str(bad_shop)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    squeezed = "".join(result.output.split())  # rich wraps long paths anywhere
    assert "catalog.csv,line4,column'title':notvalidUTF-8" in squeezed
    assert not list(redis.Redis.from_url(redis_url).scan_iter(f"{keys.prefix}:*"))
    assert not (tmp_path / "var" / "registry").exists() or not any((tmp_path / "var" / "registry").iterdir())
