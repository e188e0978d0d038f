"""The HTTP API's requests and answers: pydantic models (they are the OpenAPI schema at /docs), the check of a
request against the model, and the answer to an error (its status and one line naming the field).

The request's sampling fields are made from `SamplingParams`' settings (`reference.settings`): one optional field
per setting, with its help as the description and its range as the bounds, so the API takes exactly the sampling
settings `d2c-run` takes as flags.
"""
from __future__ import annotations

import hmac
import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, create_model, field_validator

from d2c_export.engines import Engines
from d2c_export.errors import EngineError, NonFiniteOutput, UserError, one_line
from d2c_export.serve.batching import Job
from reference.pipeline import SamplingParams
from reference.settings import MAX_SEED, SettingSpec, check_request, settings_of
MAX_BODY_BYTES = 16 * 1024  # a request is a few numbers; anything larger is refused (413) before it is parsed
TOKEN_ENV = "D2C_SERVE_TOKEN"  # when set, requests must carry `Authorization: Bearer <token>`

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
ALIASES = {"classes": "class"}  # request fields whose JSON name is not their Python name


class ApiError(UserError):
    """A refused request: its HTTP status, a one-line message and the headers to send (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(one_line(message))
        self.status = status
        self.message = one_line(message)
        self.headers = headers or {}


class RequestFields(BaseModel):
    """The fields of POST /v1/images that are not sampling settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True,
                              json_schema_extra={"examples": [{"class": 3, "seed": 0}]})

    classes: list[StrictInt] = Field(alias="class", min_length=1, max_length=4096,
                                     description="class label, or a list of them (as d2c-run's repeated --class)")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="image i of the request draws from seed + i")
    num_images: StrictInt = Field(1, ge=1, le=4096, description="images per class (as d2c-run's --num-images)")
    format: Literal["json", "png"] = Field("json", description="json: base64 PNGs with their seeds; png: one grid")

    @field_validator("classes", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    def given_settings(self) -> dict:
        """The sampling settings the request gives (the others take the engines' recommended values)."""
        return {s.name: getattr(self, s.name) for s in settings_of(SamplingParams) if getattr(self, s.name) is not None}


def setting_field(spec: SettingSpec) -> tuple[Any, Any]:
    """The request field of one setting: optional (unset: the engines' value), its range as the schema's bounds."""
    if spec.choices is not None:
        kind = spec.kind if spec.kind is not str else Literal[spec.choices]
    else:
        kind = {bool: StrictBool, int: StrictInt}.get(spec.kind, float)
    bounds = {("gt" if spec.min_exclusive else "ge"): spec.min, ("lt" if spec.max_exclusive else "le"): spec.max}
    return kind | None, Field(None, description=spec.help, **{k: v for k, v in bounds.items() if v is not None})


ImageRequest = create_model(
    "ImageRequest", __base__=RequestFields,
    __doc__="POST /v1/images. Sampling settings left out take the engines' recommended ones, as in `d2c-run`.",
    **{s.name: setting_field(s) for s in settings_of(SamplingParams)})


class ImageOut(BaseModel):
    class_label: int = Field(serialization_alias="class")
    seed: int
    tokens: list[int] | None = Field(description="the discrete stage's token ids (None for plain MAR)")
    png_base64: str


class Timings(BaseModel):
    queue_s: float = Field(description="from arrival at the replica to the start of its generation")
    generation_s: float = Field(description="the generation this request was merged into")
    total_s: float = Field(description="at the ingress, from the parsed request to the answer")
    stages_s: dict[str, float]


class ImagesResponse(BaseModel):
    images: list[ImageOut]
    settings: dict
    backend: str
    precision: str
    manifest_sha256: str
    batch_size: int = Field(description="images in the generation this request was merged into")
    batch_requests: int = Field(description="requests merged into that generation")
    replica: str
    timings: Timings


class ModelInfo(BaseModel):
    config_name: str
    config: dict
    classes: int
    class_names: list[str] = Field(description="a name per class, in class order: the names the manifest records "
                                               "(`d2c-export onnx --class-names`; the demo's shape and colour), else "
                                               "the class numbers")
    image_size: int
    max_batch: int = Field(description="images per generation (and per request) this server admits")
    exported_max_batch: int
    backend: str
    precision: str
    sampling: dict = Field(description="the recommended settings, used for those a request leaves out")
    manifest_sha256: str


class Health(BaseModel):
    status: Literal["ok"]
    replica: str
    actor: str = Field(description="the replica's Ray actor name")
    running_jobs: int = Field(0, description="requests (or parts) in the generation this replica runs now")
    dropped_jobs: int = Field(0, description="requests (or parts) whose client left and whose work this replica "
                                             "dropped: left out of their generation, or their generation stopped")


class ErrorBody(BaseModel):
    error: str = Field(description="one line naming the problem")


def validation_message(exc: ValidationError | list) -> str:
    """The first problem of a failed validation as `field: message`."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return one_line(f"{loc + ': ' if loc else ''}{first.get('msg', 'invalid')}{more}")


def resolve(request: ImageRequest, engines: Engines, max_images: int) -> Job:
    """The request as a job for the generator (labels, per-image seeds, full settings), or a `BadInput` / `ApiError`
    (422); `max_images`: the most images a request may ask for (split across generations of at most the max batch)."""
    labels = [c for c in request.classes for _ in range(request.num_images)]
    if len(labels) > max_images:
        raise ApiError(422, f"{len(labels)} images ({len(request.classes)} classes x num_images "
                            f"{request.num_images}) exceeds this server's limit of {max_images} images per request; "
                            f"ask for fewer")
    params = SamplingParams(**{**vars(engines.sampling), **request.given_settings()})
    check_request(engines.config, labels, seed=request.seed, params=params)
    return Job(labels=tuple(labels), seeds=tuple(request.seed + i for i in range(len(labels))), params=params)


def json_spelling(name: str, value: object = None) -> str:
    """A setting as a client writes it: its JSON field (`class`, `diffusion_steps`)."""
    field = ALIASES.get(name, name)
    return field if value is None else f"{field} {value}"


def error_answer(error: UserError) -> tuple[int, str, dict[str, str]]:
    """(HTTP status, one-line message, headers) of an error that is the client's or the server's to fix: a refused
    request its own status, bad input and settings that made the output non-finite 422 (the client's), a backend or
    engines problem 503 (the server's)."""
    if isinstance(error, ApiError):
        return error.status, error.message, error.headers
    if isinstance(error, NonFiniteOutput):
        shown = ", ".join(f"{k} {v}" for k, v in error.settings.items() if v is not None)
        return 422, (f"the settings ({shown}) made the generation's {error.what} non-finite (inf/NaN); ask with "
                     "settings nearer the recommended ones (GET /v1/model)"), {}
    status = 503 if isinstance(error, EngineError) else 422
    return status, one_line(error.render(json_spelling)), {}


def token_digest(token: str | None) -> str | None:
    """What the ingress keeps of the bearer token: its sha256 (the token itself never leaves the command)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def authorized(header: str | None, digest: str | None) -> bool:
    """Whether `Authorization: Bearer <token>` matches the digest, compared in constant time; True with no token."""
    if digest is None:
        return True
    scheme, _, token = (header or "").partition(" ")
    presented = hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(presented.encode(), digest.encode())
