"""The model registry on disk: one folder per version, a manifest with checksums, an atomic LIVE pointer.

Layout::

    <root>/LIVE                    name of the live version (replaced atomically)
    <root>/<version>/manifest.json version, created, data range, parameters, metrics, sha256 of every file
    <root>/<version>/<files>       the artifact's files, subfolders included (manifest keys are relative
                                   POSIX paths, e.g. "propensity/purchase_30d.onnx")
    <root>/.staging-*/             versions being written (never read)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LIVE = "LIVE"
FORMAT = 1


class ArtifactError(RuntimeError):
    """A version is missing, incomplete or corrupt; the message says which file and why."""


@dataclass(frozen=True)
class Artifact:
    """A verified version: its folder and manifest."""

    path: Path
    manifest: Mapping[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def file(self, name: str) -> Path:
        return self.path / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _staged_files(staging: Path) -> list[Path]:
    """Every regular file under a staging folder, subfolders included, in a stable order (the manifest aside)."""
    return sorted(p for p in staging.rglob("*") if p.is_file() and p != staging / MANIFEST)


def _inside(version_dir: Path, name: str) -> Path:
    """The path of a manifest entry; an entry that points outside its version folder is refused."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ArtifactError(f"{version_dir / MANIFEST}: file entry {name!r} points outside the version folder")
    return version_dir / rel


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def stage(self) -> Path:
        """A fresh folder to write a new version's files into."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".staging-{secrets.token_hex(6)}"
        path.mkdir()
        return path

    def commit(self, staging: Path, meta: Mapping[str, Any], *, activate: bool = True) -> Artifact:
        """Checksum every staged file, write the manifest last, move the folder into place, go live."""
        created = dt.datetime.now(dt.UTC)
        staged = _staged_files(staging)
        files = {p.relative_to(staging).as_posix(): sha256_file(p) for p in staged}
        digest = hashlib.sha256("".join(files.values()).encode()).hexdigest()[:8]
        # Milliseconds keep names (and so their sort order) distinct for versions made in the same second.
        version = f"{created:%Y%m%dT%H%M%S}.{created.microsecond // 1000:03d}Z-{digest}"
        manifest = {
            "format": FORMAT,
            "version": version,
            "created": created.isoformat(timespec="seconds"),
            **meta,
            "files": files,
        }
        for f in staged:
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        for d in sorted({f.parent for f in staged if f.parent != staging}, reverse=True):
            _fsync_dir(d)
        _write_atomic(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        final = self.root / version
        os.replace(staging, final)
        _fsync_dir(self.root)
        artifact = Artifact(final, manifest)
        if activate:
            self.activate(version)
        return artifact

    def activate(self, version: str) -> None:
        """Point LIVE at a version after verifying it, so a broken version never goes live from here."""
        self.verify(version)
        _write_atomic(self.root / LIVE, (version + "\n").encode())

    def live_version(self) -> str | None:
        try:
            text = (self.root / LIVE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def versions(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def verify(self, version: str) -> Artifact:
        """Check that the manifest is complete and every file matches its checksum."""
        path = self.root / version
        if not path.is_dir():
            raise ArtifactError(f"model version {version!r} not found in {self.root}")
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ArtifactError(f"{mpath}: missing (incomplete version)") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{mpath}: not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ArtifactError(f"{mpath}: no 'files' table")
        if manifest.get("version") != version:
            raise ArtifactError(f"{mpath}: says version {manifest.get('version')!r}, folder is {version!r}")
        for name, expected in manifest["files"].items():
            fpath = _inside(path, str(name))
            if not fpath.is_file():
                raise ArtifactError(f"{fpath}: listed in the manifest but missing")
            actual = sha256_file(fpath)
            if actual != expected:
                raise ArtifactError(f"{fpath}: checksum mismatch (expected {expected[:12]}…, got {actual[:12]}…)")
        return Artifact(path, manifest)

    def prune(self, keep: int = 3, stale_staging_s: float = 3600.0) -> list[str]:
        """Delete old versions, never the live one, and staging folders abandoned for an hour."""
        live = self.live_version()
        others = [v for v in self.versions() if v != live]
        old = others[: max(len(others) - keep, 0)]
        for v in old:
            shutil.rmtree(self.root / v, ignore_errors=True)
        now = time.time()
        for stale in self.root.glob(".staging-*"):
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > stale_staging_s:
                    shutil.rmtree(stale)
        return old
