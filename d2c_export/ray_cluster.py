"""The Ray cluster that serving and bulk generation run on: a local instance by default, or an existing one."""
from __future__ import annotations

import logging


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address`, or start a local Ray instance (`num_cpus`: its CPUs, default all)."""
    import ray
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


def cluster_gpus() -> float:
    """The GPUs of the connected cluster."""
    import ray
    return float(ray.cluster_resources().get("GPU", 0))


def shutdown() -> None:
    """Leave (or stop, when local) the Ray instance this process connected to."""
    import ray
    if ray.is_initialized():
        ray.shutdown()
