"""Slow clients for the HTTP API, bounded in count and time: connections that open a request and then stall, and
timed probes of the endpoints that must stay answerable while they do.

A stalled connection sends one of `STALLS` (a body that never ends, a chunked body that never ends, headers that
never end, nothing at all), with or without the bearer token, and then waits. `SlowClients` opens `count` of them
on loopback, keeps them open while the caller probes the server, tells what each one got back (an HTTP status, a
close without an answer, or nothing yet) and closes them all on exit.
"""
from __future__ import annotations

import http.client
import selectors
import socket
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

STALLS = ("body", "chunked", "headers", "idle")
STILL_OPEN = "open"  # no answer and no close by the time the outcomes were read
CLOSED = "closed"  # closed (or reset) without an HTTP answer


def opening(stall: str, host: str, path: str = "/v1/images", token: str | None = None, method: str = "POST") -> bytes:
    """The bytes a stalled client sends before it stops: a request whose end never comes."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
    if stall == "body":  # 1000 bytes announced, 5 sent
        return (head + "Content-Length: 1000\r\n\r\n{\"cla").encode()
    if stall == "chunked":  # one chunk of 5 bytes, no last chunk
        return (head + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"cla\r\n").encode()
    if stall == "headers":  # the blank line that ends the headers never comes
        return head.encode()
    if stall == "idle":
        return b""
    raise ValueError(f"unknown stall {stall!r}; one of {', '.join(STALLS)}")


def _status_of(first_bytes: bytes) -> str:
    parts = first_bytes.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return CLOSED


class SlowClients:
    """`count` loopback connections that each send `opening(stall, ...)` and stall; a context manager."""

    def __init__(self, url: str, count: int, stall: str = "body", token: str | None = None,
                 path: str = "/v1/images", method: str = "POST"):
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.count = count
        self.payload = opening(stall, parts.hostname, path, token, method)
        self.sockets: list[socket.socket] = []

    def __enter__(self) -> "SlowClients":
        try:
            for _ in range(self.count):
                connection = socket.create_connection(self.address, timeout=10)
                self.sockets.append(connection)
                if self.payload:
                    connection.sendall(self.payload)
        except BaseException:
            self.close()
            raise
        return self

    def outcomes(self, wait_s: float) -> Counter:
        """What each connection got within `wait_s` seconds (all waited on together): its HTTP status, `closed`
        (no answer), or `open` (nothing yet)."""
        found: dict[socket.socket, str] = {}
        with selectors.DefaultSelector() as selector:
            for connection in self.sockets:
                connection.setblocking(False)
                selector.register(connection, selectors.EVENT_READ)
            deadline = time.monotonic() + wait_s
            while len(found) < len(self.sockets) and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    try:
                        first = key.fileobj.recv(64)
                    except OSError:  # reset
                        first = b""
                    found[key.fileobj] = _status_of(first)
                    selector.unregister(key.fileobj)
        return Counter(found.get(connection, STILL_OPEN) for connection in self.sockets)

    def close(self) -> None:
        """Close every connection."""
        for connection in self.sockets:
            connection.close()
        self.sockets = []

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Probe:
    path: str
    status: int  # 0: no answer within the probe's timeout
    seconds: float


def probe(url: str, method: str, path: str, token: str | None = None, body: bytes | None = None,
          timeout_s: float = 30.0) -> Probe:
    """One request on a fresh connection, timed; status 0 when no answer came within `timeout_s`."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    start = time.monotonic()
    try:
        connection.request(method, path, body=body, headers=headers)
        reply = connection.getresponse()
        reply.read()
        return Probe(path, reply.status, time.monotonic() - start)
    except OSError:
        return Probe(path, 0, time.monotonic() - start)
    finally:
        connection.close()


STALL_RUNS = [  # (label, stall, with the token)
    ("body, no token", "body", False), ("chunked body, no token", "chunked", False),
    ("body, with the token", "body", True), ("chunked body, with the token", "chunked", True),
    ("unfinished headers", "headers", False), ("idle sockets", "idle", False),
]


def stall_report(url: str, count: int, token: str | None, image_body: bytes, probes: int = 5,
                 wait_s: float = 30.0) -> list[dict]:
    """For each of `STALL_RUNS`: `count` stalled connections held while health, the model and an image are each
    probed `probes` times in turn; the probes' statuses and slowest answer, and what the stalled ones got within
    `wait_s` (the deadlines they meet are the server's)."""
    rows = []
    for label, stall, with_token in STALL_RUNS:
        if with_token and token is None:
            continue
        with SlowClients(url, count, stall, token if with_token else None) as slow:
            answers = [probe(url, *request, timeout_s=wait_s) for _ in range(probes) for request in
                       (("GET", "/v1/health"), ("GET", "/v1/model", token), ("POST", "/v1/images", token, image_body))]
            got = slow.outcomes(wait_s)
        by_path = {path: [a for a in answers if a.path == path] for path in ("/v1/health", "/v1/model", "/v1/images")}
        rows.append({"stalled": label, "connections": count, "stalled got": dict(sorted(got.items())),
                     **{path: {"statuses": dict(Counter(a.status for a in found)),
                               "max_s": max(a.seconds for a in found)} for path, found in by_path.items()}})
    return rows


def stall_markdown(rows: list[dict]) -> str:
    """The stall runs as a table: each probe's statuses and slowest answer, and what the stalled clients got."""
    paths = ("/v1/health", "/v1/model", "/v1/images")
    lines = ["| stalled connections | count | " + " | ".join(f"{p} (max s)" for p in paths) + " | they got |",
             "|---|---:|" + "---|" * len(paths) + "---|"]
    for row in rows:
        cells = [", ".join(f"{s} x{n}" for s, n in row[p]["statuses"].items()) + f" ({row[p]['max_s']:.2f})"
                 for p in paths]
        got = ", ".join(f"{s} x{n}" for s, n in row["stalled got"].items())
        lines.append(f"| {row['stalled']} | {row['connections']} | " + " | ".join(cells) + f" | {got} |")
    return "\n".join(lines)
