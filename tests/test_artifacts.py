"""Fingerprints and units: a reader never sees half an artifact; a unit whose files do not match
its manifest is not done; re-runs skip done work. On a local folder and on a real S3 server."""
from __future__ import annotations

import json
import uuid

import pytest

from modecotd.artifacts import MANIFEST, Unit, clean_staging, fingerprint
from modecotd.storage import Storage, StorageError


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint({"lr": 5e-4, "epochs": 3}, ["x", "y"])
    assert a == fingerprint({"epochs": 3, "lr": 5e-4}, ["x", "y"])  # key order does not matter
    assert a != fingerprint({"lr": 5e-4, "epochs": 4}, ["x", "y"])
    assert a != fingerprint({"lr": 5e-4, "epochs": 3}, ["y", "x"])
    assert len(a) == 16


@pytest.fixture(params=["local", "s3", "gs"])
def storage(request, tmp_path, monkeypatch):
    monkeypatch.setenv("MODECOTD_CACHE", str(tmp_path / "node-cache"))  # this "node"'s scratch and fetched units
    if request.param == "local":
        return Storage(tmp_path / "run")
    if request.param == "gs":
        return Storage(request.getfixturevalue("gcs_env").uri(f"runs/{uuid.uuid4().hex[:10]}"))
    server = request.getfixturevalue("s3_env")
    return Storage(server.uri(request.getfixturevalue("s3_bucket"), f"runs/{uuid.uuid4().hex[:10]}"))


def test_unit_commit_then_done_with_every_file_listed(storage):
    unit = Unit(storage, "experts/gsm8k", "abc")
    assert not unit.done() and unit.problem() == "not written yet"
    summary = {}
    with unit.writing(summary) as staging:
        (staging / "adapter.bin").write_text("weights")
        (staging / "sub").mkdir()
        (staging / "sub" / "x.json").write_text("{}")
        summary["loss"] = 0.5
        assert storage.files("experts/gsm8k") == []  # nothing visible before the commit
    assert unit.done()
    manifest = unit.manifest()
    assert manifest["summary"] == {"loss": 0.5} and manifest["fingerprint"] == "abc"
    assert manifest["files"]["adapter.bin"]["size"] == 7 and len(manifest["files"]["sub/x.json"]["sha256"]) == 64
    assert (unit.local() / "adapter.bin").read_text() == "weights"
    assert unit.read_file("sub/x.json") == "{}"
    assert not Unit(storage, "experts/gsm8k", "other-key").done()  # other settings: not done


def test_crash_while_writing_leaves_nothing(storage):
    unit = Unit(storage, "u", "k")
    with pytest.raises(RuntimeError):
        with unit.writing() as staging:
            (staging / "half.jsonl").write_text("{")
            raise RuntimeError("killed")
    assert storage.files() == [] and not unit.done()


def test_recommit_replaces_the_old_unit(storage):
    with Unit(storage, "u", "v1").writing() as staging:
        (staging / "old.txt").write_text("1")
    new = Unit(storage, "u", "v2")
    with new.writing() as staging:
        (staging / "new.txt").write_text("2")
    assert new.done() and not Unit(storage, "u", "v1").done()
    assert storage.files("u") == [MANIFEST, "new.txt"]


def test_files_without_a_manifest_are_not_done(storage):
    storage.write_text("u/accepted.jsonl", "{}\n")
    assert not Unit(storage, "u", "k").done()
    storage.write_text(f"u/{MANIFEST}", "{not json")
    assert not Unit(storage, "u", "k").done()


def test_a_manifest_from_an_older_version_without_file_list_is_redone(storage):
    storage.write_text(f"u/{MANIFEST}", json.dumps({"fingerprint": "k", "summary": {}}))
    assert "older version" in Unit(storage, "u", "k").problem()


def test_a_missing_or_truncated_file_makes_the_unit_not_done(storage, tmp_path):
    unit = Unit(storage, "u", "k")
    with unit.writing() as staging:
        (staging / "a.bin").write_bytes(b"x" * 100)
        (staging / "b.bin").write_bytes(b"y" * 10)
    storage.write_bytes("u/a.bin", b"x" * 50)  # truncated after the commit
    assert "a.bin has 50 bytes" in unit.problem()
    storage.delete("u/b.bin")
    storage.write_bytes("u/a.bin", b"x" * 100)
    assert unit.problem() == "b.bin is missing"


