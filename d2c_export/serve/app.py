"""The Ray Serve application: a FastAPI ingress and the generator replicas, each holding one set of stages.

Before the application sees a request, `guard.RequestGuard` checks the bearer token from its headers and reads
its body under a deadline, a size limit and a cap on the bodies read at once, so that slow or unauthenticated
clients hold no slot that serving needs. A request is then parsed and checked at the ingress (`api.resolve`), and
handed to a generator replica through a deployment handle. The replica batches what arrives (`@serve.batch`, up
to the max batch in images, for at most the batch wait) and runs the merged groups one generation each
(`batching.run_batch`) on one worker thread, the sampling loop in-process. Back-pressure: a replica takes
`2 x max batch` requests at a time and the ingress queues at most `max_queue` more for the generators; beyond that
it answers 503 with Retry-After at once. A replica that dies under a request answers it 503; Ray Serve starts a new one.
"""
# no `from __future__ import annotations`: FastAPI reads the route annotations of the pickled ingress class
import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable, BadInput, Setting, UserError, one_line
from d2c_export.manifest import MANIFEST
from d2c_export.serve.api import (ApiError, ErrorBody, Health, ImageRequest, ImagesResponse, ModelInfo,
                                  error_answer, resolve, validation_message)
from d2c_export.serve.batching import Job, JobResult, batch_images, run_batch
from d2c_export.serve.guard import BODY_TIMEOUT_S, GuardLimits, RequestGuard
from d2c_export.serve.progress import Progress
from d2c_export.serve.streaming import (MAX_PARTS, NDJSON, error_line, images_line, joined,
                                        plain_answer, progress_line, split_job, wants_stream)
from reference.files import sha256_file

log = logging.getLogger("d2c")
APP_NAME = "d2c"
GENERATOR = "Generator"
INGRESS = "Ingress"


PROGRESS_POLL_S = 0.1  # how often a streaming request's replica looks at its progress
INGRESS_HEADROOM = 8  # the ingress admits this many times what the generators hold and queue (plus 64)
BODY_READERS = 4  # ... of which at most this many times what the generators hold and queue may be reading bodies


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
    body_timeout_s: float = BODY_TIMEOUT_S  # a body not read whole by then gets 408
    retry_after_s: int = 1
    token_sha256: str | None = None
    extra: dict = field(default_factory=dict)


def generator_capacity(options: ServeOptions, max_batch: int) -> int:
    """The requests the generators hold and queue together; past that they refuse at once (503)."""
    return options.max_queue + options.replicas * 2 * max_batch


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
        self.running: set[str] = set()  # the keys of the jobs whose batch runs now
        self.cancelled: set[str] = set()  # ... of those, the jobs whose client left (read by the worker thread)
        self.progress: dict[str, Progress] = {}  # the latest progress of each running job (written by the worker)
        self.dropped = 0  # jobs whose work was dropped because their client left
        self.replica = serve.get_replica_context().replica_id.unique_id
        target = self.stages.target
        self.info = ModelInfo(config_name=engines.config.name, config=engines.manifest.config,
                              classes=engines.config.num_classes, image_size=engines.config.image_size,
                              class_names=engines.class_names,
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
        try:
            await self._idle_event().wait()
            result = await self.generate_batch(job)
        except asyncio.CancelledError:  # the client left: a waiting job leaves its batch, a running one is marked
            if job.key in self.running:
                self.cancelled.add(job.key)
            raise
        finally:
            self.progress.pop(job.key, None)
        result.replica = self.replica
        return result

    async def generate_stream(self, job: Job):
        """`generate`, yielding the generation's `Progress` as it changes (polled), then the `JobResult`."""
        task = asyncio.ensure_future(self.generate(job))
        said = None
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=PROGRESS_POLL_S)
                now = self.progress.get(job.key)
                if now is not None and now != said and not task.done():
                    said = now
                    yield now
            yield task.result()
        finally:
            task.cancel()

    def _report(self, job: Job, progress: Progress) -> None:  # on the worker thread; one dict write
        self.progress[job.key] = progress

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, batch_size_fn=batch_images)
    async def generate_batch(self, jobs: list[Job]) -> list[JobResult]:
        idle = self._idle_event()
        idle.clear()
        keys = {job.key for job in jobs}
        self.running |= keys
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.worker, run_batch, self.stages, jobs, lambda job: job.key in self.cancelled, self._report)
            self.dropped += sum(r.cancelled for r in results)
            return results
        finally:
            self.running -= keys
            self.cancelled -= keys
            for key in keys:
                self.progress.pop(key, None)
            idle.set()

    def describe(self) -> ModelInfo:
        return self.info

    def __del__(self):  # Ray Serve's graceful shutdown of the replica
        if hasattr(self, "held"):
            self.held.close()

    def health(self) -> Health:
        import ray
        return Health(status="ok", replica=self.replica, actor=ray.get_runtime_context().get_actor_name(),
                      running_jobs=len(self.running), dropped_jobs=self.dropped)


app = FastAPI(title="D2C image generation", version="1",
              description="Class-conditional images from exported D2C engines. Every image has its own seed "
                          "(image i of seed S draws from S + i), so it is the same alone, batched or from d2c-run.")
