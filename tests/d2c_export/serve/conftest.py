"""The session's local Ray instance (`ray_local`, shared with the bulk tests) and one deployment of the d2c-tiny
engines for the whole test session, behind a bearer token, on a free loopback port (a 5 s body deadline); its
manifest records class names (`CLASS_NAMES`), as `d2c-export onnx --class-names` writes them."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from d2c_export.manifest import MANIFEST, Manifest
from d2c_export.serve import cluster
from d2c_export.serve.api import token_digest
from d2c_export.serve.app import ServeOptions

TOKEN = "test-token-0123"
MAX_BATCH = 4  # the session engines' exported max batch (tests/d2c_export/conftest.py)
FAST = {"num_iter": 2, "diffusion_steps": 3}  # settings that make a d2c-tiny generation take milliseconds
BODY_TIMEOUT_S = 5.0  # the session server's body deadline (shorter than the default, to keep the tests short)
CLASS_NAMES = ["apple", "bee", "cloud", "dune", "egg", "fern", "gate", "hill", "ink", "jade"]  # d2c-tiny: 10 classes


@dataclass
class Served:
    url: str
    engines: Path
    token: str

    def request(self, method: str, path: str, body: dict | bytes | None = None, token: str | None = "default",
                headers: dict | None = None, timeout_s: float = 60) -> tuple[int, bytes, dict]:
        """One HTTP request; (status, raw body, headers). `token` "default": the session's token."""
        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        sent = dict(headers or {})
        token = self.token if token == "default" else token
        if token:
            sent["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        try:
            connection.request(method, path, body=body, headers=sent)
            reply = connection.getresponse()
            return reply.status, reply.read(), {k.lower(): v for k, v in reply.getheaders()}
        finally:
            connection.close()

    def images(self, body: dict, **kw) -> dict:
        status, raw, _ = self.request("POST", "/v1/images", body, **kw)
        assert status == 200, raw
        return json.loads(raw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(engines_factory, ray_local, tmp_path_factory) -> Served:
    engines = tmp_path_factory.mktemp("served") / "engines"
    shutil.copytree(engines_factory("d2c-tiny"), engines)
    manifest = Manifest.read(engines / MANIFEST)
    manifest.class_names = CLASS_NAMES
    manifest.save(engines)
    options = ServeOptions(engines_dir=str(engines), backend="ort", replicas=1, batch_wait_s=0.25, max_queue=4,
                           replica_cpus=1, threads=1, timeout_s=60, body_timeout_s=BODY_TIMEOUT_S,
                           token_sha256=token_digest(TOKEN))
    try:
        url = cluster.deploy(options, "127.0.0.1", _free_port(), request_timeout_s=90, ready_timeout_s=120)
        yield Served(url, engines, TOKEN)
    finally:
        from ray import serve
        serve.shutdown()
