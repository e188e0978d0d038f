"""`d2c-serve` (the HTTP API on Ray Serve) and `d2c-serve-load` (the load generator, batching on and off side by
side, with an optional replica kill), on the shared flags of `d2c_export.cli_options`."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import time

import click

from d2c_export.cli_options import (backend_options, checked_out, engines_option, given_settings, int_list, options,
                                    quiet_option, sampling_options, setup_logging)
from d2c_export.cli_support import Command, Finite, flag_spelling
from d2c_export.errors import EngineError, UserError
from reference.pipeline import SamplingParams
from reference.settings import settings_of

log = logging.getLogger("d2c")
TOKEN_CHARACTER = re.compile(r"[!-~]")  # printable ASCII but the space: what a client can send in a header, as is
NEW_TOKEN = "export D2C_SERVE_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"

replica_options = options(
    click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
                 help="generator replicas, each with its own set of stages (one GPU each where the cluster has GPUs)"),
    click.option("--batch-wait-ms", type=Finite(min=0.0, max=10_000.0), default=20.0, show_default=True,
                 help="how long a replica waits for more requests to merge after the first"),
    click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
                 help="requests queued for the replicas beyond what they hold; more get 503 with Retry-After"),
    click.option("--replica-cpus", type=Finite(min=0.0, min_open=True), default=1.0, show_default=True,
                 help="CPUs Ray reserves per replica (its stage threads, unless --threads)"),
    click.option("--gpus-per-replica", type=Finite(min=0.0), default=None,
                 help="GPUs per replica (default: 1 where the Ray cluster has GPUs, else 0)"),
    click.option("--threads", type=click.IntRange(min=0), default=0, help="stage threads per replica (0: its CPUs)"),
    click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
                 help="TCP port of the HTTP proxy"),
    click.option("--address", default=None, help="an existing Ray cluster (ray://HOST:10001 or auto); default: a "
                 "local Ray instance"),
    click.option("--num-cpus", type=click.IntRange(min=1), default=None,
                 help="CPUs of the local Ray instance (default: all)"),
)


def serve_token() -> str | None:
    """D2C_SERVE_TOKEN (None when unset); refused in one line when set but empty, or not a bearer token (a trailing
    newline, a space, a non-ASCII letter), since either would silently serve every request without a token, or
    none."""
    from d2c_export.serve.api import TOKEN_ENV
    token = os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    if not token:
        raise click.UsageError(f"{TOKEN_ENV} is set but empty, which would serve every request without a token; "
                               f"set a token (`{NEW_TOKEN}`) or unset it (`unset {TOKEN_ENV}`) to serve without auth")
    at = next((i for i, c in enumerate(token) if not TOKEN_CHARACTER.fullmatch(c)), None)
    if at is not None:  # the token itself is never printed
        what = {"\n": "a newline", "\r": "a carriage return", " ": "a space", "\t": "a tab"}.get(
            token[at], f"the character U+{ord(token[at]):04X}")
        raise click.UsageError(
            f"{TOKEN_ENV} has {what} at character {at + 1} of {len(token)}, so no client could send it as is in an "
            f"Authorization header; a token is printable ASCII without spaces: strip it "
            f"(`export {TOKEN_ENV}=\"$(tr -d '[:space:]' < token.txt)\"`) or make a new one (`{NEW_TOKEN}`)")
    return token


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def log_auth(token: str | None, host: str, port: int) -> None:
    """Say at start whether requests need the token, and warn when anyone on the network could generate."""
    if token is not None:
        log.info("auth on: /v1/images and /v1/model need `Authorization: Bearer <D2C_SERVE_TOKEN>`")
    elif _loopback(host):
        log.info("auth off: D2C_SERVE_TOKEN is not set, so any local client can generate")
    else:
        log.warning("auth off on a non-loopback address: anyone who can reach %s:%d can generate images; set "
                    "D2C_SERVE_TOKEN (`%s`)", host, port, NEW_TOKEN)


def _serve_options(engines_dir, backend, precision, replicas, max_batch, batch_wait_ms, max_queue, replica_cpus,
                   threads, token):
    from d2c_export.serve.api import token_digest
    from d2c_export.serve.app import ServeOptions, check_options
    return check_options(ServeOptions(
        engines_dir=str(engines_dir), backend=backend, precision=precision, replicas=replicas,
        max_batch=max_batch or 0, batch_wait_s=batch_wait_ms / 1000, max_queue=max_queue,
        replica_cpus=replica_cpus, threads=threads, token_sha256=token_digest(token)))


PLACEMENT_FIX = "lower --replicas, --replica-cpus or --gpus-per-replica, or serve on a larger cluster (--address)"


def _refuse_before_ray(options, gpus_per_replica, address, num_cpus, host, port) -> None:
    """For a local Ray instance, before it starts: the port must be free and the replicas' CPUs (and GPUs when
    given) must fit on this machine."""
    from d2c_export import ray_cluster
    from d2c_export.serve import cluster
    if address is not None:  # an existing cluster: its proxy may already hold the port, and nodes may be added
        return
    cluster.check_port(host, port)
    local = {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float("inf")}  # its GPUs: known once it runs
    problem = ray_cluster.unplaceable(options.replicas, options.replica_cpus, gpus_per_replica or 0.0, [local])
    if problem:
        raise click.UsageError(f"{problem} (the local Ray instance gets {local['CPU']:g} CPUs: --num-cpus or this "
                               f"machine's); {PLACEMENT_FIX}")


def _start(options, gpus_per_replica, address, num_cpus, host, port) -> str:
    from d2c_export import ray_cluster
    from d2c_export.serve import cluster
    ray_cluster.connect(address, num_cpus)
    options.replica_gpus = (1.0 if ray_cluster.cluster_gpus() > 0 else 0.0) if gpus_per_replica is None \
        else gpus_per_replica
    if address is None:  # the local instance, as started: its GPUs are known now
        problem = ray_cluster.unplaceable(options.replicas, options.replica_cpus, options.replica_gpus,
                                          ray_cluster.node_resources())
        if problem:
            raise click.UsageError(f"{problem}; {PLACEMENT_FIX}")
    log.info("deploying %d replica%s (%g CPU, %g GPU each, max batch %d) ...", options.replicas,
             "s" * (options.replicas > 1), options.replica_cpus, options.replica_gpus, options.max_batch)
    return cluster.deploy(options, host, port)


@click.command(cls=Command, help="Serve exported D2C engines over HTTP on Ray Serve: POST /v1/images, GET /v1/health, "
               "GET /v1/model, OpenAPI at /docs, a page at /. With D2C_SERVE_TOKEN set, requests need "
               "`Authorization: Bearer <token>`.")
@engines_option
@backend_options
@replica_options
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="images per generation, merged across requests (default: the exported max batch)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address the HTTP proxy listens on")
@quiet_option
def serve_cli(engines_dir, backend, precision, replicas, batch_wait_ms, max_queue, replica_cpus, gpus_per_replica,
              threads, port, address, num_cpus, max_batch, host, quiet):
    from d2c_export.serve import cluster
    setup_logging(quiet)
    token = serve_token()
    options = _serve_options(engines_dir, backend, precision, replicas, max_batch, batch_wait_ms, max_queue,
                             replica_cpus, threads, token)
    _refuse_before_ray(options, gpus_per_replica, address, num_cpus, host, port)
    log_auth(token, host, port)
    try:
        url = _start(options, gpus_per_replica, address, num_cpus, host, port)
        log.info("serving %s at %s (docs: %s/docs); Ctrl-C stops", engines_dir, url, url)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        cluster.shutdown()
    return 0


@click.command(cls=Command, help="Load the HTTP API with concurrent clients on loopback, once per --max-batch (side "
               "by side: batching on and off), optionally killing a replica mid-run; or, with --url, a server already "
               "running, once. Sampling flags are sent with every request.")
@engines_option
@backend_options
@replica_options
@click.option("--url", default=None, help="load the server already running at this address (http://HOST:PORT) "
              "instead of starting one: one run at its own max batch; D2C_SERVE_TOKEN is sent as the bearer token")
@click.option("--max-batches", "max_batches", default="16,1", show_default=True, callback=int_list,
              help="one run per value of the server's max batch")
@click.option("--clients", type=click.IntRange(1, 256), default=16, show_default=True,
              help="concurrent clients, each sending one request at a time")
@click.option("--requests", type=click.IntRange(min=1), default=96, show_default=True, help="requests per run")
@click.option("--duration", type=Finite(min=1.0, max=3600.0), default=300.0, show_default=True,
              help="seconds per run at most")
@click.option("--kill-replica-at", type=Finite(min=0.0), default=None,
              help="also a fault run (first max batch): kill a generator replica this many seconds in")
@click.option("--slow-clients", type=click.IntRange(0, 500), default=0, show_default=True,
              help="first, hold this many stalled connections of each kind (bodies and headers that never end, idle "
                   "sockets) while health, the model and images are probed")
@sampling_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write every run as JSON here")
@quiet_option
def load_cli(engines_dir, backend, precision, replicas, batch_wait_ms, max_queue, replica_cpus,
             gpus_per_replica, threads, port, address, num_cpus, url, max_batches, clients, requests, duration,
             kill_replica_at, slow_clients, json_path, quiet, **flags):
    from d2c_export.serve import cluster
    setup_logging(quiet)
    checked_out(json_path, "--json")
    settings = given_settings(flags)
    token = serve_token()
    load = dict(clients=clients, requests=requests, duration=duration, slow_clients=slow_clients, token=token,
                settings=settings)
    reports, stalls = [], []
    if url is not None:
        _refuse_server_flags_with_url()
        url = url.rstrip("/")
        cluster.wait_healthy(url, 30)
        reports.append(_load_run(url, url, 1, None, stalls, **load))
    else:
        runs = [(f"max batch {b}", b, None) for b in max_batches]
        if kill_replica_at is not None:
            runs.append((f"max batch {max_batches[0]}, replica killed", max_batches[0], kill_replica_at))
        try:
            checked = [_serve_options(engines_dir, backend, precision, replicas, b, batch_wait_ms, max_queue,
                                      replica_cpus, threads, token) for _, b, _ in runs]
        except UserError as exc:  # a run's max batch is one of --max-batches
            spell = flag_spelling(load_cli)
            raise click.UsageError(exc.render(lambda name, value=None: spell(
                "max_batches" if name == "max_batch" else name, value))) from None
        _refuse_before_ray(checked[0], gpus_per_replica, address, num_cpus, "127.0.0.1", port)
        log_auth(token, "127.0.0.1", port)
        try:
            for (label, _, kill_at), server in zip(runs, checked):
                started = _start(server, gpus_per_replica, address, num_cpus, "127.0.0.1", port)
                reports.append(_load_run(started, label, replicas, kill_at, stalls, **load))
        finally:
            cluster.shutdown()
    _print_reports(reports, stalls, settings, json_path)
    return 0


LOAD_CLIENT_FLAGS = {"url", "clients", "requests", "duration", "slow_clients", "json_path", "quiet",
                     *(s.name for s in settings_of(SamplingParams))}


def _refuse_server_flags_with_url() -> None:
    """With --url the server is already running: the flags that shape the server this command would start (or
    kill its replica) cannot apply to it, so giving one is an error rather than ignored."""
    from click.core import ParameterSource
    ctx = click.get_current_context()
    given = [p for p in ctx.command.params if p.name not in LOAD_CLIENT_FLAGS
             and ctx.get_parameter_source(p.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]
    if given:
        flags = ", ".join(p.opts[0] for p in given)
        raise click.UsageError(f"{flags}: for the server this command starts, but --url loads one already "
                               f"running; leave {'it' if len(given) == 1 else 'them'} out, or leave out --url")


def _load_run(url: str, label: str, replicas: int, kill_at: float | None, stalls: list, *, clients: int,
              requests: int, duration: float, slow_clients: int, token: str | None, settings: dict):
    """One run of `d2c-serve-load` against the server at `url`: a warm-up, the stalled connections (first run
    only), the run itself and, with `kill_at`, the replica kill and the check that serving recovers."""
    from d2c_export.serve import cluster
    from d2c_export.serve.load import default_body, post_json, run_load
    from d2c_export.serve.slow_clients import stall_report
    classes = json.loads(_get(url, "/v1/model", token))["classes"]
    body = lambda i: default_body(i, classes, settings)  # noqa: E731
    run_load(url, min(clients, replicas * 2), 2 * replicas, duration, body, timeout_s=120, token=token)
    if slow_clients and not stalls:
        log.info("%d stalled connections of each kind ...", slow_clients)
        stalls.extend(stall_report(url, slow_clients, token, json.dumps(body(0)).encode()))
    log.info("run %r: %d clients, %d requests ...", label, clients, requests)
    report = run_load(url, clients, requests, duration, body, label, token=token, fault_at_s=kill_at,
                      fault=None if kill_at is None else (lambda: f"killed {cluster.kill_replica()}"))
    if kill_at is not None:
        back = cluster.wait_replicas(replicas, 120, after_kill=True)
        probes = [post_json(url, "/v1/images", body(10_000 + i), 120, token)[0] for i in range(4)]
        report.fault += f"; {replicas} replica(s) running again {back:.1f} s after the check began; " \
                        f"probes after: {probes}"
        if any(p != 200 for p in probes):
            raise EngineError(f"serving did not recover after the replica kill (probe statuses {probes})")
    return report


def _print_reports(reports: list, stalls: list, settings: dict, json_path: str | None) -> None:
    from d2c_export.serve.load import markdown
    from d2c_export.serve.slow_clients import stall_markdown
    summaries = [r.summary() for r in reports]
    print(markdown(summaries))
    if stalls:
        print(stall_markdown(stalls))
    for s in summaries:
        if s["fault"]:
            print(f"{s['run']}: {s['fault']}; statuses {s['statuses']}")
    if json_path:
        from reference.files import write_json_atomic
        write_json_atomic(json_path, {"settings": settings, "runs": [r.to_dict() for r in reports], "stalls": stalls})


def _get(url: str, path: str, token: str | None) -> str:
    import urllib.request
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return reply.read().decode()


def serve_main(argv: list[str] | None = None) -> int:
    return serve_cli.main(argv, prog_name="d2c-serve", standalone_mode=False)


def load_main(argv: list[str] | None = None) -> int:
    return load_cli.main(argv, prog_name="d2c-serve-load", standalone_mode=False)
