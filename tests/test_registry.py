import json

import numpy as np
import pytest

from engine.recmodel import ITEM_FACTORS, load_rec_model
from engine.registry import ArtifactError, Registry


def _version(registry: Registry, value: float = 1.0) -> str:
    staging = registry.stage()
    np.save(staging / "a.npy", np.full(3, value))
    (staging / "b.json").write_text("{}")
    return registry.commit(staging, {"kind": "test"}).version


def test_commit_writes_checksums_and_goes_live(tmp_path):
    reg = Registry(tmp_path)
    v = _version(reg)
    assert reg.live_version() == v
    manifest = json.loads((tmp_path / v / "manifest.json").read_text())
    assert set(manifest["files"]) == {"a.npy", "b.json"}
    assert reg.verify(v).version == v


def test_a_tampered_file_is_refused_and_cannot_go_live(tmp_path):
    reg = Registry(tmp_path)
    good = _version(reg, 1.0)
    bad = _version(reg, 2.0)
    reg.activate(good)
    (tmp_path / bad / "a.npy").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        reg.verify(bad)
    with pytest.raises(ArtifactError):
        reg.activate(bad)
    assert reg.live_version() == good


def test_a_version_without_manifest_is_incomplete(tmp_path):
    reg = Registry(tmp_path)
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="missing"):
        reg.verify("half")


def test_a_file_listed_but_missing_is_refused(tmp_path):
    reg = Registry(tmp_path)
    v = _version(reg)
    (tmp_path / v / "b.json").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        reg.verify(v)


def test_trained_version_loads_and_a_truncated_factor_file_is_refused(trained, tmp_path):
    model = load_rec_model(trained.registry.verify(trained.artifact.version))
    assert model.item_factors.shape[0] == len(model.item_ids)
    # Copy the version, truncate a file, and fix up the checksum so only the shape check can catch it.
    import shutil

    from engine.registry import sha256_file

    reg = Registry(tmp_path)
    src = trained.artifact.path
    dst = tmp_path / "v-broken"
    shutil.copytree(src, dst)
    np.save(dst / ITEM_FACTORS, np.zeros((2, 3), dtype=np.float32))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = "v-broken"
    manifest["files"][ITEM_FACTORS] = sha256_file(dst / ITEM_FACTORS)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="shape"):
        load_rec_model(reg.verify("v-broken"))


def test_prune_keeps_the_live_version_and_the_newest_others(tmp_path):
    import time

    reg = Registry(tmp_path)
    versions = []
    for i in range(5):
        versions.append(_version(reg, float(i)))
        time.sleep(0.002)  # version names carry the millisecond they were created
    reg.activate(versions[0])
    removed = reg.prune(keep=2)
    assert set(removed) == set(versions[1:3])
    assert set(reg.versions()) == {versions[0], versions[3], versions[4]}


def test_files_in_subfolders_are_checksummed_and_verified(tmp_path):
    reg = Registry(tmp_path)
    staging = reg.stage()
    (staging / "top.json").write_text("{}")
    (staging / "sub" / "deeper").mkdir(parents=True)
    (staging / "sub" / "deeper" / "model.bin").write_bytes(b"weights")
    v = reg.commit(staging, {"kind": "test"}).version
    assert set(reg.verify(v).manifest["files"]) == {"top.json", "sub/deeper/model.bin"}
    (tmp_path / v / "sub" / "deeper" / "model.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match=r"model\.bin: checksum mismatch"):
        reg.verify(v)


def test_a_manifest_entry_outside_the_version_folder_is_refused(tmp_path):
    reg = Registry(tmp_path)
    v = _version(reg)
    manifest = json.loads((tmp_path / v / "manifest.json").read_text())
    manifest["files"]["../LIVE"] = "0" * 64
    (tmp_path / v / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the version folder"):
        reg.verify(v)
