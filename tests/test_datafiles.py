import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.datafiles import DataError, read_shop, read_table

CATALOG_HEADER = "item_id,title,category,price,cost,stock,url,image_url,active"
GOOD_CATALOG = [
    "i1,Oat Milk,groceries,2.50,1.20,40,https://s/p/i1,https://s/i/i1.jpg,true",
    "i2,Kettle,kitchen,30.00,18.00,3,https://s/p/i2,https://s/i/i2.jpg,true",
    "i3,Lamp,home_decor,45.00,20.00,0,https://s/p/i3,https://s/i/i3.jpg,false",
]


def _write(tmp_path: Path, name: str, header: str, rows: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_good_catalog_reads_with_types(tmp_path):
    df = read_table(_write(tmp_path, "catalog.csv", CATALOG_HEADER, GOOD_CATALOG), "catalog")
    assert list(df["item_id"]) == ["i1", "i2", "i3"]
    assert df["price"].dtype.kind == "f" and df["stock"].dtype.kind == "i"
    assert list(df["active"]) == [True, True, False]


@pytest.mark.parametrize(
    ("row", "column", "reason"),
    [
        ("i4,Soap,household,abc,1.0,5,u,i,true", "price", "not a number"),
        ("i4,Soap,household,2.0,1.0,-5,u,i,true", "stock", ">= 0"),
        ("i4,Soap,household,2.0,1.0,2.5,u,i,true", "stock", "whole number"),
        ("i4,Soap,household,2.0,1.0,5,u,i,maybe", "active", "not a boolean"),
        (",Soap,household,2.0,1.0,5,u,i,true", "item_id", "empty"),
        ("i1,Soap,household,2.0,1.0,5,u,i,true", "item_id", "duplicate"),
        ("i{4},Soap,household,2.0,1.0,5,u,i,true", "item_id", "braces"),
    ],
)
def test_a_bad_catalog_row_names_file_line_and_column(tmp_path, row, column, reason):
    path = _write(tmp_path, "catalog.csv", CATALOG_HEADER, [*GOOD_CATALOG, row])
    with pytest.raises(DataError) as info:
        read_table(path, "catalog")
    err = info.value
    assert err.file == path and err.line == 5 and err.column == column
    assert reason in err.reason
    assert "nothing was loaded" in str(err)


def test_a_short_row_is_located(tmp_path):
    path = _write(
        tmp_path, "catalog.csv", CATALOG_HEADER, [GOOD_CATALOG[0], "i9,Half a row,groceries", GOOD_CATALOG[1]]
    )
    with pytest.raises(DataError) as info:
        read_table(path, "catalog")
    assert info.value.line == 3
    assert "expected 9 fields" in info.value.reason


def test_invalid_utf8_is_located(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_bytes(("\n".join([CATALOG_HEADER, GOOD_CATALOG[0]]) + "\n").encode() + b"i5,Caf\xe9,x,1,1,1,u,i,true\n")
    with pytest.raises(DataError) as info:
        read_table(path, "catalog")
    assert info.value.line == 3 and "UTF-8" in info.value.reason


def test_missing_required_column(tmp_path):
    path = _write(tmp_path, "catalog.csv", "item_id,title,category,price,stock", ["i1,a,b,1.0,2"])
    with pytest.raises(DataError) as info:
        read_table(path, "catalog")
    assert info.value.line == 1 and info.value.column == "cost"


def test_events_refer_to_known_customers_and_items(tmp_path):
    _write(tmp_path, "catalog.csv", CATALOG_HEADER, GOOD_CATALOG)
    _write(tmp_path, "customers.csv", "customer_id,created_at,country", ["c1,2026-01-01T00:00:00Z,DE"])
    _write(
        tmp_path,
        "events.csv",
        "event_id,customer_id,type,item_id,quantity,price,timestamp",
        ["e1,c1,view_item,i1,1,2.5,2026-02-01T10:00:00Z", "e2,c1,purchase,i99,1,2.5,2026-02-01T10:05:00Z"],
    )
    with pytest.raises(DataError) as info:
        read_shop(tmp_path)
    assert info.value.line == 3 and info.value.column == "item_id" and "unknown item" in info.value.reason


def test_bad_event_type_and_timestamp(tmp_path):
    header = "event_id,customer_id,type,item_id,quantity,price,timestamp"
    path = _write(
        tmp_path,
        "events.csv",
        header,
        ["e1,c1,view_item,i1,1,2.5,2026-02-01T10:00:00Z", "e2,c1,teleport,i1,1,1,2026-02-01"],
    )
    with pytest.raises(DataError) as info:
        read_table(path, "events")
    assert info.value.line == 3 and info.value.column == "type"
    path = _write(tmp_path, "events.csv", header, ["e1,c1,view_item,i1,1,2.5,yesterday"])
    with pytest.raises(DataError) as info:
        read_table(path, "events")
    assert info.value.column == "timestamp"


NUMERIC = {"price": 3, "cost": 4, "stock": 5}


@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(min_value=1, max_value=30),
    bad_row=st.data(),
    column=st.sampled_from(sorted(NUMERIC)),
    junk=st.text(alphabet=string.ascii_letters + "#%", min_size=1, max_size=6),
)
def test_any_corrupted_numeric_cell_is_reported_at_its_line_and_column(tmp_path_factory, n_rows, bad_row, column, junk):
    rows = [f"i{i},Item {i},cat{i % 3},{1 + i}.5,{i}.25,{i},u,v,true" for i in range(n_rows)]
    k = bad_row.draw(st.integers(min_value=0, max_value=n_rows - 1))
    cells = rows[k].split(",")
    cells[NUMERIC[column]] = junk
    rows[k] = ",".join(cells)
    path = _write(tmp_path_factory.mktemp("h"), "catalog.csv", CATALOG_HEADER, rows)
    with pytest.raises(DataError) as info:
        read_table(path, "catalog")
    assert (info.value.line, info.value.column) == (k + 2, column)


def test_generated_shop_reads_back_in_both_formats(tmp_path):
    from training.generator import ShopSpec, generate_shop

    for fmt in ("csv", "parquet"):
        out = tmp_path / fmt
        generate_shop(ShopSpec(customers=200, items=60, days=30, seed=3, fmt=fmt), out)  # type: ignore[arg-type]
        shop = read_shop(out)
        assert len(shop.customers) == 200 and len(shop.catalog) == 60 and len(shop.events) > 0
