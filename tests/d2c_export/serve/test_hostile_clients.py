"""Slow, unauthenticated and oversized requests against the session's server, over real HTTP on loopback (a few
hundred connections at most, each test bounded in time): they hold no slot that serving needs, so health, the
model and images stay answerable while they stall, and every refusal is one line of JSON."""
from __future__ import annotations

import http.client
import json
import socket
from urllib.parse import urlsplit

import pytest

from d2c_export.serve.api import MAX_BODY_BYTES
from d2c_export.serve.app import BODY_READERS, ServeOptions, generator_capacity
from d2c_export.serve.cluster import KEEP_ALIVE_S
from d2c_export.serve.slow_clients import STILL_OPEN, SlowClients, probe, stall_markdown, stall_report
from tests.d2c_export.serve.conftest import BODY_TIMEOUT_S, FAST, MAX_BATCH
from tests.d2c_export.serve.test_http import concurrently

PROBE_TIMEOUT_S = 30  # a probe with no answer by then counts as unanswered (status 0): a bound on the test only
# the session server (max queue 4, one replica) reads at most this many bodies at once
BODY_READERS_SERVED = BODY_READERS * generator_capacity(ServeOptions("", max_queue=4, replicas=1), MAX_BATCH)


def _serving_answers(served) -> list[int]:
    """Health (no token), the model and one image (with the token): their statuses, 0 for no answer in time."""
    return [probe(served.url, "GET", "/v1/health", timeout_s=PROBE_TIMEOUT_S).status,
            probe(served.url, "GET", "/v1/model", served.token, timeout_s=PROBE_TIMEOUT_S).status,
            probe(served.url, "POST", "/v1/images", served.token, json.dumps({"class": 1, **FAST}).encode(),
                  timeout_s=PROBE_TIMEOUT_S).status]


STALLS = [  # (name, stall, method and path, connections, seconds to wait for their answers, what they get)
    ("body, no token", "body", "POST /v1/images", 200, 30, {"401": 200}),
    ("chunked body, no token", "chunked", "POST /v1/images", 200, 30, {"401": 200}),
    ("body to an unknown path, no token", "body", "POST /v2/none", 100, 30, {"401": 100}),
    ("body to health", "body", "GET /v1/health", 100, 30, {"200": 100}),  # health reads no body
    # no answer and no close: Ray Serve's proxy has no header deadline; they hold a socket of it, and no slot
    ("unfinished headers", "headers", "POST /v1/images", 100, 1, {STILL_OPEN: 100}),
    ("idle sockets", "idle", "POST /v1/images", 100, 1, {STILL_OPEN: 100}),
]


@pytest.mark.parametrize("name,stall,request_line,count,wait_s,outcomes", STALLS, ids=[s[0] for s in STALLS])
def test_stalled_clients_without_the_token_hold_no_slot(served, name, stall, request_line, count, wait_s, outcomes):
    method, path = request_line.split()
    with SlowClients(served.url, count, stall, path=path, method=method) as slow:
        answers = _serving_answers(served)
        got = slow.outcomes(wait_s)
    assert answers == [200, 200, 200], (name, answers)
    assert dict(got) == outcomes, (name, got)


def test_stalled_bodies_with_the_token_are_bounded_in_number_and_time(served):
    """Token holders that stall their bodies: at most BODY_READERS_SERVED are read at once (the others get 503 at
    once) and each gets 408 at the body deadline; health and the model are answered meanwhile."""
    half = BODY_READERS_SERVED // 2 + 6
    with SlowClients(served.url, half, "body", served.token) as bodies, \
            SlowClients(served.url, half, "chunked", served.token) as chunked:
        health_and_model = _serving_answers(served)[:2]
        got = bodies.outcomes(BODY_TIMEOUT_S + 30) + chunked.outcomes(BODY_TIMEOUT_S + 30)
    assert health_and_model == [200, 200]
    assert set(got) == {"408", "503"} and sum(got.values()) == 2 * half > BODY_READERS_SERVED, got
    assert _serving_answers(served) == [200, 200, 200]


def test_idle_connections_are_closed_after_their_answer(served):
    """Keep-alive connections left idle after an answer are closed by the server (after KEEP_ALIVE_S)."""
    with SlowClients(served.url, 20, "idle") as idle:
        for connection in idle.sockets:
            connection.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = http.client.HTTPResponse(connection)
            reply.begin()
            assert reply.status == 200 and reply.read() and not reply.will_close
            connection.settimeout(KEEP_ALIVE_S + 30)
        closed = [connection.recv(1) for connection in idle.sockets]  # b"": closed by the server
    assert closed == [b""] * 20


