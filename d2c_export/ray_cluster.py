"""The Ray cluster that serving and bulk generation run on: a local instance by default, or an existing one."""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading

from d2c_export.errors import ClusterUnreachable, Setting


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local Ray instance (`num_cpus`: its CPUs, default all).

    `ray.init` replaces the SIGTERM handler with one that exits from wherever the main thread is; the caller's is
    put back, so that SIGTERM unwinds as the command intends (as Ctrl-C does). A cluster that cannot be joined is a
    `ClusterUnreachable` naming the address setting. Where stderr is not a terminal, the worker log lines that Ray
    prints here carry no colour codes."""
    import ray
    if ray.is_initialized():
        return
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # read by the driver's printer of worker logs
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        where = ("the Ray cluster at ", Setting("address", address)) if address else ("a local Ray instance",)
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ClusterUnreachable("cannot connect to ", *where, f" ({why}); check that it runs and is reachable, or "
                                 "leave out ", Setting("address"), " for a local one") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def cluster_gpus() -> float:
    """The GPUs of the connected cluster."""
    import ray
    return float(ray.cluster_resources().get("GPU", 0))


def node_resources() -> list[dict[str, float]]:
    """The total resources of each live node of the connected cluster."""
    import ray
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _fits(have: float, need: float) -> float:
    return math.inf if need <= 0 else math.floor(have / need + 1e-9)


def unplaceable(count: int, cpus: float, gpus: float, nodes: list[dict[str, float]]) -> str | None:
    """Why `count` actors of `cpus` CPUs and `gpus` GPUs each cannot all be placed on `nodes` (each a node's
    total resources), or None when they can."""
    placed = sum(min(_fits(node.get("CPU", 0.0), cpus), _fits(node.get("GPU", 0.0), gpus)) for node in nodes)
    if placed >= count:
        return None
    most_cpus = max((node.get("CPU", 0.0) for node in nodes), default=0.0)
    most_gpus = max((node.get("GPU", 0.0) for node in nodes), default=0.0)
    need = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus > 0 else "")
    have = f"{most_cpus:g} CPUs" + (f" and {most_gpus:g} GPUs" if gpus > 0 else "")
    return (f"{count} x ({need}) cannot be placed: {int(placed)} fit on the {len(nodes)} node"
            f"{'s' * (len(nodes) != 1)} of at most {have}")


def shutdown() -> None:
    """Leave (or stop, when local) the Ray instance this process connected to."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
