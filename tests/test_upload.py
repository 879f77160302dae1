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


def test_secrets_and_links_out_of_the_folder_are_left_out_and_named(tmp_path):
    (tmp_path / "project").mkdir()
    config = project(tmp_path / "project", data_dir="paper")
    paper = tmp_path / "project" / "exp" / "paper"
    (paper / "train").mkdir(parents=True)
    (paper / "train" / "x_train.json").write_text("[]")
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("aws_secret_access_key = SECRET\n")
    (paper / "train" / "creds.json").symlink_to(home / ".aws" / "credentials")  # a link out, named like data
    (paper / "outside").symlink_to(home / ".aws", target_is_directory=True)
    (paper / "same.json").symlink_to(paper / "train" / "x_train.json")  # a link that stays inside: sent
    (paper / "loop").symlink_to(paper, target_is_directory=True)  # a link to its own folder: walked once
    (paper / ".env").write_text("OPENAI_API_KEY=SECRET\n")
    (paper / "deploy.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    (paper / ".ssh").mkdir()
    (paper / ".ssh" / "id_ed25519").write_text("SECRET\n")
    upload = stage(config)
    try:
        assert "exp/paper/train/x_train.json" in upload.files and "exp/paper/same.json" in upload.files
        assert upload.left_out == {"exp/paper/train/creds.json": "a link out of the folder sent",
                                   "exp/paper/outside/": "a link out of the folder sent",
                                   "exp/paper/.env": "named like a secret",
                                   "exp/paper/deploy.pem": "named like a secret",
                                   "exp/paper/.ssh/": "named like a secret"}
        assert not any("loop" in name for name in upload.files)
        staged = [p for p in upload.root.rglob("*") if p.is_file()]
        assert not any("SECRET" in p.read_text() or "PRIVATE" in p.read_text() for p in staged)
        line = upload.describe()
        assert "left out: " in line and "exp/paper/.env (named like a secret)" in line
    finally:
        upload.remove()
    upload = stage(config, tmp_path / "project" / "exp")  # a chosen working directory: the same rules
    try:
        assert "paper/.env" in upload.left_out and "paper/train/creds.json" in upload.left_out
        assert not any("SECRET" in p.read_text() for p in upload.root.rglob("*") if p.is_file())
    finally:
        upload.remove()


@pytest.mark.parametrize("name,why", [(".env", "named like a secret"), ("link.jsonl", "is a link to")])
def test_a_named_data_file_that_must_not_travel_is_refused_in_one_line(tmp_path, name, why):
    (tmp_path / "project").mkdir()
    config = project(tmp_path / "project")  # sends project/ (the config names ../shared/test.jsonl)
    (tmp_path / "elsewhere.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    data = tmp_path / "project" / "exp" / "data" / name
    if name == "link.jsonl":
        data.symlink_to(tmp_path / "elsewhere.jsonl")
    else:
        data.write_text('{"question": "q", "answer": "a"}\n')
    text = config.read_text().replace("data/train.jsonl", f"data/{name}")
    config.write_text(text)
    with pytest.raises(UserError, match=why) as caught:
        stage(config)
    assert str(config) in str(caught.value) and "\n" not in str(caught.value)
