"""The workers of a bulk run: Ray actors that each open the engines once and generate one shard per call.

Each worker reserves its CPUs and, on a cluster with GPUs, one GPU (`num_gpus=1`). The driver keeps two shards in
flight per worker and writes what comes back (`ShardStore.write_shard`); workers only compute. A worker that dies
is restarted by Ray and its in-flight shards are run again (`max_restarts`, `max_task_retries`), so a killed
worker costs time, not images.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable

from d2c_export.bulk.shards import BulkPlan, Shard

log = logging.getLogger("d2c")

IN_FLIGHT = 2  # shards queued per worker: the next one is ready when a worker finishes
RESTARTS = 4  # times Ray restarts a dead worker (and reruns its in-flight shards) before the run fails
CLOSE_TIMEOUT_S = 30.0  # how long the driver waits for workers to give back their stages before ending them


@dataclass
class WorkerSpec:
    """How a worker opens its stages and what Ray reserves for it."""

    engines_dir: str
    backend: str
    precision: str
    cpus: float
    gpus: float
    threads: int  # stage threads (0: the backend's default)


class ShardWorker:
    """One set of stages in one Ray actor process; `generate(shard)` returns the shard's PNG bytes. The stages are
    held for the worker's life and given back by `close()` (the driver's `stop_workers`)."""

    def __init__(self, rank: int, spec: WorkerSpec, plan: BulkPlan):
        from d2c_export.backends import open_named
        from d2c_export.engines import Engines
        from reference.pipeline import SamplingParams
        self.rank, self.plan = rank, plan
        self.params = SamplingParams(**plan.sampling)
        self.held = ExitStack()
        self.stages = self.held.enter_context(open_named(Engines.open(spec.engines_dir), spec.backend,
                                                         spec.precision, spec.threads))

    def close(self) -> None:
        """Give back the stages (sessions, engines, device memory)."""
        self.held.close()

    def generate(self, shard: Shard) -> dict:
        from d2c_export.generate import generate_images
        from d2c_export.images import png_bytes, to_uint8
        start = time.perf_counter()
        labels = self.plan.labels[shard.start:shard.stop]
        result, _ = generate_images(self.stages, labels, self.params, self.plan.seeds(shard))
        pngs = [png_bytes(pixels) for pixels in to_uint8(result.images)]
        return {"pngs": pngs, "seconds": time.perf_counter() - start, "rank": self.rank, "pid": os.getpid(),
                "host": socket.gethostname(), "backend": self.stages.description}


@dataclass
class WorkerStats:
    rank: int
    images: int = 0
    busy_s: float = 0.0
    pids: set = field(default_factory=set)
    hosts: set = field(default_factory=set)
    backend: str = ""

    def add(self, result: dict, images: int) -> None:
        self.images += images
        self.busy_s += result["seconds"]
        self.pids.add(result["pid"])
        self.hosts.add(result["host"])
        self.backend = result["backend"]

    def as_dict(self) -> dict:
        return {"worker": self.rank, "images": self.images, "busy_s": round(self.busy_s, 3),
                "images_per_s": round(self.images / self.busy_s, 3) if self.busy_s else None,
                "processes": len(self.pids), "hosts": sorted(self.hosts), "backend": self.backend}


def start_workers(count: int, spec: WorkerSpec, plan: BulkPlan) -> list:
    import ray
    actor = ray.remote(ShardWorker).options(num_cpus=spec.cpus, num_gpus=spec.gpus, max_restarts=RESTARTS,
                                            max_task_retries=RESTARTS)
    return [actor.remote(rank, spec, plan) for rank in range(count)]


def run_shards(workers: list, shards: list[Shard], on_result: Callable[[Shard, dict], None]) -> list[WorkerStats]:
    """Generate `shards` on `workers` (two in flight each), calling `on_result(shard, result)` in the driver as
    each comes back; a shard whose worker died more than `RESTARTS` times fails the run with one line."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from d2c_export.bulk.shards import BulkError
    todo = deque(shards)
    stats = [WorkerStats(rank) for rank in range(len(workers))]
    in_flight: dict = {}

    def submit(rank: int) -> None:
        if todo:
            shard = todo.popleft()
            in_flight[workers[rank].generate.remote(shard)] = (rank, shard)

    for rank in range(len(workers)):
        for _ in range(IN_FLIGHT):
            submit(rank)
    while in_flight:
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        rank, shard = in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise BulkError(f"worker {rank} failed on shard {shard.number} (images {shard.start}..{shard.stop - 1}): "
                            f"{cause}") from None
        except RayActorError as exc:
            raise BulkError(f"worker {rank} died more than {RESTARTS} times (last on shard {shard.number}: "
                            f"{str(exc).splitlines()[0]}); rerun the same command to resume") from None
        on_result(shard, result)
        stats[rank].add(result, len(shard.indices))
        submit(rank)
    return stats


def stop_workers(workers: list, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Close every worker's stages (waiting at most `timeout_s` for them), then end the actors."""
    import ray
    if workers:
        ray.wait([w.close.remote() for w in workers], num_returns=len(workers), timeout=timeout_s)
    for w in workers:
        ray.kill(w, no_restart=True)
