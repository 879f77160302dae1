"""The run's storage: the same operations on a local folder and on a real S3-compatible server."""
from __future__ import annotations

import pickle
import uuid

import pytest

from modecotd.errors import ConfigError
from modecotd.storage import Storage, StorageError, checked_uri, redacted


@pytest.fixture(params=["local", "s3", "gs"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(tmp_path / "store")
    if request.param == "gs":
        return Storage(request.getfixturevalue("gcs_env").uri(f"runs/{uuid.uuid4().hex[:10]}"))
    server = request.getfixturevalue("s3_env")
    return Storage(server.uri(request.getfixturevalue("s3_bucket"), f"runs/{uuid.uuid4().hex[:10]}"))


def test_files_round_trip_and_list_recursively(storage, tmp_path):
    storage.write_text("a/b/notes.txt", "héllo")
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 5000)
    storage.upload(source, "a/weights.bin")
    assert storage.read_text("a/b/notes.txt") == "héllo"
    assert storage.size("a/weights.bin") == 1_280_000
    assert storage.size("a/nothing") is None and not storage.exists("a/nothing")
    assert storage.files("a") == ["b/notes.txt", "weights.bin"]
    assert storage.files("no/such/folder") == []
    storage.download("a/weights.bin", tmp_path / "back" / "w.bin")
    assert (tmp_path / "back" / "w.bin").read_bytes() == source.read_bytes()


def test_delete_removes_a_folder_and_ignores_what_is_absent(storage):
    storage.write_text("u/x.txt", "1")
    storage.write_text("u/deep/y.txt", "2")
    storage.write_text("keep.txt", "3")
    storage.delete("u")
    storage.delete("u")
    assert storage.files() == ["keep.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_text("u/x.txt")


def test_overwriting_a_file_replaces_it_whole(storage):
    storage.write_text("f.json", "x" * 1000)
    storage.write_text("f.json", "short")
    assert storage.read_text("f.json") == "short"


def test_a_storage_travels_as_its_uri_and_opens_its_own_filesystem(storage):
    storage.write_text("f.txt", "here")
    copy = pickle.loads(pickle.dumps(storage))
    assert copy._fs is None  # opened where it is used
    assert copy == storage and copy.read_text("f.txt") == "here"


def test_check_reachable_leaves_nothing_behind(storage):
    storage.check_reachable()
    assert storage.files() == []


@pytest.mark.parametrize("uri", [
    "s3://AKIAXXXX:verysecret@bucket/prefix",
    "s3://bucket/prefix?access_key=AKIAXXXX&secret_key=verysecret",
    "gs://bucket/prefix?session_token=abc",
    "gs://bucket/prefix?access_token=abc",
])
def test_credentials_in_the_uri_are_refused_without_echoing_them(uri):
    with pytest.raises(ConfigError) as refused:
        checked_uri(uri)
    assert "verysecret" not in str(refused.value) and "abc" not in str(refused.value).split("?")[-1]
    assert "environment" in str(refused.value)


def test_local_paths_become_absolute_and_uris_keep_their_endpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("runs/x").uri == str(tmp_path / "runs" / "x")
    assert Storage(f"file://{tmp_path}/y").uri == str(tmp_path / "y")
    assert Storage("s3://b/p?endpoint_override=http://127.0.0.1:9000").is_local is False
    with pytest.raises(ConfigError, match="bucket is missing"):
        Storage("s3:///prefix")
    assert redacted("s3://k:s@b/p") == "s3://b/p"


def test_an_unreachable_object_store_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = Storage("s3://bucket/run?endpoint_override=http://127.0.0.1:1")
    with pytest.raises(StorageError, match=r"s3://bucket/run.*cannot"):
        storage.check_reachable()


def test_a_gcs_emulator_is_named_by_the_environment_and_unknown_options_are_refused(monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    uri = Storage("gs://bucket/run").uri
    assert "endpoint_override=127.0.0.1%3A4443" in uri and "scheme=http" in uri and "anonymous=true" in uri
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert Storage("gs://bucket/run").uri == "gs://bucket/run"  # a real bucket: default credentials
    with pytest.raises(StorageError, match=r"gs://bucket/run.*unknown query parameter 'colour'"):
        Storage("gs://bucket/run?colour=blue").filesystem


def test_an_unreachable_gcs_fails_in_one_line_within_its_retry_limit():
    storage = Storage("gs://bucket/run?endpoint_override=127.0.0.1:1&scheme=http&anonymous=true&retry_limit_seconds=1")
    with pytest.raises(StorageError, match=r"gs://bucket/run.*cannot"):
        storage.check_reachable()
