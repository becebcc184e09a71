"""The recommendation model at serving time: ALS factors (memory-mapped), item neighbours, bestsellers, and the
version's propensity models when it has them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engine.catalog import CatalogItem
from engine.registry import Artifact, ArtifactError
from engine.scoring import PROPENSITY_DIR, ModelFileError, PropensityModels, load_propensity_models

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# File names inside a registry version.
ITEM_IDS = "item_ids.npy"
ITEM_FACTORS = "item_factors.npy"
USER_IDS = "user_ids.npy"  # sorted, for binary search
USER_ROWS = "user_rows.npy"
USER_FACTORS = "user_factors.npy"
NEIGHBOURS_IDX = "neighbours_idx.npy"
NEIGHBOURS_SIM = "neighbours_sim.npy"
BESTSELLERS = "bestsellers.json"
CATALOG_SNAPSHOT = "catalog.json"
REQUIRED_FILES = (
    ITEM_IDS,
    ITEM_FACTORS,
    USER_IDS,
    USER_ROWS,
    USER_FACTORS,
    NEIGHBOURS_IDX,
    NEIGHBOURS_SIM,
    BESTSELLERS,
    CATALOG_SNAPSHOT,
)


@dataclass(frozen=True, eq=False)
class RecModel:
    """Everything the pipeline needs from training, indexed by *model item* position."""

    version: str
    item_ids: npt.NDArray[np.str_]
    item_factors: F32
    user_ids: npt.NDArray[np.str_]
    user_rows: npt.NDArray[np.int32]
    user_factors: F32
    neighbours_idx: npt.NDArray[np.int32]
    neighbours_sim: F32
    bestsellers: tuple[str, ...]
    bestsellers_by_category: Mapping[str, tuple[str, ...]]
    repurchase_days: Mapping[str, float]  # typical gap between repeat purchases, per category
    regularization: float
    catalog_snapshot: tuple[CatalogItem, ...]
    manifest: Mapping[str, object]
    propensity: PropensityModels | None = None  # None: the version was trained without them

    @property
    def n_items(self) -> int:
        return int(self.item_factors.shape[0])

    def user_vector(self, customer_id: str) -> F32 | None:
        """The trained factor of a known customer."""
        row = int(self.factor_rows([customer_id])[0])
        return np.asarray(self.user_factors[row], dtype=np.float32) if row >= 0 else None

    def factor_rows(self, customer_ids: Sequence[str]) -> I64:
        """Each customer's row of `user_factors`, or -1 for a customer the model has not seen (one search)."""
        at = _positions(self.user_ids, customer_ids)
        return np.where(at >= 0, self.user_rows[np.maximum(at, 0)].astype(np.int64), -1) if len(at) else at

    def item_rows(self, item_ids: Sequence[str]) -> I64:
        """Each item's model position, or -1 for an item the model has not seen (one search)."""
        return _positions(self.item_ids, item_ids)

    def fold_in_many(self, item_rows: I64, weights: F32, starts: I64) -> F32:
        """User factors for customers the model has not seen, from the items they touched: customer j
        touched `item_rows[starts[j]:starts[j + 1]]` (at least one) with those `weights`.

        One least-squares step of ALS with the item factors fixed (as implicit's recalculate_user), in the
        confidence-weighted form x = (G + Yᵤᵀ Wᵤ Yᵤ)⁻¹ Yᵤᵀ (1 + wᵤ), G = YᵀY + λI, Wᵤ = diag(wᵤ). G⁻¹ is
        computed once per model, so a customer's solve is the Woodbury identity over the n items they
        touched, x = G⁻¹b − Pᵀ (I + Wᵤ Yᵤ Pᵀ)⁻¹ Wᵤ P b with P = Yᵤ G⁻¹ (n × n, not factors × factors), in
        float64; the products run over all customers' items at once, and the n × n systems are solved
        stacked, padded with items of weight 0 (which change nothing).
        """
        f = self.item_factors.shape[1]
        k = len(starts) - 1
        if k <= 0:
            return np.empty((0, f), dtype=np.float32)
        counts = np.diff(starts)
        gram_inv = self._gram_inverse
        y = self.item_factors[item_rows].astype(np.float64)  # every touched item, customer by customer
        w = weights.astype(np.float64)
        p = y @ gram_inv  # rows of P, all customers at once
        b = np.add.reduceat(y * (1.0 + w)[:, None], starts[:-1], axis=0)  # (k, f)
        owner = np.repeat(np.arange(k), counts)
        pb = np.einsum("if,if->i", p, b[owner])  # (P b) per touched item
        # Customer j's items padded to `width` slots; a padding slot points at an extra zero row.
        width = int(counts.max())
        slot = np.arange(len(item_rows)) - np.repeat(starts[:-1], counts)
        at = np.full((k, width), len(item_rows), dtype=np.int64)
        at[owner, slot] = np.arange(len(item_rows))
        y_pad = np.vstack([y, np.zeros((1, f))])[at]  # (k, n, f)
        p_pad = np.vstack([p, np.zeros((1, f))])[at]
        w_pad = np.append(w, 0.0)[at]  # (k, n)
        system = np.eye(width) + w_pad[:, :, None] * np.einsum("knf,kmf->knm", y_pad, p_pad)
        rhs = (w_pad * np.append(pb, 0.0)[at])[:, :, None]
        z = np.linalg.solve(system, rhs)[:, :, 0]  # (k, n)
        x = b @ gram_inv - np.einsum("kn,knf->kf", z, p_pad)
        return np.asarray(x, dtype=np.float32)

    @property
    def _gram_inverse(self) -> npt.NDArray[np.float64]:
        """(YᵀY + λI)⁻¹ in float64, computed once per model."""
        cached = self.__dict__.get("_gram_inverse_cache")
        if cached is None:
            y = np.asarray(self.item_factors, dtype=np.float64)
            gram = y.T @ y + self.regularization * np.eye(y.shape[1])
            cached = np.linalg.inv(gram)
            cached = (cached + cached.T) / 2  # symmetric to the last bit: P's transpose is Yᵤ G⁻¹
            object.__setattr__(self, "_gram_inverse_cache", cached)
        return cached