def test_a_burst_of_health_requests_shares_one_probe_of_the_generators(served):
    """More health requests at once than the generators hold and queue (12 here) are all answered 200."""
    answers = concurrently(lambda k: probe(served.url, "GET", "/v1/health", timeout_s=PROBE_TIMEOUT_S).status, 64, 60)
    assert sorted(answers.values()) == [200] * 64


def _chunked(body: bytes, size: int = 1000) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def _padded(size: int) -> bytes:
    """A valid request body of exactly `size` bytes."""
    body = json.dumps({"class": 1, **FAST}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


def _exchange(served, method: str, path: str, headers: dict, body: bytes, token: bool = True) -> tuple[int, bytes]:
    """Send the request as given (headers and body bytes as they are on the wire); its status and body."""
    parts = urlsplit(served.url)
    head = {"Host": parts.hostname, "Content-Type": "application/json", **headers}
    if token:
        head["Authorization"] = f"Bearer {served.token}"
    raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=PROBE_TIMEOUT_S) as connection:
        connection.sendall(raw.encode() + body)
        reply = http.client.HTTPResponse(connection)
        reply.begin()
        return reply.status, reply.read()


OVER = _padded(MAX_BODY_BYTES + 1)
LIMITS = [  # (name, method, path, headers, body bytes, with the token, status, words of the one-line error)
    ("chunked over the limit", "POST", "/v1/images", {"Transfer-Encoding": "chunked"}, _chunked(OVER), True, 413,
     "bytes"),
    ("Content-Length over the limit, body never sent", "POST", "/v1/images", {"Content-Length": "1000000"}, b"{",
     True, 413, "bytes"),
    ("Content-Length over the limit on GET /v1/model", "GET", "/v1/model", {"Content-Length": "1000000"}, b"", True,
     413, "bytes"),
    ("chunked over the limit, no token", "POST", "/v1/images", {"Transfer-Encoding": "chunked"}, _chunked(OVER),
     False, 401, "bearer"),
    ("Content-Length over the limit, no token", "POST", "/v1/images", {"Content-Length": str(len(OVER))}, OVER,
     False, 401, "bearer"),
    ("chunked at the limit", "POST", "/v1/images", {"Transfer-Encoding": "chunked"},
     _chunked(_padded(MAX_BODY_BYTES)), True, 200, None),
    ("Content-Length at the limit", "POST", "/v1/images", {"Content-Length": str(MAX_BODY_BYTES)},
     _padded(MAX_BODY_BYTES), True, 200, None),
    ("health with a stalled body", "GET", "/v1/health", {"Content-Length": "1000"}, b"{", False, 200, None),
    # broken framing never reaches the ingress: the proxy answers a plain-text 400 and closes
    ("Content-Length not a number", "POST", "/v1/images", {"Content-Length": "12abc"}, b"{}", True, 400, None),
    ("Content-Length and chunked both", "POST", "/v1/images", {"Content-Length": "5", "Transfer-Encoding": "chunked"},
     _chunked(b"{}"), True, 400, None),
    ("bad chunk size", "POST", "/v1/images", {"Transfer-Encoding": "chunked"}, b"zz\r\n{}\r\n0\r\n\r\n", True, 400,
     None),
]


@pytest.mark.parametrize("name,method,path,headers,body,token,status,words", LIMITS, ids=[c[0] for c in LIMITS])
def test_size_limits_hold_however_the_body_is_sent(served, name, method, path, headers, body, token, status, words):
    got, raw = _exchange(served, method, path, headers, body, token)
    assert got == status, (name, got, raw)
    if words is not None:
        error = json.loads(raw)
        assert list(error) == ["error"] and "\n" not in error["error"] and words in error["error"].lower(), raw


def test_the_stall_report_of_d2c_serve_load(served):
    """`d2c-serve-load --slow-clients N`'s table, here without the token (so its own probes of the model and of
    images are refused too, and the runs that need the token are left out)."""
    rows = stall_report(served.url, 3, None, json.dumps({"class": 1, **FAST}).encode(), probes=1, wait_s=1)
    assert [r["stalled"] for r in rows] == ["body, no token", "chunked body, no token", "unfinished headers",
                                            "idle sockets"]
    assert [r["stalled got"] for r in rows] == [{"401": 3}, {"401": 3}, {STILL_OPEN: 3}, {STILL_OPEN: 3}]
    assert all(r["/v1/health"]["statuses"] == {200: 1} and r["/v1/images"]["statuses"] == {401: 1} for r in rows)
    table = stall_markdown(rows).splitlines()
    assert len(table) == 6 and table[2].startswith("| body, no token | 3 | 200 x1 (") and "401 x3 |" in table[2]
