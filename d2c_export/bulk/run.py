"""One bulk run: claim the output directory, generate the shards not yet finished on Ray workers, pack `DIR.npz`.

The driver holds the directory's lock for the whole run, writes every file (workers only compute) and records each
shard after its PNGs, so rerunning the same command after a crash of the driver resumes where it stopped, and a
second command into the same directory at the same time is refused.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from d2c_export.bulk.pack import pack_npz
from d2c_export.bulk.shards import MAX_IMAGES, BulkPlan, Shard, ShardStore
from d2c_export.bulk.workers import WorkerSpec, check_placement, run_shards, start_workers, stop_workers
from d2c_export.engines import Engines
from d2c_export.manifest import MANIFEST
from reference.files import (check_apart_from_inputs, check_output_dir, check_output_file, directory_lock,
                             output_directory, sha256_file, write_json_atomic)
from reference.pipeline import SamplingParams
from reference.errors import Setting
from reference.settings import check_request

log = logging.getLogger("d2c")
COMMAND = "d2c-generate"


def make_plan(engines: Engines, params: SamplingParams, backend: str, precision: str, classes: list[int] | None,
              per_class: int | None, num_images: int | None, seed: int, batch: int | None) -> BulkPlan:
    """The run's plan, checked against the model: classes in range, images split evenly, a batch it can run."""
    from d2c_export.bulk.shards import BulkError
    classes = list(range(engines.config.num_classes)) if not classes else list(classes)
    if len(set(classes)) != len(classes):
        raise BulkError("a class is named twice", setting="classes")
    count = num_images if num_images is not None else len(classes) * (per_class or 50)
    if count > MAX_IMAGES:
        raise BulkError(f"{count} images exceed the {MAX_IMAGES} of one run; generate fewer (",
                        Setting("per_class"), ", ", Setting("num_images"), "), or several runs into several "
                        "directories")
    if num_images is not None:
        if num_images % len(classes):
            raise BulkError(f"{num_images} is not a multiple of the {len(classes)} classes (every class gets the "
                            "same number of images); use --per-class", setting="num_images")
        per_class = num_images // len(classes)
    plan = BulkPlan(engines_sha256=sha256_file(engines.directory / MANIFEST), model=engines.config.name,
                    backend=backend, precision=precision, sampling=params.as_dict(), classes=classes,
                    per_class=per_class or 50, seed=seed, batch=batch or engines.max_batch)
    check_request(engines.config, plan.labels, batch=plan.batch, max_batch=engines.max_batch, seed=seed,
                  params=params, too_many=lambda n: "use a smaller --batch or re-export with "
                  f"`{engines.rebuild_command('onnx-fp32', max_batch=n)}`", other_classes=engines.other_classes())
    return plan


@dataclass
class ClusterRequest:
    address: str | None = None  # an existing Ray cluster; None: a local instance
    num_cpus: int | None = None  # CPUs of the local instance (default: all)
    workers: int | None = None  # default: one per GPU on a GPU cluster, else 1
    worker_cpus: float | None = None  # default: 1 with GPUs, else the cluster's CPUs shared by the workers