def _positions(sorted_ids: npt.NDArray[np.str_], wanted: Sequence[str]) -> I64:
    """Where each wanted id is in `sorted_ids`, or -1.

    The ids are searched as `sorted_ids`' own fixed-width strings: numpy would otherwise widen the whole
    sorted array to the longest wanted id on every search (0.7 ms for 80k ids, against 4 µs). An id cut
    to that width may land on another id, which the exact comparison then rejects (it is not there: no
    stored id is longer).
    """
    if not len(sorted_ids) or not len(wanted):
        return np.full(len(wanted), -1, dtype=np.int64)
    keys = np.asarray(wanted, dtype=sorted_ids.dtype)
    at = np.minimum(np.searchsorted(sorted_ids, keys), len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == np.asarray(wanted, dtype=np.str_), at, -1).astype(np.int64)


def _load_npy(artifact: Artifact, name: str, mmap: bool = False) -> np.ndarray:  # type: ignore[type-arg]
    path = artifact.file(name)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot be read as a numpy array: {exc}") from exc


def load_rec_model(artifact: Artifact) -> RecModel:
    """Load a verified artifact; shape mismatches are refused with the file named."""
    missing = [n for n in REQUIRED_FILES if n not in artifact.manifest.get("files", {})]
    if missing:
        raise ArtifactError(f"{artifact.path}: manifest lacks {', '.join(missing)}")
    item_ids = _load_npy(artifact, ITEM_IDS)
    item_factors = _load_npy(artifact, ITEM_FACTORS).astype(np.float32, copy=False)
    user_ids = _load_npy(artifact, USER_IDS)
    user_rows = _load_npy(artifact, USER_ROWS)
    user_factors = _load_npy(artifact, USER_FACTORS, mmap=True)
    nb_idx = _load_npy(artifact, NEIGHBOURS_IDX)
    nb_sim = _load_npy(artifact, NEIGHBOURS_SIM)
    n_items, k = item_factors.shape
    checks = [
        (ITEM_IDS, item_ids.shape == (n_items,)),
        (USER_ROWS, user_rows.shape == user_ids.shape),
        (USER_FACTORS, user_factors.ndim == 2 and user_factors.shape[1] == k),
        (NEIGHBOURS_IDX, nb_idx.ndim == 2 and nb_idx.shape[0] == n_items),
        (NEIGHBOURS_SIM, nb_sim.shape == nb_idx.shape),
    ]
    for name, ok in checks:
        if not ok:
            raise ArtifactError(f"{artifact.file(name)}: shape does not match the item factors {item_factors.shape}")
    if len(user_rows) and (int(user_rows.max()) >= user_factors.shape[0] or int(user_rows.min()) < 0):
        raise ArtifactError(f"{artifact.file(USER_ROWS)}: row index out of range")
    if nb_idx.size and (int(nb_idx.max()) >= n_items or int(nb_idx.min()) < -1):
        raise ArtifactError(f"{artifact.file(NEIGHBOURS_IDX)}: item index out of range")
    try:
        best = json.loads(artifact.file(BESTSELLERS).read_text(encoding="utf-8"))
        snapshot = json.loads(artifact.file(CATALOG_SNAPSHOT).read_text(encoding="utf-8"))
        catalog = tuple(CatalogItem(**row) for row in snapshot)
        bestsellers = tuple(str(i) for i in best["global"])
        by_cat = {str(c): tuple(str(i) for i in ids) for c, ids in best["by_category"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{artifact.path}: bestsellers or catalog snapshot unreadable: {exc}") from exc
    params = artifact.manifest.get("params", {})
    propensity = _load_propensity(artifact)
    return RecModel(
        version=artifact.version,
        item_ids=item_ids,
        item_factors=np.ascontiguousarray(item_factors),
        user_ids=user_ids,
        user_rows=user_rows.astype(np.int32, copy=False),
        user_factors=user_factors,
        neighbours_idx=nb_idx.astype(np.int32, copy=False),
        neighbours_sim=nb_sim.astype(np.float32, copy=False),
        bestsellers=bestsellers,
        bestsellers_by_category=by_cat,
        repurchase_days={str(k): float(v) for k, v in artifact.manifest.get("repurchase_days", {}).items()},
        regularization=float(params.get("regularization", 0.05)) if isinstance(params, dict) else 0.05,
        catalog_snapshot=catalog,
        manifest=artifact.manifest,
        propensity=propensity,
    )


def _load_propensity(artifact: Artifact) -> PropensityModels | None:
    """The version's propensity models; a folder with a file the manifest does not vouch for, or a model that
    does not load, refuses the whole version (as a bad factor file does)."""
    folder = artifact.file(PROPENSITY_DIR)
    if not folder.is_dir():
        return None
    listed = artifact.manifest.get("files", {})
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(artifact.path).as_posix()
        if path.is_file() and name not in listed:
            raise ArtifactError(f"{path}: not listed in the manifest, so its checksum was never verified")
    try:
        return load_propensity_models(folder)
    except (ModelFileError, ValueError) as exc:
        raise ArtifactError(f"{artifact.path}: propensity models refused: {exc}") from exc


def save_array(path: Path, arr: np.ndarray) -> None:  # type: ignore[type-arg]
    np.save(path, arr, allow_pickle=False)
