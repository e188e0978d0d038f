"""`engines/manifest.json`: what was built from what (files with their sha256, the model source, profiles)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from d2c_export.errors import EngineError
from reference.files import write_json_atomic
from reference.model import D2CConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the gpt graph reads a per-layer cache and returns only the step's keys and values


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
    format_version: int = FORMAT_VERSION

    @property
    def d2c_config(self) -> D2CConfig:
        return D2CConfig.from_dict(self.config)

    def kinds(self) -> list[str]:
        return sorted({k for kinds in self.stages.values() for k in kinds})

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "config": self.config, "source": self.source,
                "max_batch": self.max_batch, "exporter": self.exporter, "sampling": self.sampling,
                "stages": {s: {k: vars(e) for k, e in kinds.items()} for s, kinds in self.stages.items()}}

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """The manifest at `path`; EngineError (without a fix, which the caller knows) when it is not one."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(f"{path} is not a readable manifest ({exc})") from None
        if not isinstance(data, dict):
            raise EngineError(f"{path} is not a manifest (a JSON {type(data).__name__}, not an object)")
        if data.get("format_version") != FORMAT_VERSION:
            raise EngineError(f"{path} has format version {data.get('format_version')}, expected {FORMAT_VERSION}")
        try:
            stages = {s: {k: StageEntry(**e) for k, e in kinds.items()} for s, kinds in data["stages"].items()}
            return cls(config=data["config"], source=data["source"], max_batch=data["max_batch"],
                       exporter=data["exporter"], stages=stages, sampling=data.get("sampling", {}))
        except (KeyError, TypeError, AttributeError) as exc:
            raise EngineError(f"{path} is not a valid manifest ({type(exc).__name__}: {exc})") from None
