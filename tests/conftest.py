"""Shared fixtures: offline hub, a tiny model, the paper's data folder, one local Ray per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# As the CLI does before anything imports Ray: with a token at hand (Ray 2.60 writes one), the
# client asks for token mode; Ray reads the mode once, at import, so the order of tests must not
# decide it. On a new machine there is no token yet: one is made first (as Ray's own first start
# would make it), else a later test that starts a cluster would make it after Ray read the mode and
# every later client would present none (tests/test_first_run.py starts from an empty home folder).
from modecotd.cluster.auth import make_token_file, use_token_if_available  # noqa: E402

make_token_file()
use_token_if_available()

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data" / "mode-cotd"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from modecotd.models import BUILTIN_TINY, materialize

    return materialize(BUILTIN_TINY)


@pytest.fixture(scope="session")
def tiny_t5_dir() -> Path:
    """A tiny encoder-decoder student, standing in for the paper's Flan-T5."""
    from modecotd.models import BUILTIN_TINY_T5, materialize

    return materialize(BUILTIN_TINY_T5)


@pytest.fixture(scope="session")
def paper_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def _gloo_group():
    """One one-rank gloo group per session: DeepSpeed keeps the first group it sees, so a second
    one cannot be made in the same process."""
    import torch.distributed as dist

    from modecotd.distill import init_one_rank_group

    port = init_one_rank_group()
    yield port
    dist.destroy_process_group()


@pytest.fixture
def process_group(_gloo_group):
    """Rank 0 of a one-rank gloo group, as Ray Train makes for each worker, for in-process DeepSpeed
    runs; the rank variables are set only while the test runs (Ray workers must not inherit them)."""
    from modecotd.distill import rank_zero_env

    with rank_zero_env(_gloo_group):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with the dashboard on (Ray Train runs slower without it)."""
    import ray

    from modecotd.jobs.ray_runtime import worker_env
    from tests.s3_server import ACCESS_KEY, SECRET_KEY

    # Every node of the test cluster has the test S3 server's keys in its environment, as a real
    # cluster's nodes have theirs (credentials never travel with a run).
    os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_EC2_METADATA_DISABLED="true")
    ray.init(num_cpus=2, include_dashboard=True, runtime_env={"env_vars": worker_env()},
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (SeaweedFS), for the whole session."""
    from tests import s3_server as s3

    server = s3.start(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process reaches the S3 server through the environment only (as the storage requires)."""
    for name, value in s3_server.environment.items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A Google Cloud Storage emulator on 127.0.0.1, for the whole session."""
    from tests import gcs_server as gcs

    server = gcs.start(tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
    """This process reaches the emulator through the environment only."""
    for name, value in gcs_server.environment.items():
        monkeypatch.setenv(name, value)
    return gcs_server


@pytest.fixture(scope="session")
def s3_bucket(s3_server) -> str:
    """One bucket for the session (the server makes volumes per bucket): tests use their own prefixes."""
    from tests.s3_server import create_bucket

    create_bucket(s3_server, "modecotd-tests")
    return "modecotd-tests"
