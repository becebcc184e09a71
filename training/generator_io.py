"""Writing the synthetic shop's tables: Arrow tables for catalog, customers, events and offer exposures, fast
fixed-width string columns (ids, ISO timestamps) and the Parquet/CSV writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from training.generator_categories import CategorySpec
from training.generator_offers import OFFER_CHANNELS, OFFER_TYPES, OfferExposures
from training.generator_population import CONSENTS, COUNTRIES, DAY, Customers, Items
from training.generator_sim import EVENT_TYPES, EventBlock
from training.generator_truth import IntArray


def _ids(prefix: str, n: int) -> pa.Array:
    return pa.array([f"{prefix}{i}" for i in range(n)], type=pa.string())


def _fixed_width_strings(chars: npt.NDArray[np.uint8]) -> pa.Array:
    """An Arrow string column from an (n, width) byte matrix, without a Python object per row."""
    n, width = chars.shape
    offsets = np.arange(n + 1, dtype=np.int32) * width
    data = np.ascontiguousarray(chars)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def _put_digits(chars: npt.NDArray[np.uint8], col: int, values: IntArray, width: int) -> None:
    for j in range(width):
        chars[:, col + width - 1 - j] = 48 + (values // 10**j) % 10


def _iso_seconds(ts: IntArray) -> pa.Array:
    """'YYYY-MM-DDTHH:MM:SSZ' for unix seconds (Howard Hinnant's civil-from-days, vectorised)."""
    days, secs = np.divmod(ts, DAY)
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = np.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    chars = np.empty((len(ts), 20), dtype=np.uint8)
    chars[:] = np.frombuffer(b"0000-00-00T00:00:00Z", dtype=np.uint8)
    for col, values, width in (
        (0, year, 4), (5, month, 2), (8, day, 2), (11, secs // 3600, 2), (14, secs // 60 % 60, 2), (17, secs % 60, 2)
    ):  # fmt: skip
        _put_digits(chars, col, values, width)
    return _fixed_width_strings(chars)


def _timestamps(ts: IntArray, fmt: str) -> pa.Array:
    if fmt == "csv":
        return _iso_seconds(ts)
    return pa.array(ts * 1_000_000, type=pa.timestamp("us", tz="UTC"))


def catalog_table(it: Items, cats: tuple[CategorySpec, ...]) -> pa.Table:
    n = len(it.category)
    ids = [f"i{i}" for i in range(n)]
    return pa.table(
        {
            "item_id": pa.array(ids, type=pa.string()),
            "title": pa.array(it.titles, type=pa.string()),
            "category": pa.array([c.name for c in cats], type=pa.string()).take(pa.array(it.category)),
            "price": pa.array(it.price, type=pa.float64()),
            "cost": pa.array(it.cost, type=pa.float64()),
            "stock": pa.array(it.stock, type=pa.int64()),
            "url": pa.array([f"https://shop.example/p/{i}" for i in ids], type=pa.string()),
            "image_url": pa.array([f"https://cdn.shop.example/img/{i}.jpg" for i in ids], type=pa.string()),
            "active": pa.array(it.active, type=pa.bool_()),
        }
    )


def customers_table(cu: Customers, fmt: str) -> pa.Table:
    n = len(cu.created_at)
    cols: dict[str, pa.Array] = {
        "customer_id": _ids("c", n),
        "created_at": _timestamps(cu.created_at, fmt),
        "country": pa.array(list(COUNTRIES), type=pa.string()).take(pa.array(cu.country)),
    }
    for j, name in enumerate(CONSENTS):
        cols[name] = pa.array(cu.consent[:, j], type=pa.bool_())
    return pa.table(cols)


def events_table(ev: EventBlock, n_customers: int, n_items: int, fmt: str) -> pa.Table:
    n = len(ev.ts)
    width = max(9, len(str(max(n - 1, 0))))
    chars = np.empty((n, width + 1), dtype=np.uint8)
    chars[:, 0] = ord("e")
    _put_digits(chars, 1, np.arange(n, dtype=np.int64), width)
    item_idx = pa.array(ev.item, mask=ev.item < 0, type=pa.int64())
    return pa.table(
        {
            "event_id": _fixed_width_strings(chars),
            "customer_id": _ids("c", n_customers).take(pa.array(ev.cust)),
            "type": pa.array(list(EVENT_TYPES), type=pa.string()).take(pa.array(ev.etype)),
            "item_id": _ids("i", n_items).take(item_idx),
            "quantity": pa.array(ev.qty, type=pa.int64()),
            "price": pa.array(ev.price, type=pa.float64()),
            "timestamp": _timestamps(ev.ts, fmt),
        }
    )


def exposures_table(ex: OfferExposures, n_customers: int, fmt: str) -> pa.Table:
    n = len(ex.ts)
    width = max(9, len(str(max(n - 1, 0))))
    chars = np.empty((n, width + 1), dtype=np.uint8)
    chars[:, 0] = ord("x")
    _put_digits(chars, 1, np.arange(n, dtype=np.int64), width)
    return pa.table(
        {
            "exposure_id": _fixed_width_strings(chars),
            "customer_id": _ids("c", n_customers).take(pa.array(ex.cust)),
            "offer_type": pa.array(list(OFFER_TYPES), type=pa.string()).take(pa.array(ex.offer_type)),
            "channel": pa.array(list(OFFER_CHANNELS), type=pa.string()).take(pa.array(ex.channel)),
            "responded": pa.array(ex.responded, type=pa.bool_()),
            "true_p": pa.array(np.round(ex.true_p, 6), type=pa.float64()),
            "timestamp": _timestamps(ex.ts, fmt),
        }
    )


def write_table(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path, compression="zstd")
        return
    # Arrow would quote the header; titles hold no commas or quotes, so nothing else needs quoting.
    with pa.OSFile(str(path), "wb") as sink:
        sink.write((",".join(table.column_names) + "\n").encode())
        pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
