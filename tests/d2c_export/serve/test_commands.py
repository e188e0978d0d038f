"""`d2c-serve` and `d2c-serve-load` refuse what the replicas could not run, in one line, before Ray starts: engines
and flags, the token, the port, replicas that cannot be placed; and they say at start whether auth is on."""
from __future__ import annotations

import logging
import socket

import pytest

from d2c_export.errors import EngineError
from d2c_export.ray_cluster import node_resources, unplaceable
from d2c_export.serve.api import TOKEN_ENV
from d2c_export.serve.cli import load_main, log_auth, serve_main
from d2c_export.serve.cluster import wait_healthy, without_traceback
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli


@pytest.mark.parametrize("argv,words", [
    (["--engines", "{tmp}/none"], ("does not exist", "d2c-export onnx")),
    (["--engines", "{engines}", "--max-batch", "5"], ("exceeds the exported profile", "--max-batch 5")),
    (["--engines", "{engines}", "--backend", "ort", "--precision", "fp16"], ("no onnx-fp16 build", "--fp16")),
    (["--engines", "{engines}", "--backend", "ort", "--precision", "bf16"], ("fp32, fp16 only",)),
    (["--engines", "{engines}", "--batch-wait-ms", "nan"], ("not a finite number",)),
    (["--engines", "{engines}", "--replicas", "0"], ("--replicas",)),
], ids=["missing", "max-batch", "fp16", "ort-bf16", "nan-wait", "replicas"])
def test_serve_refuses_in_one_line(engines_factory, tmp_path, capsys, argv, words):
    engines = engines_factory("d2c-tiny")
    argv = [a.format(tmp=tmp_path, engines=engines) for a in argv]
    code, err = run_cli(serve_main, argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, *words)


def test_load_refuses_in_one_line(engines_factory, tmp_path, capsys):
    engines = engines_factory("d2c-tiny")
    code, err = run_cli(load_main, ["--engines", engines, "--max-batches", "4,8"], capsys)
    assert_one_line_error(code, err, "--max-batches 8 exceeds the exported profile", "--max-batch 8")
    code, err = run_cli(load_main, ["--engines", engines, "--max-batches", "0"], capsys)
    assert_one_line_error(code, err, "positive integers")