ERRORS = {s: {"model": ErrorBody} for s in (401, 408, 413, 422, 500, 503, 504)}


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


app.add_middleware(RequestGuard)


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
        self.health_probe: asyncio.Future | None = None
        app.state.guard = GuardLimits(options.token_sha256, body_timeout_s=options.body_timeout_s,
                                      body_readers=BODY_READERS * generator_capacity(options, self.max_batch),
                                      retry_after_s=options.retry_after_s)

    @contextmanager
    def _failures(self):
        """The generators' failures as 503 / 504 `ApiError`s."""
        retry = {"Retry-After": str(self.options.retry_after_s)}
        try:
            yield
        except BackPressureError:
            raise ApiError(503, "the generators' queue is full; retry later", retry) from None
        except asyncio.TimeoutError:
            raise ApiError(504, f"no answer within {self.options.timeout_s:g} s") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            raise ApiError(503, f"the replica failed during the request ({type(exc).__name__}); retry",
                           retry) from None

    async def _call(self, method: str, *args):
        """A generator call, bounded in time, cancelled when the client leaves."""
        response = getattr(self.generator, method).remote(*args)
        with self._failures():
            try:
                return await asyncio.wait_for(_awaited(response), self.options.timeout_s)
            except (asyncio.TimeoutError, asyncio.CancelledError):  # the client left: the generator's call ends too
                response.cancel()
                raise

    async def _streamed(self, job: Job):
        """The generator's `generate_stream` of one job: its progress, then its result; bounded in time."""
        response = self.generator.options(stream=True).generate_stream.remote(job)
        deadline = time.monotonic() + self.options.timeout_s
        with self._failures():
            try:
                while True:
                    try:
                        yield await asyncio.wait_for(response.__anext__(), max(0.0, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        return
            except (asyncio.TimeoutError, asyncio.CancelledError, GeneratorExit):  # the client left: so does the call
                response.cancel()
                raise

    async def _model(self) -> ModelInfo:
        if self.info is None:
            self.info = await self._call("describe")
        return self.info

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self):
        return HTMLResponse(resources.files("d2c_export.serve").joinpath("page.html").read_text())

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon(self):
        return Response(resources.files("d2c_export.serve").joinpath("favicon.svg").read_bytes(),
                        media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.get("/v1/health", response_model=Health, responses=ERRORS)
    async def health(self):
        # one probe of a generator at a time, shared by every health request that arrives meanwhile: a flood of
        # health requests takes one of the generators' slots, not one each
        if self.health_probe is None or self.health_probe.done():
            self.health_probe = asyncio.ensure_future(self._call("health"))
        return await asyncio.shield(self.health_probe)

    @app.get("/v1/model", response_model=ModelInfo, responses=ERRORS)
    async def model(self):
        return await self._model()

    @app.post("/v1/images", response_model=ImagesResponse,
              responses={**ERRORS, 200: {"content": {"image/png": {}, NDJSON: {}},
                                         "description": "JSON; or one PNG (a grid for several images) with format "
                                                        "png; or, with `Accept: application/x-ndjson`, progress "
                                                        "events, one JSON object a line, ending with the JSON answer"}})
    async def images(self, body: ImageRequest, request: Request):
        start = time.monotonic()
        job = resolve(body, self.engines, self.max_batch * MAX_PARTS)
        info = await self._model()
        parts = split_job(job, self.max_batch)
        if wants_stream(request.headers.get("accept")):
            if body.format == "png":
                raise ApiError(422, f"format: png does not stream; ask for json with Accept: {NDJSON}, or for png "
                                    "without it")
            return StreamingResponse(self._stream(body, job, parts, info, start), media_type=NDJSON)
        results = [await self._call("generate", part) for part in parts]
        return plain_answer(body, job, joined(results), info, start)

    async def _stream(self, body: ImageRequest, job: Job, parts: list[Job], info: ModelInfo, start: float):
        """The streaming answer: each part's progress as it runs, then the JSON answer (or the error)."""
        results = []
        try:
            for n, part in enumerate(parts):
                async for item in self._streamed(part):
                    if isinstance(item, Progress):
                        yield progress_line(item, n, len(parts))
                    else:
                        results.append(item)
            answer = plain_answer(body, job, joined(results), info, start)
            yield images_line(answer.model_dump(mode="json", by_alias=True))
        except UserError as exc:
            yield error_line(*error_answer(exc)[:2])
        except Exception as exc:  # a bug; the status line is sent, so the error is the stream's last line
            incident = uuid.uuid4().hex[:12]
            log.error("internal error %s while streaming", incident, exc_info=exc)
            yield error_line(500, f"internal error {incident} (its traceback is in the server log)")

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
    # own limit, past which Ray Serve would drop requests with a plain-text 503, stays far above theirs. Requests
    # still sending their body hold at most half of it (BODY_READERS), each for at most the body timeout, so
    # health and the model always find a slot.
    ingress_limit = INGRESS_HEADROOM * generator_capacity(options, max_batch) + 64
    return Ingress.options(num_replicas=1, max_ongoing_requests=ingress_limit, max_queued_requests=ingress_limit,
                           ray_actor_options={"num_cpus": 0}).bind(generator, options)
