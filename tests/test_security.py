"""Security rules that need no cluster: the token never goes over plain HTTP to another machine, a
cluster started here always has a token, weights load from safetensors only and never run a model's
own code, and nothing a manifest says writes outside its unit."""
from __future__ import annotations

import json
import os
import socket
import stat

import pytest

from modecotd.artifacts import Unit
from modecotd.cli import main
from modecotd.cluster import auth
from modecotd.errors import ModelError, UserError
from modecotd.storage import Storage, StorageError


@pytest.fixture
def token_mode(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0ken-for-tests")


@pytest.mark.parametrize("url", ["http://10.1.2.3:8265", "http://dashboard.example.org:8265", "203.0.113.9:8265"])
def test_the_token_is_not_sent_over_plain_http_to_another_machine(token_mode, url):
    with pytest.raises(UserError, match="refusing to send Ray's auth token over plain HTTP"):
        auth.check_token_transport(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265",
                                 "https://dashboard.example.org", "127.0.0.2:8265"])
def test_loopback_or_https_is_fine(token_mode, url):
    auth.check_token_transport(url)


def test_the_user_may_allow_plain_http_explicitly_and_without_token_nothing_is_sent(token_mode, monkeypatch):
    auth.check_token_transport("http://10.1.2.3:8265", allow_plain_token=True)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    auth.check_token_transport("http://10.1.2.3:8265")


def test_the_cli_refuses_in_one_line_before_connecting(token_mode, capsys, monkeypatch):
    code = main(["status", "modecotd-x", "--address", "http://203.0.113.9:8265"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--allow-http-token" in err[0] and "203.0.113.9:8265" in err[0]


def test_allow_http_token_reaches_the_jobs_client_as_a_parameter_not_through_the_environment(token_mode, capsys,
                                                                                             monkeypatch):
    import ray.job_submission

    class Unreachable:
        def __init__(self, address):
            raise ConnectionError(f"nothing answers at {address}")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Unreachable)
    environment = dict(os.environ)
    code = main(["status", "modecotd-x", "--address", "http://203.0.113.9:8265", "--allow-http-token"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Ray Jobs API at http://203.0.113.9:8265" in err  # past the token check
    assert dict(os.environ) == environment


@pytest.mark.parametrize("address", ["10.1.2.3:6379", "ray://203.0.113.9:10001", "head.example.org:6379"])
def test_joining_a_cluster_on_another_machine_over_plain_grpc_is_refused_in_one_line(token_mode, capsys, address,
                                                                                  tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    code = main(["run", "quickstart", "--address", address, "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "refusing to send Ray's auth token over plain gRPC" in err[0] and "RAY_USE_TLS" in err[0]
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RAY_ADDRESS", address)  # a run inside a job, or a user's environment: the same rule
    with pytest.raises(UserError, match="plain gRPC"):
        auth.check_token_over_grpc(address)


def test_grpc_to_this_machine_with_tls_or_when_allowed_is_fine(token_mode, monkeypatch):
    own = socket.gethostbyname(socket.gethostname())  # a job's driver reaches its head at the head's own address
    for address in ("127.0.0.1:6379", "localhost:6379", f"{own}:6379", "auto", "local", "ray://[::1]:10001"):
        auth.check_token_over_grpc(address)
    auth.check_token_transport(f"http://{own}:8265")
    monkeypatch.setenv("RAY_USE_TLS", "1")
    auth.check_token_over_grpc("10.1.2.3:6379")
    monkeypatch.delenv("RAY_USE_TLS")
    auth.check_token_over_grpc("10.1.2.3:6379", allow_plain_token=True)


def test_a_cluster_started_here_always_gets_a_token_readable_by_its_owner_only(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(auth, "DEFAULT_TOKEN_FILE", tmp_path / ".ray" / "auth_token")
    path = auth.ensure_token()
    assert path == tmp_path / ".ray" / "auth_token" and os.environ["RAY_AUTH_MODE"] == "token"
    assert len(path.read_text()) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert auth.ensure_token() == path and path.read_text() == token  # an existing token is kept
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a mode the user chose is left alone
    assert auth.ensure_token() is None and os.environ["RAY_AUTH_MODE"] == "disabled"


def test_cluster_up_binds_the_dashboard_to_loopback_unless_told(monkeypatch, tmp_path):
    from modecotd.cluster import local

    started = []
    monkeypatch.setattr(local, "_ray_start", lambda command, isolated=False: started.append(command))
    monkeypatch.setattr(auth, "DEFAULT_TOKEN_FILE", tmp_path / "auth_token")
    monkeypatch.setattr(local, "ensure_token", lambda: None)
    monkeypatch.setattr(local, "RECORDS", tmp_path / "records")
    monkeypatch.setattr(local, "port_taken", lambda port: False)
    local.up()
    assert "--dashboard-host=127.0.0.1" in started[0]
    local.up(dashboard_host="0.0.0.0")
    assert "--dashboard-host=0.0.0.0" in started[1]


# --------------------------------------------------------------------------- weights and code


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from modecotd.models import load_lm

    folder = tmp_path / "pickled"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.suffix != ".safetensors":
            (folder / path.name).write_bytes(path.read_bytes())
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors files only"):
        load_lm(folder)


def test_a_models_own_code_is_never_run(tiny_model_dir, tmp_path):
    from modecotd.models import load_lm

    folder = tmp_path / "remote-code"
    folder.mkdir()
    for path in tiny_model_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        load_lm(folder)  # transformers may load the model's own class instead; never the folder's code
    except (ValueError, OSError):
        pass
    assert not marker.exists()


def test_an_adapter_without_safetensors_is_refused(tmp_path):
    from modecotd.mixture import read_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match="adapter_model.safetensors"):
        read_adapter(tmp_path)


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/../../b", "a\\..\\b", "a//b"])
def test_a_manifest_naming_a_file_outside_its_unit_is_never_used(tmp_path, name):
    storage = Storage(tmp_path / "run")
    unit = Unit(storage, "experts/x", "key")
    (tmp_path / "run" / "experts" / "x").mkdir(parents=True)
    (tmp_path / "run" / "experts" / "x" / "manifest.json").write_text(json.dumps(
        {"fingerprint": "key", "files": {name: {"size": 1, "sha256": "0"}}}))
    assert "outside the unit" in unit.problem()
    remote = Unit(Storage("s3://bucket/run"), "experts/x", "key")
    remote.manifest = lambda: {"fingerprint": "key", "files": {name: {"size": 1, "sha256": "0"}}}
    with pytest.raises(StorageError, match="outside the unit"):
        remote.local()


@pytest.mark.parametrize("name", ["../escape.txt", "experts/../../escape.txt", "/tmp/abs.txt"])
def test_pull_writes_nothing_outside_its_target(tmp_path, monkeypatch, capsys, name):
    run = tmp_path / "store" / "r"
    (run / "experts").mkdir(parents=True)
    (run / "report.md").write_text("report")
    (run / "config.yaml").write_text("name: r\n")
    listed = Storage.files

    def listing_with_a_hostile_key(self, relative=""):  # an object store may hold any key
        return [*listed(self, relative), name]
    monkeypatch.setattr(Storage, "files", listing_with_a_hostile_key)
    code = main(["pull", str(run), "--to", str(tmp_path / "out" / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "would be written outside" in err[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out" / "escape.txt").exists()