def test_an_edited_file_of_the_same_size_is_caught(storage):
    unit = Unit(storage, "u", "k")
    with unit.writing() as staging:
        (staging / "w.bin").write_bytes(b"a" * 64)
    assert unit.done()
    storage.write_bytes("u/w.bin", b"b" * 64)
    if storage.is_local:  # local files are hashed whenever they changed on disk
        assert "sha256" in unit.problem()
    else:  # an object store's files are hashed where they are fetched; the unit is then dropped
        with pytest.raises(StorageError, match="sha256"):
            Unit(storage, "u", "k").local()
        assert not unit.done()


def test_a_same_size_edit_is_caught_where_a_units_file_is_read(storage):
    unit = Unit(storage, "rationales/t", "k")
    with unit.writing() as staging:
        (staging / "accepted.jsonl").write_text('{"answer": "yes"}\n')
    assert unit.read_file("accepted.jsonl") == '{"answer": "yes"}\n'
    storage.write_bytes("rationales/t/accepted.jsonl", b'{"answer": "no!"}\n')  # same size, other rows
    with pytest.raises(StorageError, match="does not match its manifest"):
        unit.read_file("accepted.jsonl")
    assert not unit.done()  # dropped: the next run writes it again
    with pytest.raises(StorageError, match="not done"):
        unit.read_file("accepted.jsonl")


def test_a_bad_transfer_is_tried_again_and_never_drops_a_good_unit(tmp_path, monkeypatch, s3_env, s3_bucket):
    monkeypatch.setenv("MODECOTD_CACHE", str(tmp_path / "node"))
    storage = Storage(s3_env.uri(s3_bucket, f"runs/{uuid.uuid4().hex[:10]}"))
    unit = Unit(storage, "experts/a", "k")
    with unit.writing() as staging:
        (staging / "adapter.bin").write_bytes(b"good" * 100)
    real = Storage.download
    garbled = []

    def flaky(self, relative, target):  # the first transfer of each file arrives damaged
        real(self, relative, target)
        if relative not in garbled:
            garbled.append(relative)
            target.write_bytes(b"bad!" * 100)
    monkeypatch.setattr(Storage, "download", flaky)
    assert (unit.local() / "adapter.bin").read_bytes() == b"good" * 100
    assert unit.done() and garbled == ["experts/a/adapter.bin"]

    def always_different(self, relative, target):  # every transfer damaged differently
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(uuid.uuid4().bytes * 25)
    monkeypatch.setattr(Storage, "download", always_different)
    other = Unit(storage, "experts/b", "k")
    with other.writing() as staging:
        (staging / "adapter.bin").write_bytes(b"good" * 100)
    with pytest.raises(StorageError, match="3 reads differ .* the unit is kept"):
        other.local()
    assert other.done()  # one node's bad line does not delete the unit for every node


def test_clean_staging_removes_leftovers(tmp_path):
    storage = Storage(tmp_path)
    staging = Unit(storage, "stage/task", "k").begin()
    (staging / "x").write_text("x")
    clean_staging(storage)
    assert not staging.exists()


def test_a_unit_on_an_object_store_is_staged_on_this_node_and_fetched_once(tmp_path, monkeypatch, s3_env, s3_bucket):
    monkeypatch.setenv("MODECOTD_CACHE", str(tmp_path / "node"))
    storage = Storage(s3_env.uri(s3_bucket, f"runs/{uuid.uuid4().hex[:10]}"))
    unit = Unit(storage, "experts/a", "k")
    staging = unit.begin()
    assert str(staging).startswith(str(tmp_path / "node"))
    (staging / "f.txt").write_text("hello")
    unit.commit(staging)
    assert not staging.exists()
    first = unit.local()
    assert str(first).startswith(str(tmp_path / "node")) and (first / "f.txt").read_text() == "hello"
    storage.delete("experts/a/f.txt")  # a second fetch would fail: the node's copy is used
    assert unit.local() == first
