"""The Ray Serve application: a FastAPI ingress and the generator replicas, each holding one set of stages.

A request is parsed and checked at the ingress (`api.resolve`), then handed to a generator replica through
a deployment handle. The replica batches what arrives (`@serve.batch`, up to the max batch in images, for at
most the batch wait) and runs the merged groups one generation each (`batching.run_batch`) on one worker
thread, the sampling loop in-process. Back-pressure: a replica takes `2 x max batch` requests at a time
and the ingress queues at most `max_queue` more for the generators; beyond that it answers 503 with
Retry-After at once. A replica that dies under a request answers it 503; Ray Serve starts a new one.
"""
# no `from __future__ import annotations`: FastAPI reads the route annotations of the pickled ingress class
import asyncio
import base64
import io
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable, BadInput, Setting, UserError, one_line
from d2c_export.manifest import MANIFEST
from d2c_export.serve.api import (MAX_BODY_BYTES, ApiError, ErrorBody, Health, ImageOut, ImageRequest,
                                  ImagesResponse, ModelInfo, Timings, authorized, error_answer, resolve,
                                  validation_message)
from d2c_export.serve.batching import Job, JobResult, batch_images, run_batch
from reference.files import sha256_file

log = logging.getLogger("d2c")
APP_NAME = "d2c"
GENERATOR = "Generator"
INGRESS = "Ingress"


INGRESS_HEADROOM = 8  # the ingress admits this many times what the generators hold and queue (plus 64)


@dataclass
class ServeOptions:
    """How to serve: the engines, the target, the replicas and the batching and back-pressure limits."""

    engines_dir: str
    backend: str = "auto"
    precision: str = "fp32"
    replicas: int = 1
    max_batch: int = 0  # 0: the exported max batch
    batch_wait_s: float = 0.02
    max_queue: int = 64  # requests the ingress queues for the generators beyond what they hold
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    threads: int = 0  # stage threads per replica (0: its reserved CPUs, at least 1)
    timeout_s: float = 120.0  # a request not answered by then gets 504
    retry_after_s: int = 1
    token_sha256: str | None = None
    extra: dict = field(default_factory=dict)


def _png(images) -> bytes:
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


@serve.deployment(name=GENERATOR)
class Generator:
    """One set of stages on one backend; batches the jobs that reach it and runs them on one worker thread."""

    def __init__(self, options: ServeOptions):
        import torch

        from d2c_export.backends import open_named
        engines = Engines.open(options.engines_dir)
        threads = options.threads or max(1, math.floor(options.replica_cpus))
        torch.set_num_threads(threads)
        self.held = ExitStack()  # the stages, given back when Ray Serve shuts the replica down (`__del__`)
        self.stages = self.held.enter_context(open_named(engines, options.backend, options.precision, threads))
        self.max_batch = options.max_batch or engines.max_batch
        self.generate_batch.set_max_batch_size(self.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(options.batch_wait_s)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2c-generate")
        self._idle: asyncio.Event | None = None
        self.replica = serve.get_replica_context().replica_id.unique_id
        target = self.stages.target
        self.info = ModelInfo(config_name=engines.config.name, config=engines.manifest.config,
                              classes=engines.config.num_classes, image_size=engines.config.image_size,
                              max_batch=self.max_batch, exported_max_batch=engines.max_batch,
                              backend=self.stages.description, precision=target.precision.value,
                              sampling=engines.sampling.as_dict(),
                              manifest_sha256=sha256_file(engines.directory / MANIFEST))
        log.info("replica %s: %s, max batch %d", self.replica, self.stages.description, self.max_batch)

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:  # made on the replica's event loop
            self._idle = asyncio.Event()
            self._idle.set()
        return self._idle

    async def generate(self, job: Job) -> JobResult:
        # Ray's batch loop forms the next batch as soon as the previous one starts; held here while a generation
        # runs, the jobs that arrive meanwhile reach the batch queue together when it ends, and merge.
        await self._idle_event().wait()
        result = await self.generate_batch(job)
        result.replica = self.replica
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=batch_images)
    async def generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        idle = self._idle_event()
        idle.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, run_batch, self.stages, jobs)
        finally:
            idle.set()

    def describe(self) -> ModelInfo:
        return self.info

    def __del__(self):  # Ray Serve's graceful shutdown of the replica
        if hasattr(self, "held"):
            self.held.close()

    def health(self) -> Health:
        import ray
        return Health(status="ok", replica=self.replica, actor=ray.get_runtime_context().get_actor_name())


app = FastAPI(title="D2C image generation", version="1",
              description="Class-conditional images from exported D2C engines. Every image has its own seed "
                          "(image i of seed S draws from S + i), so it is the same alone, batched or from d2c-run.")
ERRORS = {s: {"model": ErrorBody} for s in (401, 413, 422, 500, 503, 504)}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


