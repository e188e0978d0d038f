"""`engines/manifest.json`: what was built from what (files with their sha256, the model source, profiles)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from d2c_export.class_names import CLASS_NAMES_SCHEMA
from d2c_export.errors import StaleEngines
from d2c_export.sources import SOURCE_SCHEMA
from d2c_export.stages import MAX_EXPORT_BATCH
from reference.files import write_json_atomic
from reference.json_files import ANY, SCALAR, Int, JsonError, ListOf, MapOf, Maybe, Obj, OneOf, Str, read_json
from reference.model import CONFIG_SCHEMA, D2CConfig

MANIFEST = "manifest.json"
# 2: the gpt graph reads a per-layer cache and returns only the step's keys and values
# 3: the config carries its sha256 (an edited config is refused); the model's recommended sampling is recorded
FORMAT_VERSION = 3
HEX64 = re.compile(r"[0-9a-f]{64}")


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


HEX_DIGEST = Str(pattern=HEX64.pattern)
MAX_AXIS = 1 << 24  # no tensor axis or profile bound of an export is larger
TENSOR = Obj({"name": Str(max_len=256), "shape": ListOf(OneOf(Int(0, MAX_AXIS), Str(max_len=64)), max_len=8)},
             {"dtype": Str(max_len=32)})
STAGE_ENTRY = Obj({"files": MapOf(HEX_DIGEST, min_len=1), "precision": Str(choices=("fp32", "fp16")),
                   "inputs": ListOf(TENSOR, max_len=1024), "outputs": ListOf(TENSOR, max_len=1024),
                   "profile": MapOf(ListOf(Int(0, MAX_AXIS), min_len=3, max_len=3))},
                  {"opset": Maybe(Int(1, 1000)),
                   "tensorrt": Maybe(MapOf(OneOf(SCALAR, ListOf(SCALAR, max_len=8), MapOf(Int(0, MAX_AXIS)))))})
# The manifest as JSON: every field typed, sizes bounded (`max_batch` by the limit an export accepts); `class_names`
# optional (older manifests have none), checked against the model's classes when the engines open.
MANIFEST_SCHEMA = Obj({"format_version": Int(), "config": MapOf(ANY), "config_sha256": HEX_DIGEST,
                       "source": SOURCE_SCHEMA, "max_batch": Int(1, MAX_EXPORT_BATCH), "exporter": Str(),
                       "stages": MapOf(MapOf(STAGE_ENTRY)), "sampling": MapOf(SCALAR)},
                      {"class_names": CLASS_NAMES_SCHEMA})


def _problem(data: dict) -> str | None:
    """What is wrong in a manifest of the right shape (MANIFEST_SCHEMA's), or None."""
    if data["config_sha256"] != config_digest(data["config"]):
        return "its config was changed after export (the config's sha256 does not match)"
    for stage, kinds in data["stages"].items():
        for kind, e in kinds.items():
            if not all(r[0] <= r[1] <= r[2] for r in e["profile"].values()):
                return f"{stage}:{kind} has a profile whose min, opt and max are out of order"
    return None


@dataclass
class StageEntry:
    """One built file set of a stage (an ONNX graph with its external data, or a TensorRT plan)."""

    files: dict[str, str]  # file name (relative to the engines dir) -> sha256
    precision: str  # "fp32" | "fp16"
    inputs: list[dict]
    outputs: list[dict]
    profile: dict[str, list[int]]
    opset: int | None = None
    tensorrt: dict | None = None  # version, gpu, compute_capability for plans

    @property
    def main_file(self) -> str:
        return next(iter(self.files))


@dataclass
class Manifest:
    config: dict
    source: dict  # {"checkpoint": path, "sha256": ...} or {"random_init_seed": seed}
    max_batch: int
    exporter: str
    stages: dict[str, dict[str, StageEntry]] = field(default_factory=dict)  # stage -> kind ("onnx-fp32"...) -> entry
    sampling: dict = field(default_factory=dict)  # the model's recommended sampling settings (SamplingParams fields)
    class_names: list[str] | None = None  # a name per class, in class order (None: the classes are numbered)
    format_version: int = FORMAT_VERSION

    @property
    def d2c_config(self) -> D2CConfig:
        """The recorded config, checked against CONFIG_SCHEMA (JsonError, a ValueError, names the field)."""
        CONFIG_SCHEMA.check(self.config, "config")
        return D2CConfig.from_dict(self.config)

    def file_names(self) -> set[str]:
        """Every file the manifest lists, of every stage and kind."""
        return {name for kinds in self.stages.values() for e in kinds.values() for name in e.files}

    def kinds(self) -> list[str]:
        return sorted({k for kinds in self.stages.values() for k in kinds})

    def to_dict(self) -> dict:
        names = {} if self.class_names is None else {"class_names": self.class_names}
        return {"format_version": self.format_version, "config": self.config, "source": self.source,
                "config_sha256": config_digest(self.config), "max_batch": self.max_batch, "exporter": self.exporter,
                "sampling": self.sampling, **names,
                "stages": {s: {k: vars(e) for k, e in kinds.items()} for s, kinds in self.stages.items()}}

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """The manifest at `path`; StaleEngines (without a fix, which the caller knows) when it is not one."""
        try:
            data = read_json(path)
        except (OSError, JsonError) as exc:
            raise StaleEngines(f"{path} is not a readable manifest ({exc})") from None
        if not isinstance(data, dict):
            raise StaleEngines(f"{path} is not a manifest (a JSON {type(data).__name__}, not an object)")
        if data.get("format_version") != FORMAT_VERSION:
            raise StaleEngines(f"{path} has format version {data.get('format_version')!r:.64}, expected "
                               f"{FORMAT_VERSION}")
        try:
            MANIFEST_SCHEMA.check(data)
        except JsonError as exc:
            raise StaleEngines(f"{path} is not a valid manifest: {exc}") from None
        problem = _problem(data)
        if problem:
            raise StaleEngines(f"{path} is not a valid manifest: {problem}")
        stages = {s: {k: StageEntry(**e) for k, e in kinds.items()} for s, kinds in data["stages"].items()}
        return cls(config=data["config"], source=data["source"], max_batch=data["max_batch"],
                   exporter=data["exporter"], stages=stages, sampling=data["sampling"],
                   class_names=data.get("class_names"))
