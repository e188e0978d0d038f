"""Ray Serve around the application: deploy, wait, shut down, and the replica-kill fault the load runs use (the
cluster itself: `d2c_export.ray_cluster`)."""
from __future__ import annotations

import logging
import time
import urllib.request

from d2c_export import ray_cluster
from d2c_export.errors import EngineError
from d2c_export.serve.app import APP_NAME, GENERATOR, ServeOptions, build_app

log = logging.getLogger("d2c")


def deploy(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, request_timeout_s: float = 300,
           ready_timeout_s: float = 300) -> str:
    """Deploy (or redeploy with new options) the application behind Serve's HTTP proxy; its base URL once the
    health endpoint answers."""
    from ray import serve
    app = build_app(options)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    wait_healthy(url, ready_timeout_s)
    return url


def wait_healthy(url: str, timeout_s: float) -> None:
    """Poll GET /v1/health until it answers 200 (bounded by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=10) as reply:
                if reply.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise EngineError(f"the server at {url} did not become healthy within {timeout_s:g} s ({last})")


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
