"""`d2c-serve` as a real process on its own local Ray instance: its log (no colour codes when stderr is not a
terminal, no "connecting to an existing Serve app" on a fresh start), `d2c-serve-load --url` against it, and
SIGTERM, after which no process it started is left (Ray's agents included)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from d2c_export.serve.api import TOKEN_ENV
from d2c_export.serve.cli import load_main
from d2c_export.serve.cluster import wait_healthy
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli

MARK = "D2C_SERVE_TEST_MARK"  # an environment variable every process the server starts inherits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(mark: str) -> list[str]:
    """The processes whose environment holds `MARK=mark`: pid and name of each."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if f"{MARK}={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name} {command}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_sigterm_stops_everything_d2c_serve_started(engines_factory, tmp_path, capsys, monkeypatch):
    engines = engines_factory("d2c-tiny")
    port, mark = _free_port(), uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="d2c-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, MARK: mark, "RAY_TMPDIR": ray_tmp}
    env.pop(TOKEN_ENV, None)
    server = subprocess.Popen([Path(sys.executable).parent / "d2c-serve", "--engines", engines, "--backend", "ort",
                               "--port", str(port), "--num-cpus", "1", "--threads", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 180, lambda: (server.poll() is not None, "d2c-serve ended"))
        started = " ".join(marked_processes(mark))
        assert ("DashboardAgent" in started or "dashboard/agent.py" in started) and \
            ("RuntimeEnvAgent" in started or "runtime_env/agent" in started), started  # Ray's agents are seen
        monkeypatch.delenv(TOKEN_ENV, raising=False)
        code = load_main(["--url", url, "--clients", "2", "--requests", "4", "--num-iter", "2",
                          "--diffusion-steps", "3", "--quiet", "--json", str(tmp_path / "load.json")])
        assert code == 0
        run = json.loads((tmp_path / "load.json").read_text())["runs"][0]["summary"]
        assert run["run"] == url and run["requests"] == run["ok"] == 4, run
        assert "| " + url + " | 2 | 4 | 4 | 0 |" in capsys.readouterr().out
        server.send_signal(signal.SIGTERM)
        err = server.communicate(timeout=90)[1]
    finally:
        server.kill()
    deadline = time.monotonic() + 30  # bounded: what it started may take a moment to exit after it
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [p[:120] for p in marked_processes(mark)]
    assert left == [], f"left running after SIGTERM: {left}"
    assert "\x1b[" not in err, err[-3000:]  # stderr is a pipe: no colour codes
    assert "Connecting to existing Serve app" not in err and "serving " in err and "stopping" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("flags,words", [
    (["--kill-replica-at", "1"], ("--kill-replica-at: for the server this command starts", "leave it out")),
    (["--max-batches", "4", "--replicas", "2"], ("--replicas, --max-batches: for the server", "leave them out")),
])
def test_load_refuses_server_flags_against_a_server_it_did_not_start(capsys, flags, words):
    code, err = run_cli(load_main, ["--url", "http://127.0.0.1:9", "--clients", "2", *flags], capsys)
    assert_one_line_error(code, err, *words, "--url")