def worker_spec(engines: Engines, plan: BulkPlan, request: ClusterRequest, shards: int) -> tuple[int, WorkerSpec]:
    """Join the cluster and size the workers (at most one per shard); refused when the cluster cannot place them."""
    import ray

    from d2c_export import ray_cluster
    ray_cluster.connect(request.address, request.num_cpus)
    gpus = ray_cluster.cluster_gpus()
    count = min(request.workers or (int(gpus) if gpus >= 1 else 1), shards)
    cpus = request.worker_cpus or (1.0 if gpus >= 1 else max(1.0, float(ray.cluster_resources().get("CPU", 1)) // count))
    threads = 0 if gpus >= 1 else max(1, int(cpus))
    spec = WorkerSpec(str(engines.directory), plan.backend, plan.precision, cpus, 1.0 if gpus >= 1 else 0.0, threads)
    check_placement(count, spec)
    return count, spec


def generate_bulk(engines: Engines, plan: BulkPlan, out: Path, request: ClusterRequest, progress: bool = False,
                  on_result: Callable[[Shard, dict], None] | None = None) -> dict:
    """Complete the run of `plan` in `out` (resuming what is there); returns its samples.json record."""
    store = ShardStore(out)
    check_output_dir(out, flag="--out")
    check_output_file(store.npz, "--out")
    check_apart_from_inputs({"--out": [store.npz, store.samples_json]}, engines.input_files())
    store.check_claim(plan, COMMAND)  # another run's or foreign files: refused before anything is made
    unfinished = [s for s in plan.shards() if not store.finished(s)]  # the cluster joined and the workers sized,
    workers = worker_spec(engines, plan, request, len(unfinished)) if unfinished else None  # before anything is made
    with output_directory(out), directory_lock(out, COMMAND):
        store.remove_leftovers()
        record = store.claim(plan, COMMAND)
        shards = plan.shards()
        todo = [s for s in shards if not store.finished(s)]
        done = plan.num_images - sum(len(s.indices) for s in todo)
        log.info("%s: %d images in %d shards, %d finished, %d to generate", out, plan.num_images, len(shards),
                 len(shards) - len(todo), plan.num_images - done)
        if todo:
            count, spec = workers or worker_spec(engines, plan, request, len(todo))
            record["runs"].append(_generate(plan, store, todo, done, min(count, len(todo)), spec, progress,
                                            on_result))
        packed = store.npz.is_file() and sha256_file(store.npz) == record.get("npz_sha256")
        if todo or not packed or not record["complete"]:
            if not todo and record["complete"]:
                log.warning("%s is missing or does not match its recorded sha256; packing it again", store.npz)
            log.info("packing %s ...", store.npz)
            record["npz_sha256"] = pack_npz(store, plan)
            record["complete"] = True
            write_json_atomic(store.samples_json, record)
    log.info("wrote %d images to %s, %s and %s", plan.num_images, out, store.npz, store.samples_json)
    return record


def _generate(plan: BulkPlan, store: ShardStore, todo: list[Shard], done: int, count: int, spec: WorkerSpec,
              progress: bool, on_result) -> dict:
    from tqdm import tqdm
    log.info("starting %d worker%s (%g CPU, %g GPU each, backend %s)", count, "s" * (count > 1), spec.cpus,
             spec.gpus, plan.backend)
    started = time.perf_counter()
    workers = start_workers(count, spec, plan)
    bar = tqdm(total=plan.num_images, initial=done, unit="img", desc="d2c-generate", disable=not progress,
               smoothing=0.1)
    first: list = []  # (time, images) when the first shard came back: the rate after start-up

    def finished(shard: Shard, result: dict) -> None:
        first or first.append((time.perf_counter(), len(shard.indices)))
        store.write_shard(shard, result.pop("pngs"), {k: result[k] for k in ("rank", "pid", "host", "seconds")})
        bar.update(len(shard.indices))
        if on_result is not None:
            on_result(shard, result)

    try:
        stats = run_shards(workers.actors, todo, finished)
        ended = time.perf_counter()
    finally:
        bar.close()
        stop_workers(workers)
    wall = ended - started
    images = plan.num_images - done
    after = ended - first[0][0]
    steady = (images - first[0][1]) / after if after > 0 and images > first[0][1] else None
    summary = {"workers": count, "worker_cpus": spec.cpus, "worker_gpus": spec.gpus, "images": images,
               "wall_s": round(wall, 3), "images_per_s": round(images / wall, 3),
               "images_per_s_after_first_shard": None if steady is None else round(steady, 3),
               "per_worker": [s.as_dict() for s in stats]}
    log.info("%d images in %.1f s (%.2f images/s with start-up); per worker: %s", images, wall, images / wall,
             ", ".join(f"{s.rank}: {s.as_dict()['images_per_s']} images/s" for s in stats))
    return summary
