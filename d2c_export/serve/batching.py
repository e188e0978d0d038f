"""Merging requests into generations: jobs whose batch-wide settings agree run as one `generate_images` call.

Ray Serve's `@serve.batch` collects the jobs that reach a replica within the batch wait, up to the max batch
counted in images (`batch_images`); `run_batch` then groups them by their settings (`settings_key`: steps,
schedule, cfg, temperatures, top-k/top-p), and each group is one generation over the concatenated labels
with every image's own seed, so an image does not depend on what it was merged with. Groups of one batch
run one after another, in order of arrival.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from d2c_export.errors import UserError
from d2c_export.generate import generate_images
from d2c_export.images import to_uint8
from reference.pipeline import SamplingParams


@dataclass(frozen=True)
class Job:
    """One request as the generator sees it: a label and a seed per image, and the full sampling settings."""

    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    params: SamplingParams
    arrived: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class JobResult:
    """A job's images ((n, H, W, 3) uint8), tokens and what it was merged into; or the error that is the user's."""

    images: np.ndarray | None = None
    tokens: list[list[int]] | None = None
    batch_size: int = 0
    batch_requests: int = 0
    queue_s: float = 0.0
    generation_s: float = 0.0
    stages_s: dict[str, float] = field(default_factory=dict)
    error: UserError | None = None
    replica: str = ""


def settings_key(params: SamplingParams) -> tuple:
    """What must agree for jobs to share a generation: every batch-wide setting."""
    return tuple(sorted(params.as_dict().items()))


def batch_images(jobs: list[Job]) -> int:
    """A batch's size as the exported profile counts it: images, not requests (`serve.batch`'s batch_size_fn)."""
    return sum(len(j) for j in jobs)


def group_by_settings(jobs: list[Job]) -> list[list[int]]:
    """Indices of `jobs` grouped by settings, groups in order of their first job, jobs in arrival order."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(settings_key(job.params), []).append(i)
    return list(groups.values())


def run_group(stages, jobs: list[Job]) -> list[JobResult]:
    """One generation for jobs of equal settings: their labels concatenated, each image with its own seed."""
    labels = [c for j in jobs for c in j.labels]
    seeds = [s for j in jobs for s in j.seeds]
    start = time.monotonic()
    result, timer = generate_images(stages, labels, jobs[0].params, seeds)
    seconds = time.monotonic() - start
    images = to_uint8(result.images)
    tokens = None if result.discrete_ids is None else result.discrete_ids.tolist()
    out, offset = [], 0
    for job in jobs:
        part = slice(offset, offset + len(job))
        out.append(JobResult(images=images[part], tokens=None if tokens is None else tokens[part],
                             batch_size=len(labels), batch_requests=len(jobs), queue_s=start - job.arrived,
                             generation_s=seconds, stages_s=dict(timer.seconds)))
        offset += len(job)
    return out


def run_batch(stages, jobs: list[Job]) -> list[JobResult]:
    """Every job of a batch, one generation per settings group; a group refused for its input (a `UserError`) answers
    its jobs with the error and the others still run. Any other exception is a bug and fails the batch."""
    results: list[JobResult | None] = [None] * len(jobs)
    for group in group_by_settings(jobs):
        try:
            done = run_group(stages, [jobs[i] for i in group])
        except UserError as exc:
            done = [JobResult(error=exc)] * len(group)
        for i, result in zip(group, done):
            results[i] = result
    return results
