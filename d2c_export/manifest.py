"""`engines/manifest.json`: what was built from what, with hashes, and the checks that refuse stale files."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from reference.model import D2CConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the gpt graph reads a per-layer cache and returns only the step's keys and values


class EngineError(RuntimeError):
    """A problem with the engines directory; the message names the problem and the command that fixes it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renamed onto it only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


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
    format_version: int = FORMAT_VERSION

    @property
    def d2c_config(self) -> D2CConfig:
        return D2CConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        return {"format_version": self.format_version, "config": self.config, "source": self.source,
                "max_batch": self.max_batch, "exporter": self.exporter,
                "stages": {s: {k: vars(e) for k, e in kinds.items()} for s, kinds in self.stages.items()}}

    def save(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise EngineError(f"engines directory {directory} does not exist; "
                              f"run `{rebuild_command('onnx-fp32', directory)}`")
        if not path.is_file():
            raise EngineError(f"{path} is missing; run `{rebuild_command('onnx-fp32', directory)}`")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise EngineError(f"{path} has format version {data.get('format_version')}, expected "
                                  f"{FORMAT_VERSION}; re-run `{rebuild_command('onnx-fp32', directory)}`")
            stages = {s: {k: StageEntry(**e) for k, e in kinds.items()} for s, kinds in data["stages"].items()}
            return cls(config=data["config"], source=data["source"], max_batch=data["max_batch"],
                       exporter=data["exporter"], stages=stages)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EngineError(f"{path} is not a valid manifest ({exc}); "
                              f"re-run `{rebuild_command('onnx-fp32', directory)}`") from None

    def entry(self, stage: str, kind: str, directory: Path) -> StageEntry:
        """The entry of `stage` built as `kind`, with every file present and matching its hash."""
        if stage not in self.stages or kind not in self.stages[stage]:
            have = ", ".join(f"{s}:{k}" for s, kinds in self.stages.items() for k in kinds) or "nothing"
            raise EngineError(f"{directory} has no {kind} build of stage {stage!r} (it has {have}); "
                              f"run `{rebuild_command(kind, directory)}`")
        entry = self.stages[stage][kind]
        verify_files(entry, Path(directory), kind)
        return entry


def rebuild_command(kind: str, directory: Path) -> str:
    """The command that (re)builds files of `kind` ("onnx-fp32", "onnx-fp16", "trt-fp16", ...)."""
    fp16 = " --fp16" if "fp16" in kind else ""
    if kind.startswith("trt"):
        return f"d2c-export trt{fp16} --engines {directory}"
    return f"d2c-export onnx --stage all{fp16} --out {directory}"


def verify_files(entry: StageEntry, directory: Path, kind: str) -> None:
    """Every file of `entry` exists and matches its recorded sha256."""
    for name, digest in entry.files.items():
        path = directory / name
        if not path.is_file():
            raise EngineError(f"{path} is missing; rebuild with `{rebuild_command(kind, directory)}`")
        if sha256_file(path) != digest:
            raise EngineError(f"{path} does not match its sha256 in the manifest (changed or truncated); "
                              f"rebuild with `{rebuild_command(kind, directory)}`")
