"""`engines/manifest.json`: what was built from what (files with their sha256, the model source, profiles)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from d2c_export.errors import StaleEngines
from reference.files import write_json_atomic
from reference.model import D2CConfig

MANIFEST = "manifest.json"
# 2: the gpt graph reads a per-layer cache and returns only the step's keys and values
# 3: the config carries its sha256 (an edited config is refused); the model's recommended sampling is recorded
FORMAT_VERSION = 3
HEX64 = re.compile(r"[0-9a-f]{64}")


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _problem(data) -> str | None:
    """What is wrong with the shape of a manifest's data (a schema check), or None."""
    types = {"config": dict, "source": dict, "max_batch": int, "exporter": str, "stages": dict, "sampling": dict,
             "config_sha256": str}
    for key, kind in types.items():
        if key not in data:
            return f"it has no {key!r}"
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            return f"{key!r} is a {type(data[key]).__name__}, not a {kind.__name__}"
    if data["max_batch"] < 1:
        return f"max_batch is {data['max_batch']}"
    if data["config_sha256"] != config_digest(data["config"]):
        return "its config was changed after export (the config's sha256 does not match)"
    for stage, kinds in data["stages"].items():
        if not isinstance(kinds, dict):
            return f"stage {stage!r} is a {type(kinds).__name__}, not an object of builds"
        for kind, e in kinds.items():
            if not isinstance(e, dict):
                return f"{stage}:{kind} is a {type(e).__name__}, not an object"
            files = e.get("files")
            if not isinstance(files, dict) or not files or not all(
                    isinstance(k, str) and isinstance(v, str) and HEX64.fullmatch(v) for k, v in files.items()):
                return f"{stage}:{kind} has no valid files (name -> sha256)"
            if e.get("precision") not in ("fp32", "fp16"):
                return f"{stage}:{kind} has precision {e.get('precision')!r}"
            for io in ("inputs", "outputs"):
                if not isinstance(e.get(io), list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                            and isinstance(t.get("shape"), list) for t in e[io]):
                    return f"{stage}:{kind} has malformed {io}"
            profile = e.get("profile")
            if not isinstance(profile, dict) or not all(
                    isinstance(r, list) and len(r) == 3 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in r) and r[0] <= r[1] <= r[2]
                    for r in profile.values()):
                return f"{stage}:{kind} has a malformed profile"
            extra = set(e) - {"files", "precision", "inputs", "outputs", "profile", "opset", "tensorrt"}
            if extra:
                return f"{stage}:{kind} has unknown fields {sorted(extra)}"
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
    format_version: int = FORMAT_VERSION

    @property
    def d2c_config(self) -> D2CConfig:
        return D2CConfig.from_dict(self.config)

    def file_names(self) -> set[str]:
        """Every file the manifest lists, of every stage and kind."""
        return {name for kinds in self.stages.values() for e in kinds.values() for name in e.files}

    def kinds(self) -> list[str]:
        return sorted({k for kinds in self.stages.values() for k in kinds})

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "config": self.config, "source": self.source,
                "config_sha256": config_digest(self.config), "max_batch": self.max_batch, "exporter": self.exporter,
                "sampling": self.sampling,
                "stages": {s: {k: vars(e) for k, e in kinds.items()} for s, kinds in self.stages.items()}}

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """The manifest at `path`; StaleEngines (without a fix, which the caller knows) when it is not one."""
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StaleEngines(f"{path} is not a readable manifest ({exc})") from None
        if not isinstance(data, dict):
            raise StaleEngines(f"{path} is not a manifest (a JSON {type(data).__name__}, not an object)")
        if data.get("format_version") != FORMAT_VERSION:
            raise StaleEngines(f"{path} has format version {data.get('format_version')}, expected {FORMAT_VERSION}")
        problem = _problem(data)
        if problem:
            raise StaleEngines(f"{path} is not a valid manifest: {problem}")
        try:
            stages = {s: {k: StageEntry(**e) for k, e in kinds.items()} for s, kinds in data["stages"].items()}
            return cls(config=data["config"], source=data["source"], max_batch=data["max_batch"],
                       exporter=data["exporter"], stages=stages, sampling=data["sampling"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise StaleEngines(f"{path} is not a valid manifest ({type(exc).__name__}: {exc})") from None
