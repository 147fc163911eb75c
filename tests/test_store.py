"""The store keeps DMR's on-disk layout and stays consistent under concurrent writers."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.packaging import artifact
from app.store import ModelStore, StoreError, space
from app.store.store import ORPHAN_GRACE_S, DigestMismatch
from tests.conftest import REPO
from tests.tiny_gguf import write_tiny_gguf


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_imports_run_one_way():
    """The formats depend on nothing; the store on the formats only; never back again."""
    allowed = {"app.oci": ("app.oci",), "app.store": ("app.oci", "app.store")}
    for package, may_import in allowed.items():
        for path in (REPO / package.replace(".", "/")).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    if name == "app" or name.startswith("app."):
                        assert name.startswith(may_import), f"{path.name} imports {name}"


def test_layout_is_dmrs(store: ModelStore, tiny_gguf: Path):
    built = artifact.build(tiny_gguf)
    entry = artifact.write_to_store(built, store, "docker.io/ai/tiny:latest")
    root = store.root
    assert json.loads((root / "layout.json").read_text()) == {"version": "1.0.0"}
    index = json.loads((root / "models.json").read_text())
    assert index == {
        "models": [
            {
                "id": entry.id,
                "tags": ["docker.io/ai/tiny:latest"],
                "files": [*(lf.descriptor.digest for lf in built.layers), built.config_digest],
            }
        ]
    }
    manifest = (root / "manifests" / "sha256" / entry.hex).read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == entry.id
    gguf_hex = built.layers[0].descriptor.hex
    assert (root / "blobs" / "sha256" / gguf_hex).read_bytes() == tiny_gguf.read_bytes()


def test_tags_stored_by_older_dmr_builds_still_resolve(store: ModelStore, tiny_gguf: Path):
    entry = artifact.write_to_store(artifact.build(tiny_gguf), store, "docker.io/ai/x:latest")
    index = json.loads((store.root / "models.json").read_text())
    index["models"][0]["tags"] = ["ai/old:latest", "literal"]
    (store.root / "models.json").write_text(json.dumps(index))
    assert store.resolve("old").id == entry.id
    assert store.resolve("docker.io/ai/literal:latest").id == entry.id


def test_blob_with_wrong_content_never_becomes_visible(store: ModelStore):
    digest = "sha256:" + hashlib.sha256(b"right").hexdigest()
    with pytest.raises(DigestMismatch), store.blob_writer(digest) as w:
        w.write(b"wrong")
        w.commit()
    assert list(store.blobs_dir.iterdir()) == []


def test_model_needs_all_its_blobs(store: ModelStore, tiny_gguf: Path):
    built = artifact.build(tiny_gguf)
    with pytest.raises(StoreError, match="is not in the store"):
        store.add_model(built.manifest, ["docker.io/ai/x:latest"])
    assert store.entries() == []
    assert list(store.manifests_dir.iterdir()) == []


def test_restart_drops_temp_files(tmp_path: Path):
    store = ModelStore(tmp_path / "m")
    (store.blobs_dir / ".tmp-abc").write_bytes(b"partial")
    (store.root / ".tmp-index").write_bytes(b"{")
    ModelStore(tmp_path / "m")
    assert list(store.blobs_dir.iterdir()) == []
    assert not (store.root / ".tmp-index").exists()


def test_concurrent_writers_keep_the_index_whole(store: ModelStore, tmp_path: Path):
    builds = [artifact.build(write_tiny_gguf(tmp_path / f"{i}.gguf", seed=i)) for i in range(6)]
    # A second store object on the same directory stands in for a second process.
    other = ModelStore(store.root)
    barrier = threading.Barrier(len(builds))

    def write(i: int) -> None:
        barrier.wait()
        target = store if i % 2 else other
        artifact.write_to_store(builds[i], target, f"docker.io/ai/m{i}:latest")
        target.tag(builds[i].id, f"docker.io/ai/shared{i % 2}:latest")

    with ThreadPoolExecutor(len(builds)) as pool:
        list(pool.map(write, range(len(builds))))
    entries = store.entries()
    assert {e.id for e in entries} == {b.id for b in builds}
    for i, b in enumerate(builds):
        assert store.resolve(f"m{i}").id == b.id
    # A tag names exactly one model, whoever wrote last.
    for shared in ("shared0", "shared1"):
        assert sum(e.has_tag(f"docker.io/ai/{shared}:latest") for e in entries) == 1


def test_delete_keeps_blobs_shared_with_other_models(store: ModelStore, tiny_gguf: Path):
    a = artifact.write_to_store(artifact.build(tiny_gguf), store, "docker.io/ai/a:latest")
    b = artifact.write_to_store(
        artifact.build(tiny_gguf, context_size=64), store, "docker.io/ai/b:latest"
    )
    assert a.id != b.id
    store.delete(a.id)
    gguf_digest = b.files[0]
    assert store.has_blob(gguf_digest)
    store.delete(b.id)
    assert list(store.blobs_dir.iterdir()) == []


def test_bundle_of_a_sharded_model_starts_at_the_first_shard(store: ModelStore, tmp_path: Path):
    shards = [write_tiny_gguf(tmp_path / f"m-{i:05d}-of-00003.gguf", seed=i) for i in (1, 2, 3)]
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    mmproj = write_tiny_gguf(tmp_path / "proj.gguf", seed=9)
    built = artifact.build(shards[0], chat_template=template, mmproj=mmproj)
    entry = artifact.write_to_store(built, store, "docker.io/ai/sharded:latest")
    b = store.bundle(entry)
    assert b.gguf == b.root / "model" / "model-00001-of-00003.gguf"
    names = sorted(p.name for p in (b.root / "model").iterdir())
    assert names == [
        "model-00001-of-00003.gguf",
        "model-00002-of-00003.gguf",
        "model-00003-of-00003.gguf",
        "model.mmproj",
        "template.jinja",
    ]
    for i, shard in enumerate(shards, start=1):
        linked = b.root / "model" / f"model-{i:05d}-of-00003.gguf"
        assert linked.read_bytes() == shard.read_bytes()
        assert (
            linked.stat().st_ino
            == store.blob_path(built.layers[i - 1].descriptor.digest).stat().st_ino
        )
    assert b.chat_template is not None and b.chat_template.read_text() == "{{ messages }}"
    assert b.mmproj == b.root / "model" / "model.mmproj"
    assert json.loads((b.root / "config.json").read_text())["format"] == "gguf"
    store.delete(entry.id)
    assert not b.root.exists()


def test_bundle_refuses_paths_that_leave_it(tiny_gguf: Path):
    from app.oci import manifest as mt
    from app.store import bundle

    built = artifact.build(tiny_gguf)
    doc = json.loads(built.manifest)
    doc["layers"].append(
        {
            "mediaType": "application/vnd.docker.ai.model.file",
            "digest": "sha256:" + "0" * 64,
            "size": 1,
            "annotations": {mt.ANNOTATION_FILEPATH: "../../etc/cron.d/x"},
        }
    )
    with pytest.raises(bundle.BundleError, match="unsafe file path"):
        bundle.layout(mt.parse_manifest(json.dumps(doc).encode()))


def test_bundle_built_by_many_at_once(store: ModelStore, tiny_gguf: Path):
    entry = artifact.write_to_store(artifact.build(tiny_gguf), store, "docker.io/ai/b:latest")
    barrier = threading.Barrier(8)

    def build(_: int) -> Path:
        barrier.wait()
        return store.bundle(entry).gguf

    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(build, range(8)))
    assert len(paths) == 1 and paths.pop().read_bytes() == tiny_gguf.read_bytes()
    assert [p.name for p in store.bundles_dir.iterdir()] == [entry.hex]


def test_opening_a_store_leaves_a_live_write_alone(store: ModelStore):
    digest = "sha256:" + hashlib.sha256(b"payload").hexdigest()
    with store.blob_writer(digest) as w:
        w.write(b"pay")
        ModelStore(store.root)  # another process starting up on the same store
        w.write(b"load")
        w.commit()
    assert store.has_blob(digest, 7)


def test_pinned_blobs_survive_a_delete(store: ModelStore, tiny_gguf: Path):
    entry = artifact.write_to_store(artifact.build(tiny_gguf), store, "docker.io/ai/p:latest")
    gguf = entry.files[0]
    with store.pinned([gguf]):  # an import about to reuse this blob
        store.delete(entry.id)
        assert store.has_blob(gguf)
    store.discard_blobs([gguf])
    assert not store.has_blob(gguf)


def test_removing_two_tags_at_once_deletes_the_model(store: ModelStore, tiny_gguf: Path):
    for _ in range(20):
        entry = artifact.write_to_store(artifact.build(tiny_gguf), store, "docker.io/ai/one:latest")
        store.tag(entry.id, "docker.io/ai/two:latest")
        barrier = threading.Barrier(2)
        tags = ["docker.io/ai/one:latest", "docker.io/ai/two:latest"]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_untag_together, [store] * 2, [entry.id] * 2, tags, [barrier] * 2))
        assert store.entries() == []


def _untag_together(store: ModelStore, model_id: str, tag: str, barrier: threading.Barrier) -> None:
    barrier.wait()
    store.untag(model_id, tag)


def test_delete_collects_orphans_once_past_their_grace(store: ModelStore, tiny_gguf: Path):
    def orphan(data: bytes, age_s: float) -> str:
        path = store.blobs_dir / hashlib.sha256(data).hexdigest()
        path.write_bytes(data)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return "sha256:" + path.name

    old, young = orphan(b"old", ORPHAN_GRACE_S + 60), orphan(b"young", 0)
    entry = artifact.write_to_store(artifact.build(tiny_gguf), store, "docker.io/ai/o:latest")
    store.delete(entry.id)
    # A young one may be another process's model in the making (package --store).
    assert not store.has_blob(old) and store.has_blob(young)


def test_a_failed_pulls_finished_blob_waits_as_a_whole_partial(store: ModelStore):
    data = b"a finished layer"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with store.blob_writer(digest) as w:
        w.write(data)
        w.commit()
    store.discard_blobs([digest], resumable=True)
    assert not store.has_blob(digest) and store.partial_size(digest) == len(data)
    partial = store.partial_blob(digest, len(data))
    assert partial.size == len(data)  # nothing left to fetch
    partial.commit()
    assert store.has_blob(digest, len(data))


def test_a_whole_partial_with_wrong_bytes_starts_over(store: ModelStore):
    digest = "sha256:" + hashlib.sha256(b"right").hexdigest()
    (store.blobs_dir / (digest[7:] + ".incomplete")).write_bytes(b"wrong")
    assert store.partial_blob(digest, 5).size == 0


def test_the_disk_reserve_is_proportionate():
    mib, gib = 1024 * 1024, 1024 * 1024 * 1024
    assert space.reserve(670 * 1024, 100 * gib) == 16 * mib  # a 670 KB import fits in 200 MB
    assert space.reserve(2 * gib, 100 * gib) == 256 * mib
    assert space.reserve(2 * gib, 1 * gib) == gib // 10  # a small volume keeps a tenth
    with pytest.raises(space.InsufficientStorage) as refused:
        space.check_free_space(Path("/"), 100 << 40, "a blob")
    text = str(refused.value)
    assert text.startswith("not enough disk space for a blob: it needs 100.0 TiB, ")
    assert "is free and 256.0 MiB is kept in reserve" in text
