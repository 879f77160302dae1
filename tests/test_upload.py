"""What `modecotd submit` sends: only what the run needs (or a chosen folder minus excludes), measured
before sending, and refused in one line when over the limit."""
from __future__ import annotations

import os
import tempfile

import pytest
import yaml

from modecotd.cluster.upload import stage
from modecotd.errors import UserError


def project(root, *, data_dir: str | None = None):
    """A config in root/exp/ naming data by relative paths (one outside its folder), an absolute
    path, and large files beside it that the run does not need."""
    (root / "exp" / "data").mkdir(parents=True)
    (root / "exp" / "data" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (root / "exp" / "data" / "unrelated.jsonl").write_text("x\n")
    (root / "shared").mkdir()
    (root / "shared" / "test.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (root / "exp" / "model.bin").write_bytes(os.urandom(3_000_000))
    (root / "exp" / "notes.txt").write_text("my notes\n")
    source = {"kind": "jsonl", "train": "data/train.jsonl", "test": "../shared/test.jsonl",
              "fewshot": "/cluster/disk/fewshot.jsonl"}
    tasks = [{"name": "a", "role": "seen", "answer": "number", "source": source}]
    if data_dir:
        tasks.append({"name": "b", "role": "seen", "source": {"kind": "paper", "data_dir": data_dir}})
    config = root / "exp" / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "up", "tasks": tasks}))
    return config


def test_only_the_config_and_the_data_it_names_are_sent(tmp_path):
    upload = stage(project(tmp_path))
    try:
        assert set(upload.files) == {"exp/c.yaml", "exp/data/train.jsonl", "shared/test.jsonl"}
        assert upload.config == "exp/c.yaml"  # the entrypoint's path: relative paths resolve as at home
        assert (upload.root / "shared" / "test.jsonl").read_text() == (tmp_path / "shared" / "test.jsonl").read_text()
        assert upload.remote == ["/cluster/disk/fewshot.jsonl"]
        line = upload.describe()
        assert "uploading 3 file(s)" in line and "zipped" in line and "read on the cluster: /cluster" in line
        assert 0 < upload.zipped < 10_000
    finally:
        upload.remove()
    assert not upload.root.exists()


def test_a_data_folder_is_sent_whole_but_for_what_never_travels(tmp_path):
    config = project(tmp_path, data_dir="paper")
    (tmp_path / "exp" / "paper" / "train").mkdir(parents=True)
    (tmp_path / "exp" / "paper" / "train" / "x_train.json").write_text("[]")
    (tmp_path / "exp" / "paper" / "__pycache__").mkdir()
    (tmp_path / "exp" / "paper" / "__pycache__" / "m.pyc").write_text("")
    upload = stage(config)
    try:
        assert "exp/paper/train/x_train.json" in upload.files
        assert not any("__pycache__" in name for name in upload.files)
    finally:
        upload.remove()


def test_a_chosen_working_dir_is_sent_minus_the_excludes(tmp_path):
    config = project(tmp_path)
    upload = stage(config, tmp_path / "exp", ["notes.txt", "data/unrelated*"])
    try:
        assert set(upload.files) == {"c.yaml", "data/train.jsonl"}  # model.bin: never; the rest: excluded
    finally:
        upload.remove()
    with pytest.raises(UserError, match="not inside it"):
        stage(config, tmp_path / "shared")


def test_an_upload_over_the_limit_is_refused_before_sending(tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    config = project(tmp_path)
    (tmp_path / "exp" / "data" / "train.jsonl").write_bytes(os.urandom(2_000_000))
    with pytest.raises(UserError) as refused:
        stage(config, limit=1_000_000)
    message = str(refused.value)
    assert "2.0 MB zipped, over the 1.0 MB" in message and "data/train.jsonl" in message
    assert "--working-dir" in message
    assert not list(scratch.iterdir())  # the staged copy is gone
