"""Public datasets shipped inside PyPI wheels (MovieLens 100K in `recbole`, CDNOW in `lifetimes`).

The wheel is fetched once with `pip download --no-deps` into a cache folder, the member is read with
`zipfile` and checked against the SHA-256 pinned here; nothing is installed and no data is committed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CDNOW", "MOVIELENS_100K", "PublicDataset", "cache_dir", "fetch"]


@dataclass(frozen=True)
class PublicDataset:
    name: str
    package: str  # distribution on PyPI
    version: str
    wheel_sha256: str
    members: dict[str, str]  # member path inside the wheel -> SHA-256 of its bytes

    def member(self, suffix: str) -> str:
        matches = [m for m in self.members if m.endswith(suffix)]
        if len(matches) != 1:
            raise KeyError(f"{self.name}: no single member ending in {suffix!r} (have {sorted(self.members)})")
        return matches[0]


MOVIELENS_100K = PublicDataset(
    name="MovieLens 100K (GroupLens, as shipped in the recbole wheel)",
    package="recbole",
    version="1.2.1",
    wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
    members={
        "recbole/dataset_example/ml-100k/ml-100k.inter": (
            "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
        ),
        "recbole/dataset_example/ml-100k/ml-100k.item": (
            "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"
        ),
        "recbole/dataset_example/ml-100k/ml-100k.user": (
            "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"
        ),
    },
)
CDNOW = PublicDataset(
    name="CDNOW master (Fader & Hardie, as shipped in the lifetimes wheel)",
    package="lifetimes",
    version="0.11.3",
    wheel_sha256="261e3dc89977c2b60767ca6728aaa29d429de0c814635070a749c36555895da8",
    members={
        "lifetimes/datasets/CDNOW_master.txt": "eff6889ed364c5199d6eacbbeb7a6d559971df4406ac876f322c373f00a072ef",
    },
)


class DownloadError(RuntimeError):
    """The dataset's wheel is not cached and PyPI did not give it (a checksum mismatch is not this)."""


def cache_dir() -> Path:
    """NEXTBEST_DATA_CACHE, else ~/.cache/nextbest/datasets."""
    env = os.environ.get("NEXTBEST_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nextbest" / "datasets"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _wheel(ds: PublicDataset, cache: Path) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    # Wheel file names differ in case between releases (Lifetimes-0.11.3-...); match loosely.
    prefix = f"{ds.package}-{ds.version}-".lower()
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels)]
        proc = subprocess.run([*cmd, f"{ds.package}=={ds.version}"], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            why = proc.stderr.strip()[-500:]
            raise DownloadError(f"could not download {ds.package}=={ds.version} from PyPI: {why}")
        found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix)]
        if not found:
            raise RuntimeError(f"pip download of {ds.package}=={ds.version} left no wheel in {wheels}")
    wheel = found[0]
    if (got := _sha256(wheel)) != ds.wheel_sha256:
        raise RuntimeError(f"{wheel}: SHA-256 {got} is not the pinned {ds.wheel_sha256}; delete it to download again")
    return wheel


def fetch(ds: PublicDataset, suffix: str, cache: Path | None = None) -> Path:
    """The member of ds whose path ends in suffix, extracted under the cache and checked; downloads once."""
    cache = cache or cache_dir()
    member = ds.member(suffix)
    target = cache / ds.package / ds.version / member
    if target.exists() and _sha256(target) == ds.members[member]:
        return target
    with zipfile.ZipFile(_wheel(ds, cache)) as wheel:
        data = wheel.read(member)
    if (got := hashlib.sha256(data).hexdigest()) != ds.members[member]:
        raise RuntimeError(f"{member} in the {ds.package} wheel has SHA-256 {got}, not the pinned one")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".partial")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target
