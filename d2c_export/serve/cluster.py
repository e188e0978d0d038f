"""Ray Serve around the application: deploy, wait, shut down, and the replica-kill fault the load runs use (the
cluster itself: `d2c_export.ray_cluster`)."""
from __future__ import annotations

import errno
import logging
import socket
import time
import urllib.request
from contextlib import contextmanager
from typing import Callable

from d2c_export import ray_cluster
from d2c_export.errors import EngineError
from d2c_export.serve.app import APP_NAME, GENERATOR, ServeOptions, build_app

log = logging.getLogger("d2c")
KEEP_ALIVE_S = 5  # an idle connection is closed this long after its last answer (Ray Serve's default: 90 s)
EXISTING_SERVE = "Connecting to existing Serve app"  # what serve._run logs after serve.start, misleading here


@contextmanager
def _quiet(logger: logging.Logger, words: str):
    """`logger` drops the records whose message contains `words` for the duration."""
    def keep(record: logging.LogRecord) -> bool:
        return words not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def deploy(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, request_timeout_s: float = 300,
           ready_timeout_s: float = 300) -> str:
    """Deploy (or redeploy with new options) the application behind Serve's HTTP proxy; its base URL once the
    health endpoint answers."""
    from ray import serve
    from ray.exceptions import RayTaskError
    app = build_app(options)
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s,
                                  "keep_alive_timeout_s": KEEP_ALIVE_S})
    except RayTaskError as exc:  # the proxy could not listen (on a cluster: the port is checked on the head node)
        raise EngineError(f"Ray Serve's HTTP proxy did not start on {host}:{port} ({exc.cause}); if the port is in "
                          f"use, pick another with --port") from None
    # not serve.run: it waits, unbounded, for the application to run (forever for a replica that cannot be placed);
    # it finds the Serve that serve.start just started, and would log that it connects to an existing one
    with _quiet(logging.getLogger("ray.serve"), EXISTING_SERVE):
        serve._run(app, _blocking=False, name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_healthy(url, ready_timeout_s, _application_state)
    return url


def _application_state() -> tuple[bool, str]:
    """Whether Serve gave up on the application, and what it says of it (a replica it cannot schedule, say)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return False, ""
    said = [app.message] + [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return app.status == ApplicationStatus.DEPLOY_FAILED, " ".join(without_traceback(m) for m in said if m)


def without_traceback(message: str) -> str:
    """A status message without the traceback it may carry: its first line and its last (the error itself)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else message.strip()


def check_port(host: str, port: int) -> None:
    """Refuse at once an address this machine cannot listen on (the port in use, a host not of this machine),
    binding as Serve's proxy does (no address reuse)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            raise EngineError(f"--port {port}: {host}:{port} is already in use (another server, or a d2c-serve still "
                              f"running); stop it or pick another port with --port") from None
        if exc.errno == errno.EACCES:
            raise EngineError(f"--port {port}: not allowed to listen on {host}:{port} ({reason}); pick a port above "
                              f"1023 with --port") from None
        raise EngineError(f"--host {host}: cannot listen on {host}:{port} ({reason}); give an address of this "
                          f"machine with --host (127.0.0.1, or 0.0.0.0 for every interface)") from None


def wait_healthy(url: str, timeout_s: float, state: Callable[[], tuple[bool, str]] | None = None) -> None:
    """Poll GET /v1/health until it answers 200 (bounded by `timeout_s`); `state`: (failed, what the server side
    says), to stop at once when it failed and to say why it is not up."""
    deadline = time.monotonic() + timeout_s
    last, said = "no answer", ""
    while time.monotonic() < deadline:
        failed, said = state() if state is not None else (False, "")
        if failed:
            raise EngineError(f"the server at {url} failed to start: {said}")
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=max(1.0, min(10.0, deadline - time.monotonic()))) \
                    as reply:
                if reply.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise EngineError(f"the server at {url} did not become healthy within {timeout_s:g} s ({last}){'; ' * bool(said)}"
                      f"{said}")


def kill_replica() -> str:
    """Kill one generator replica as a crash would (no graceful shutdown); Serve's controller replaces it.
    The replica is found by asking one for its actor name through a deployment handle."""
    import ray
    from ray import serve
    handle = serve.get_deployment_handle(GENERATOR, app_name=APP_NAME)
    name = handle.health.remote().result(timeout_s=30).actor
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def running_replicas() -> int:
    from ray import serve
    app = serve.status().applications.get(APP_NAME)
    if app is None or GENERATOR not in app.deployments:
        return 0
    return app.deployments[GENERATOR].replica_states.get("RUNNING", 0)


def wait_replicas(count: int, timeout_s: float, after_kill: bool = False) -> float:
    """Wait until `count` generator replicas run; the seconds it took (bounded by `timeout_s`). `after_kill`: first
    wait (at most 15 s) for Serve to notice the killed one, so the old count is not taken for the new one."""
    start = time.monotonic()
    if after_kill:
        while time.monotonic() - start < min(15.0, timeout_s) and running_replicas() >= count:
            time.sleep(0.1)
    while time.monotonic() - start < timeout_s:
        if running_replicas() >= count:
            return time.monotonic() - start
        time.sleep(0.25)
    raise EngineError(f"{count} generator replicas were not running again within {timeout_s:g} s")


def shutdown() -> None:
    """Stop the application and Serve, then leave Ray."""
    import ray
    from ray import serve
    if ray.is_initialized():
        serve.shutdown()
    ray_cluster.shutdown()
