"""What a request passes before the application sees it, so that slow or unauthenticated clients hold no slot.

Ray Serve's HTTP proxy hands a request to the ingress as soon as its headers are parsed, and the ingress then
pulls the body from the proxy: a client that sends its body slowly holds one of the ingress's slots for as long
as it likes. `RequestGuard` (ASGI middleware of the ingress) therefore, for every path but the public ones:

1. checks the bearer token from the headers alone, before any body byte is read (401);
2. refuses a declared Content-Length over the limit (413);
3. reads the whole body, at most `body_readers` bodies at a time (503 with Retry-After past that), within
   `body_timeout_s` (408) and the size limit however it is sent, chunked or not (413);
4. hands the application the body it read.

Each refusal is one line of JSON and closes the connection. The public paths (health, the page and its icon, the
docs) read no body and pass through.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.responses import JSONResponse

from d2c_export.cli_support import one_line
from d2c_export.serve.api import MAX_BODY_BYTES, authorized

PUBLIC_PATHS = frozenset({"/", "/favicon.ico", "/v1/health", "/docs", "/docs/oauth2-redirect", "/openapi.json",
                          "/redoc"})
BODY_TIMEOUT_S = 10.0  # a request's body (at most MAX_BODY_BYTES) must have arrived this long after its headers


@dataclass(frozen=True)
class GuardLimits:
    """The token's digest (None: no auth), the body's size and time limits, the bodies read at once."""

    token_sha256: str | None
    body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S
    body_readers: int = 64
    retry_after_s: int = 1


def refusal(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A one-line JSON error that also closes the connection (the rest of the request is not read)."""
    return JSONResponse({"error": one_line(message)}, status_code=status,
                        headers={**(headers or {}), "Connection": "close"})


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class RequestGuard:
    """ASGI middleware: auth from the headers, then the body read whole under a deadline, a size limit and a cap
    on the bodies read at once; the limits are the application's `state.guard` (`GuardLimits`)."""

    def __init__(self, asgi):
        self.asgi = asgi
        self.reading = 0  # requests whose body is being read (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            return await self.asgi(scope, receive, send)
        limits: GuardLimits | None = getattr(scope["app"].state, "guard", None)
        if limits is None:  # fail closed: never serve without knowing whether a token is required
            return await refusal(503, "the server is starting; retry", {"Retry-After": "1"})(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        has_body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        problem = self._refused_before_body(headers, has_body, limits)
        if problem is not None:
            return await problem(scope, receive, send)
        self.reading += int(has_body)
        try:
            body = await asyncio.wait_for(_read_body(receive, limits.body_bytes), limits.body_timeout_s)
        except asyncio.TimeoutError:
            problem = refusal(408, f"the body did not arrive within {limits.body_timeout_s:g} s of the headers; "
                                   f"send the whole request at once")
        except _TooLarge:
            problem = refusal(413, f"the body is over {limits.body_bytes} bytes")
        except _ClientGone:
            return None
        finally:
            self.reading -= int(has_body)
        if problem is not None:
            return await problem(scope, receive, send)
        return await self.asgi(scope, _replay(body, receive), send)

    def _refused_before_body(self, headers: dict, has_body: bool, limits: GuardLimits) -> JSONResponse | None:
        header = headers.get(b"authorization")
        if not authorized(None if header is None else header.decode("latin-1"), limits.token_sha256):
            return refusal(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.body_bytes):
            return refusal(413, f"the body is over {limits.body_bytes} bytes")
        if has_body and self.reading >= limits.body_readers:
            return refusal(503, f"{self.reading} requests are already sending their body; retry later",
                           {"Retry-After": str(limits.retry_after_s)})
        return None


def _replay(body: bytes, receive):
    """The ASGI receive of a body already read: the body once, then what the connection says (a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
