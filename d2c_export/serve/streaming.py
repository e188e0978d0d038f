"""A request's images across several generations, its answer, and the streaming form of POST /v1/images.

A request for more images than the max batch is split into parts of at most the max batch (`split_job`), which
run one after another, each merged with whatever else reaches the replica meanwhile; their results are joined
in order (`joined`). Every image keeps its own seed, so the split changes no image. At most `MAX_PARTS` parts.

Streaming: a request with `Accept: application/x-ndjson` gets newline-delimited JSON, one object a line
(`progress_line`, `images_line`, `error_line`): `{"event": "progress", ...}` as the generation advances, then
`{"event": "images", ...}` with the JSON answer, or `{"event": "error", "status": ..., "error": ...}`.
"""
from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import replace

import numpy as np
from fastapi.responses import Response

from d2c_export.serve.api import ApiError, ImageOut, ImageRequest, ImagesResponse, ModelInfo, Timings
from d2c_export.serve.batching import Job, JobResult
from d2c_export.serve.progress import Progress

MAX_PARTS = 16  # a request may ask for up to this many times the max batch; more is refused (422)
NDJSON = "application/x-ndjson"


def wants_stream(accept: str | None) -> bool:
    """Whether the Accept header asks for the streaming form (newline-delimited JSON)."""
    return NDJSON in (accept or "").lower()


def split_job(job: Job, max_batch: int) -> list[Job]:
    """The job as parts of at most `max_batch` images, in order, each image with its own label and seed."""
    return [replace(job, labels=job.labels[i:i + max_batch], seeds=job.seeds[i:i + max_batch], key=f"{job.key}.{n}")
            for n, i in enumerate(range(0, len(job), max_batch))]


def joined(results: list[JobResult]) -> JobResult:
    """The parts' results as one: images and tokens in order; the first error (or cancellation); the largest
    generation; the time of all the generations and the wait for the first."""
    failed = next((r for r in results if r.error is not None or r.cancelled), None)
    if failed is not None or len(results) == 1:
        return failed or results[0]
    tokens = None if results[0].tokens is None else [t for r in results for t in r.tokens]
    stages: dict[str, float] = {}
    for r in results:
        for name, seconds in r.stages_s.items():
            stages[name] = stages.get(name, 0.0) + seconds
    return JobResult(images=np.concatenate([r.images for r in results]), tokens=tokens,
                     batch_size=max(r.batch_size for r in results),
                     batch_requests=max(r.batch_requests for r in results),
                     queue_s=results[0].queue_s, generation_s=sum(r.generation_s for r in results), stages_s=stages,
                     replica=",".join(dict.fromkeys(r.replica for r in results)))


def _line(event: str, body: dict) -> bytes:
    return (json.dumps({"event": event, **body}) + "\n").encode()


def progress_line(progress: Progress, part: int, parts: int) -> bytes:
    """A progress event of part `part` (0-based) of `parts`; its fraction is of the whole request."""
    return _line("progress", {**progress.as_dict(), "part": part + 1, "parts": parts,
                              "fraction": round((part + progress.fraction) / parts, 4)})


def images_line(answer: dict) -> bytes:
    """The last event: the JSON answer of the non-streaming form."""
    return _line("images", answer)


def error_line(status: int, message: str) -> bytes:
    """The last event of a request that failed: the status and the one-line error the plain form would answer."""
    return _line("error", {"status": status, "error": message})


def png_of(images) -> bytes:
    """One PNG: the image, or the grid of several ((n, H, W, 3) uint8)."""
    from PIL import Image

    from d2c_export.images import grid
    import torch
    buf = io.BytesIO()
    if len(images) == 1:
        Image.fromarray(images[0]).save(buf, format="PNG")
    else:  # the grid of images.grid, from uint8 back to its [-1, 1] input
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        Image.fromarray(grid(tensor)).save(buf, format="PNG")
    return buf.getvalue()


def plain_answer(body: ImageRequest, job: Job, result: JobResult, info: ModelInfo, start: float):
    """The answer of the plain form: one PNG (a grid for several images) with format png, else the JSON answer; an
    `ApiError` for a result that failed."""
    if result.cancelled:  # the client left; no one reads this (nginx's status for it)
        raise ApiError(499, "the request was cancelled")
    if result.error is not None:
        raise result.error
    seeds = ",".join(str(s) for s in job.seeds)
    common = {"X-Seeds": seeds, "X-Backend": info.backend, "X-Manifest-Sha256": info.manifest_sha256,
              "X-Batch-Size": str(result.batch_size)}
    if body.format == "png":
        return Response(png_of(result.images), media_type="image/png", headers=common)
    images = [ImageOut(class_label=c, seed=s, tokens=None if result.tokens is None else result.tokens[i],
                       png_base64=base64.b64encode(png_of(result.images[i:i + 1])).decode())
              for i, (c, s) in enumerate(zip(job.labels, job.seeds))]
    return ImagesResponse(images=images, settings=job.params.as_dict(), backend=info.backend,
                          precision=info.precision, manifest_sha256=info.manifest_sha256,
                          batch_size=result.batch_size, batch_requests=result.batch_requests,
                          replica=result.replica,
                          timings=Timings(queue_s=result.queue_s, generation_s=result.generation_s,
                                          total_s=time.monotonic() - start, stages_s=result.stages_s))