@app.exception_handler(UserError)
async def _user_error(request: Request, exc: UserError):
    status, message, headers = error_answer(exc)
    return _error(status, message, headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return _error(400, "the body is not valid JSON")
    return _error(422, validation_message(errors))


@app.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    """A bug: its traceback goes to the server log under an id, and the client gets the id."""
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error {incident} (its traceback is in the server log)")


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: by Content-Length, or by counting a body sent without one."""

    def __init__(self, asgi, limit: int = MAX_BODY_BYTES):
        self.asgi, self.limit = asgi, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = _error(413, f"the body is over {self.limit} bytes")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await too_big(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"the body is over {self.limit} bytes")
            return message

        return await self.asgi(scope, counted, send)


app.add_middleware(BodyLimit)


def _authorize(request: Request) -> None:
    if not authorized(request.headers.get("authorization"), request.app.state.token_sha256):
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                       {"WWW-Authenticate": "Bearer"})


async def _awaited(response):
    return await response


@serve.deployment(name=INGRESS)
@serve.ingress(app)
class Ingress:
    """The HTTP API: checks requests against the model and hands them to the generator replicas."""

    def __init__(self, generator, options: ServeOptions):
        self.generator = generator
        self.options = options
        self.engines = Engines.open(options.engines_dir)
        self.max_batch = options.max_batch or self.engines.max_batch
        self.info: ModelInfo | None = None
        app.state.token_sha256 = options.token_sha256

    async def _call(self, method: str, *args):
        """A generator call, bounded in time; failures of the generators become 503 / 504 `ApiError`s."""
        retry = {"Retry-After": str(self.options.retry_after_s)}
        response = getattr(self.generator, method).remote(*args)
        try:
            return await asyncio.wait_for(_awaited(response), self.options.timeout_s)
        except BackPressureError:
            raise ApiError(503, "the generators' queue is full; retry later", retry) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, f"no answer within {self.options.timeout_s:g} s") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            raise ApiError(503, f"the replica failed during the request ({type(exc).__name__}); retry",
                           retry) from None

    async def _model(self) -> ModelInfo:
        if self.info is None:
            self.info = await self._call("describe")
        return self.info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse(resources.files("d2c_export.serve").joinpath("page.html").read_text())

    @app.get("/v1/health", response_model=Health, responses=ERRORS)
    async def health(self):
        return await self._call("health")

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS, dependencies=[Depends(_authorize)])
    async def model(self):
        return await self._model()

    @app.post("/v1/images", response_model=ImagesResponse, dependencies=[Depends(_authorize)],
              responses={**ERRORS, 200: {"content": {"image/png": {}}, "description": "JSON, or one PNG (a grid "
                                         "for several images) with format png"}})
    async def images(self, body: ImageRequest):
        start = time.monotonic()
        job = resolve(body, self.engines, self.max_batch)
        info = await self._model()
        result: JobResult = await self._call("generate", job)
        if result.error is not None:
            raise result.error
        seeds = ",".join(str(s) for s in job.seeds)
        common = {"X-Seeds": seeds, "X-Backend": info.backend, "X-Manifest-Sha256": info.manifest_sha256,
                  "X-Batch-Size": str(result.batch_size)}
        if body.format == "png":
            return Response(_png(result.images), media_type="image/png", headers=common)
        images = [ImageOut(class_label=c, seed=s, tokens=None if result.tokens is None else result.tokens[i],
                           png_base64=base64.b64encode(_png(result.images[i:i + 1])).decode())
                  for i, (c, s) in enumerate(zip(job.labels, job.seeds))]
        return ImagesResponse(images=images, settings=job.params.as_dict(), backend=info.backend,
                              precision=info.precision, manifest_sha256=info.manifest_sha256,
                              batch_size=result.batch_size, batch_requests=result.batch_requests,
                              replica=result.replica,
                              timings=Timings(queue_s=result.queue_s, generation_s=result.generation_s,
                                              total_s=time.monotonic() - start, stages_s=result.stages_s))


def check_options(options: ServeOptions) -> ServeOptions:
    """Refuse, before anything starts, what the replicas could not run: missing engines, a max batch above the
    exported profile, a target whose files are not there (`auto`: no candidate's). Fills in the max batch. Whether
    the replicas' machines have what a backend needs (TensorRT, a GPU) is theirs to say when they open it."""
    from d2c_export.backends import AUTO, Precision, Target, auto_candidates, unbuilt
    engines = Engines.open(options.engines_dir)
    max_batch = options.max_batch or engines.max_batch
    if max_batch > engines.max_batch:
        raise BadInput(Setting("max_batch", max_batch), " exceeds the exported profile (max batch "
                       f"{engines.max_batch}); re-export with "
                       f"`{engines.rebuild_command('onnx-fp32', max_batch=max_batch)}`")
    targets = auto_candidates(Precision(options.precision)) if options.backend == AUTO else \
        [Target.of(options.backend, options.precision)]
    reasons = [unbuilt(engines, t) for t in targets]
    if all(reasons):
        raise BackendUnavailable(reasons[-1])
    options.max_batch = max_batch
    return options


def build_app(options: ServeOptions):
    """The application graph: the ingress bound to `options.replicas` generator replicas."""
    max_batch = check_options(options).max_batch
    generator = Generator.options(
        num_replicas=options.replicas, max_ongoing_requests=2 * max_batch, max_queued_requests=options.max_queue,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
    ).bind(options)
    # The ingress only awaits the generators, and answers what they refuse at once (503 JSON, Retry-After): its
    # own limit, past which Ray Serve would drop requests with a plain-text 503, stays far above theirs.
    ingress_limit = INGRESS_HEADROOM * (options.max_queue + options.replicas * 2 * max_batch) + 64
    return Ingress.options(num_replicas=1, max_ongoing_requests=ingress_limit, max_queued_requests=ingress_limit,
                           ray_actor_options={"num_cpus": 0}).bind(generator, options)
