"""The hidden truth of a synthetic shop: the click/cart/buy model shared by the generator and by later
simulations, the `ShopTruth` arrays and their loader, and the deterministic truth.npz writer."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

TRUTH_JSON = "truth.json"
TRUTH_NPZ = "truth.npz"


@dataclass(frozen=True)
class ClickModel:
    """Weights of the true response model; see `CLICK_MODEL_DOC` for the formulas."""

    taste_weight: float = 1.0
    taste_floor: float = -4.0  # log(K·taste) is clipped here so a zero taste is unlikely, not impossible
    popularity_weight: float = 0.5
    click_bias: float = -4.5
    cart_bias: float = -5.5
    buy_bias: float = -0.7
    buy_slope: float = 0.5


CLICK_MODEL_DOC: dict[str, str] = {
    "indices": "c = customer index (customer_id 'c17' -> 17), i = item index (item_id 'i5' -> 5), "
    "k = item_category[i], K = number of categories",
    "taste_term": "max(log(K * taste[c, k]), taste_floor)",
    "style_term": "dot(style[c], item_factors[i])",
    "price_term": "-price_sensitivity[c] * log(price / category_ref_price[k]); price = unit price offered "
    "(catalog price by default, promo price in the generated events)",
    "popularity_term": "item_pop_term[i] = log(n_items_in_category * item_popularity[i]) (0 = average item)",
    "affinity": "taste_weight*taste_term + style_term + price_term + popularity_weight*popularity_term",
    "p_click": "P(click | item shown) = sigmoid(click_bias + affinity)",
    "p_cart": "P(add_to_cart | view_item) = sigmoid(cart_bias + affinity)",
    "p_buy": "P(purchase | add_to_cart) = sigmoid(buy_bias + buy_slope * (style_term + price_term))",
    "true_purchase_probability": "P(purchase | item shown) = p_click * p_cart * p_buy",
    "view_choice": "inside a session of category k the viewed items are drawn without replacement with "
    "weight exp(popularity_term + style_term + price_term) (popularity-proposal, Gumbel-top-k "
    "resampling of 16 candidates)",
}


def sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float64)


def taste_term(taste_values: npt.NDArray[np.floating[Any]], n_categories: int, floor: float) -> FloatArray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(n_categories * taste_values.astype(np.float64)), floor)


def affinity(
    cm: ClickModel, taste_t: FloatArray, style_t: FloatArray, price_t: FloatArray, pop_t: FloatArray
) -> FloatArray:
    return cm.taste_weight * taste_t + style_t + price_t + cm.popularity_weight * pop_t


def p_cart(cm: ClickModel, aff: FloatArray) -> FloatArray:
    return sigmoid(cm.cart_bias + aff)


def p_buy(cm: ClickModel, style_t: FloatArray, price_t: FloatArray) -> FloatArray:
    return sigmoid(cm.buy_bias + cm.buy_slope * (style_t + price_t))


@dataclass(frozen=True)
class ShopTruth:
    """Everything hidden behind a generated shop; row c of a customer array is customer_id f"c{c}",
    row i of an item array is item_id f"i{i}". Times are unix seconds (UTC)."""

    params: dict[str, Any]  # the parsed truth.json
    click_model: ClickModel
    categories: tuple[str, ...]
    category_is_consumable: BoolArray
    category_repurchase_days: FloatArray  # NaN for durables
    category_ref_price: FloatArray
    taste: F32Array  # (n_customers, n_categories), rows sum to 1
    style: F32Array  # (n_customers, style_dim)
    price_sensitivity: F32Array
    activity_rate: F32Array  # expected sessions per 30 active days
    repurchase_multiplier: F32Array
    email_engagement: F32Array  # P(open) of one campaign email
    email_click_rate: F32Array  # P(click | open)
    created_at: IntArray
    churn_at: IntArray  # no sessions, repurchases or email opens from this time on
    item_category: IntArray
    item_popularity: F32Array  # share of views inside its category (sums to 1 per category)
    item_pop_term: F32Array
    item_factors: F32Array  # (n_items, style_dim)
    item_price: FloatArray
    item_cost: FloatArray
    item_margin: FloatArray  # (price - cost) / price
    item_available_until: IntArray  # carts and purchases stop here (sold out or delisted)
    item_week_discount: F32Array  # (n_items, n_weeks) promo discount by week since the window start
    window_start: int
    campaign_send_at: IntArray
    campaign_factor: F32Array  # multiplies every customer's open probability for that campaign

    @property
    def n_categories(self) -> int:
        return len(self.categories)


_SCALARS = {"params", "click_model", "categories", "window_start"}


def array_field_names() -> list[str]:
    return [f.name for f in fields(ShopTruth) if f.name not in _SCALARS]


def _terms(
    truth: ShopTruth, customer_idx: npt.ArrayLike, item_idx: npt.ArrayLike, price: npt.ArrayLike | None
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    c = np.asarray(customer_idx, dtype=np.int64)
    i = np.asarray(item_idx, dtype=np.int64)
    c, i = np.broadcast_arrays(c, i)
    k = truth.item_category[i]
    offered = truth.item_price[i] if price is None else np.broadcast_to(np.asarray(price, np.float64), c.shape)
    taste_t = taste_term(truth.taste[c, k], truth.n_categories, truth.click_model.taste_floor)
    style_t = np.einsum("...d,...d->...", truth.style[c].astype(np.float64), truth.item_factors[i])
    price_t = -truth.price_sensitivity[c].astype(np.float64) * np.log(offered / truth.category_ref_price[k])
    pop_t = truth.item_pop_term[i].astype(np.float64)
    return taste_t, np.asarray(style_t, dtype=np.float64), price_t, pop_t


def true_funnel_probabilities(
    truth: ShopTruth,
    customer_idx: npt.ArrayLike,
    item_idx: npt.ArrayLike,
    price: npt.ArrayLike | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(P(click | shown), P(cart | view), P(purchase | cart)) for paired customer and item indices."""
    cm = truth.click_model
    taste_t, style_t, price_t, pop_t = _terms(truth, customer_idx, item_idx, price)
    aff = affinity(cm, taste_t, style_t, price_t, pop_t)
    return sigmoid(cm.click_bias + aff), p_cart(cm, aff), p_buy(cm, style_t, price_t)


