"""A Google Cloud Storage emulator on 127.0.0.1 for tests (the ``gcp-storage-emulator`` package), reached
as a user reaches one: ``STORAGE_EMULATOR_HOST`` in the environment, no credentials."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.s3_server import stop_process

START_TIMEOUT_S = 60
BUCKET = "modecotd-tests"


@dataclass
class GcsServer:
    endpoint: str
    process: subprocess.Popen
    log: Path

    @property
    def environment(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def uri(self, prefix: str = "") -> str:
        return f"gs://{BUCKET}/{prefix}".rstrip("/")

    def stop(self) -> None:
        stop_process(self.process)


def start(folder: Path) -> GcsServer:
    binary = shutil.which("gcp-storage-emulator") or str(Path(sys.executable).parent / "gcp-storage-emulator")
    if not Path(binary).exists():
        raise RuntimeError("the gcp-storage-emulator package is not installed: pip install gcp-storage-emulator")
    folder.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = folder / "emulator.log"
    process = subprocess.Popen(
        [binary, "-d", str(folder / "data"), "start", "--host", "127.0.0.1", "--port", str(port),
         "--default-bucket", BUCKET, "--quiet"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = GcsServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gcp-storage-emulator exited with {process.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"{server.endpoint}/storage/v1/b/{BUCKET}", timeout=2)
            return server
        except urllib.error.HTTPError:
            return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the GCS emulator did not answer within {START_TIMEOUT_S} s; see {log}")