@pytest.fixture()
def busy_port():
    """A loopback port that something else listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


SECRET = "s3cret-token"
START_REFUSALS = [  # (name, D2C_SERVE_TOKEN or None for unset, flags, words of the one error line)
    ("empty token", "", [], ("D2C_SERVE_TOKEN is set but empty", "unset D2C_SERVE_TOKEN")),
    ("token with a trailing newline", SECRET + "\n", [], ("a newline at character 13 of 13", "tr -d")),
    ("token with CRLF", SECRET + "\r\n", [], ("a carriage return at character 13 of 14",)),
    ("token with a leading space", " " + SECRET, [], ("a space at character 1",)),
    ("token with a tab", SECRET.replace("-", "\t"), [], ("a tab at character 7",)),
    ("token with a non-ASCII letter", SECRET.replace("e", "\u00e9"), [], ("U+00E9 at character 5",)),
    ("port in use", None, ["--port", "{busy}"], ("--port {busy}", "already in use")),
    ("host not of this machine", None, ["--host", "203.0.113.7"], ("--host 203.0.113.7", "cannot listen")),
    ("host that does not resolve", None, ["--host", "no-such-host.invalid"], ("--host no-such-host.invalid",)),
    ("replica CPUs beyond the machine", None, ["--replica-cpus", "1000", "--num-cpus", "2"],
     ("1 x (1000 CPU) cannot be placed", "--replica-cpus")),
    ("more replicas than CPUs", None, ["--replicas", "3", "--num-cpus", "2"], ("3 x (1 CPU) cannot be placed",)),
    ("fractional CPUs that do not add up", None, ["--replicas", "2", "--replica-cpus", "1.5", "--num-cpus", "2"],
     ("2 x (1.5 CPU) cannot be placed: 1 fit",)),
]


REFUSALS_BY_COMMAND = [(serve_main, [], *case) for case in START_REFUSALS] + [  # d2c-serve-load: no --host
    (load_main, ["--max-batches", "4"], *case) for case in START_REFUSALS if "--host" not in case[2]]


@pytest.mark.parametrize("main,own_flags,name,token,flags,words", REFUSALS_BY_COMMAND,
                         ids=[f"{m.__name__}-{c[0]}" for m, _, *c in REFUSALS_BY_COMMAND])
def test_what_cannot_serve_is_refused_at_start_in_one_line(engines_factory, busy_port, capsys, monkeypatch, main,
                                                           own_flags, name, token, flags, words):
    if token is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, token)
    argv = ["--engines", engines_factory("d2c-tiny"), *own_flags] + [f.format(busy=busy_port) for f in flags]
    code, err = run_cli(main, argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, *(w.format(busy=busy_port) for w in words))
    assert "s3cr" not in err  # the token itself is never printed


AUTH_LOGS = [  # (token, host, level, words of the one line logged at start)
    ("t", "127.0.0.1", logging.INFO, "auth on"),
    ("t", "0.0.0.0", logging.INFO, "auth on"),
    (None, "127.0.0.1", logging.INFO, "auth off"),
    (None, "localhost", logging.INFO, "auth off"),
    (None, "::1", logging.INFO, "auth off"),
    (None, "0.0.0.0", logging.WARNING, "anyone who can reach 0.0.0.0:8000"),
    (None, "10.1.2.3", logging.WARNING, "anyone who can reach 10.1.2.3:8000"),
    (None, "server.example", logging.WARNING, "set D2C_SERVE_TOKEN"),
]


@pytest.mark.parametrize("token,host,level,words", AUTH_LOGS)
def test_auth_on_or_off_is_logged_at_start(caplog, monkeypatch, token, host, level, words):
    logger = logging.getLogger("d2c")  # caught here only: the commands run above left root handlers on closed streams
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="d2c"):
            log_auth(token, host, 8000)
    finally:
        logger.removeHandler(caplog.handler)
    assert [(r.levelno, words in r.getMessage()) for r in caplog.records] == [(level, True)], caplog.records


PLACEMENTS = [  # (replicas, CPUs each, GPUs each, the nodes' resources, placeable)
    (1, 1000, 0, [{"CPU": 2}], False),
    (3, 1, 0, [{"CPU": 2}], False),
    (4, 0.5, 0, [{"CPU": 2}], True),
    (2, 1, 0, [{"CPU": 1}, {"CPU": 1}], True),
    (1, 2, 0, [{"CPU": 1}, {"CPU": 1}], False),  # 2 CPUs in all, but not on one node
    (1, 1, 1, [{"CPU": 8}], False),
    (2, 1, 0.5, [{"CPU": 8, "GPU": 1}], True),
    (3, 1, 0.5, [{"CPU": 8, "GPU": 1}], False),
    (1, 0, 0, [], False),
]


@pytest.mark.parametrize("replicas,cpus,gpus,nodes,placeable", PLACEMENTS)
def test_placement_is_judged_per_node(replicas, cpus, gpus, nodes, placeable):
    problem = unplaceable(replicas, cpus, gpus, nodes)
    assert (problem is None) == placeable, problem
    assert problem is None or f"{replicas} x ({cpus:g} CPU" in problem


def test_placement_on_the_running_instance(ray_local):
    """The check that runs once the local instance is up (it knows its GPUs then) reads its nodes."""
    nodes = node_resources()
    assert unplaceable(1, 1, 0, nodes) is None
    assert "cannot be placed" in unplaceable(1, 1, 1000, nodes)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failed,said,timeout_s,words", [
    (True, "Generator: The deployment failed to start 3 times in a row. Error: EngineError: gpt.onnx does not match",
     300, "failed to start: Generator: The deployment failed to start 3 times"),
    (False, "Generator: 1 replicas that have taken more than 30s to be scheduled", 1,
     "did not become healthy within 1 s"),
])
def test_waiting_for_the_server_ends_in_one_line(failed, said, timeout_s, words):
    """Serve's account of the application ends the wait at once when it gave up, and says why at the timeout."""
    with pytest.raises(EngineError) as caught:
        wait_healthy(f"http://127.0.0.1:{_closed_port()}", timeout_s, lambda: (failed, said))
    assert words in str(caught.value) and said in str(caught.value) and "\n" not in str(caught.value)


def test_a_status_message_loses_its_traceback():
    message = "The deployment failed to start.\nTraceback (most recent call last):\n  File \"x.py\", line 1\n" \
              "d2c_export.errors.EngineError: gpt.onnx is truncated\n"
    assert without_traceback(message) == "The deployment failed to start. d2c_export.errors.EngineError: gpt.onnx " \
                                            "is truncated"
    assert without_traceback(" one line ") == "one line"