def true_click_probability(
    truth: ShopTruth, customer_idx: npt.ArrayLike, item_idx: npt.ArrayLike, price: npt.ArrayLike | None = None
) -> FloatArray:
    return true_funnel_probabilities(truth, customer_idx, item_idx, price)[0]


def true_purchase_probability(
    truth: ShopTruth,
    customer_idx: npt.ArrayLike,
    item_idx: npt.ArrayLike,
    price: npt.ArrayLike | None = None,
) -> FloatArray:
    """P(the customer buys the item | it is shown to them) = p_click * p_cart * p_buy (see truth.json)."""
    click, cart, buy = true_funnel_probabilities(truth, customer_idx, item_idx, price)
    return click * cart * buy


def write_npz(path: Path, arrays: dict[str, npt.NDArray[Any]]) -> None:
    """np.savez stamps each member with the wall-clock time; a fixed date keeps the file byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_truth(out: Path) -> ShopTruth:
    """Read truth.json and truth.npz written by `generate_shop` into `out`."""
    params: dict[str, Any] = json.loads((Path(out) / TRUTH_JSON).read_text(encoding="utf-8"))
    with np.load(Path(out) / TRUTH_NPZ, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in array_field_names()}
    cm = ClickModel(**params["click_model"]["parameters"])
    return ShopTruth(
        params=params,
        click_model=cm,
        categories=tuple(c["name"] for c in params["categories"]),
        window_start=int(params["window"]["start_unix"]),
        **arrays,
    )
