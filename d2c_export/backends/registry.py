"""The registry of backends, and what runs the stages: a `Target`, a backend and a precision parsed from one spelling.

Each backend module registers one `BackendSpec` (`register_backend`): its name, the precisions it runs, the files
it runs (a manifest kind prefix, or none), how to open it, what it needs of this machine, and its place in `auto`.
Every command, the benchmark, the parity check and the server read the registry and nothing else about a backend,
so adding one (OpenVINO, `torch.compile`) is a module that registers its spec plus its import in
`d2c_export/backends/__init__.py`. A precision a backend cannot run is refused when the name is parsed, never
silently replaced by another.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from d2c_export.engines import Engines
from d2c_export.errors import BadInput


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # PyTorch only: bfloat16 weights under autocast


AUTO = "auto"  # the available backend of the highest `auto_rank` (TensorRT where its plans and a GPU exist, else ORT)


class TargetError(BadInput):
    """A backend or precision name that does not exist, or a combination that cannot run."""


@dataclass(frozen=True)
class OpenOptions:
    """How to open a backend; each uses what applies to it.

    `threads`: intra-op threads (0: the runtime's default). `keep_fp16_rounding`: run FP16 graphs without the graph
    optimisations that fuse away their casts (parity checks). `device`: where a PyTorch backend computes (default:
    CUDA when present). `cuda_graphs`: replay the gpt step and denoising loops as CUDA graphs (default: the backend's).
    """

    threads: int = 0
    keep_fp16_rounding: bool = False
    device: str | None = None
    cuda_graphs: bool | None = None


def _nothing_missing() -> str | None:
    return None


@dataclass(frozen=True)
class BackendSpec:
    """One backend, as every command, the benchmark, the parity check and the server see it.

    - `open(engines, precision, options)` makes the `base.Backend` (once `open_backend` has checked `missing` and
      `files`).
    - `files`: the manifest kind prefix of the files it runs (`onnx` -> `onnx-fp16`); None: the model rebuilt from
      the manifest's source. `build(engines, precision, progress)` makes them where missing (the benchmark's export).
    - `missing()`: what this machine lacks to run it (TensorRT, a GPU), or None; `hint` says what to do instead.
    - `auto_rank`: `auto` takes the available backend of the highest rank; 0: never chosen by `auto`.
    - `is_reference`: it runs the reference modules themselves, so `d2c-export check` compares it only at reduced
      precision; `checked_unbuilt`: `check` compares it even where its files are missing (and fails naming the build).
    - `tolerance_as`: the kind prefix of the parity limits it is held to (default: its files', else its name).
    - `matmul`: whose matrix multiply the benchmark's roofline measures for it ("torch", or "onnxruntime" as well).
    """

    name: str
    summary: str
    precisions: tuple[Precision, ...]
    open: Callable[[Engines, Precision, OpenOptions], Any]
    files: str | None = None
    build: Callable[[Engines, Precision, bool], None] | None = None
    missing: Callable[[], str | None] = _nothing_missing
    hint: str = ""
    auto_rank: int = 0
    is_reference: bool = False
    checked_unbuilt: bool = False
    tolerance_as: str | None = None
    matmul: str = "torch"


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add `spec` to the registry (names list in registration order)."""
    if spec.name in BACKENDS:
        raise ValueError(f"backend {spec.name!r} is registered twice")
    if "-" in spec.name or spec.name == AUTO:
        raise ValueError(f"backend name {spec.name!r} may not contain '-' or be {AUTO!r}")
    BACKENDS[spec.name] = spec
    return spec


def backend_names() -> list[str]:
    return list(BACKENDS)


def backend_spec(name: str) -> BackendSpec:
    if name not in BACKENDS:
        raise TargetError(f"unknown backend {name!r}; choose from {', '.join(choices())}")
    return BACKENDS[name]


@dataclass(frozen=True)
class Target:
    """A registered backend at one precision; `kind` names the files it runs (`onnx-fp16`; None: the model)."""

    backend: str
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        spec = backend_spec(self.backend)
        if self.precision not in spec.precisions:
            allowed = ", ".join(p.value for p in spec.precisions)
            raise TargetError(f"the {self.backend} backend runs {allowed} only, not {self.precision.value}")

    @classmethod
    def parse(cls, name: str) -> "Target":
        """`torch`, `ort`, `ort-fp16`, `trt`, `trt-fp16`, ...: a backend, then optionally `-precision` (default fp32)."""
        backend, _, precision = name.strip().partition("-")
        return cls.of(backend, precision or Precision.FP32.value)

    @classmethod
    def of(cls, backend: str, precision: str) -> "Target":
        backend_spec(backend)
        try:
            p = Precision(precision)
        except ValueError:
            raise TargetError(f"unknown precision {precision!r}; choose from "
                              f"{', '.join(x.value for x in Precision)}") from None
        return cls(backend, p)

    @property
    def spec(self) -> BackendSpec:
        return BACKENDS[self.backend]

    @property
    def name(self) -> str:
        return self.backend if self.precision is Precision.FP32 else f"{self.backend}-{self.precision.value}"

    @property
    def kind(self) -> str | None:
        """The manifest's kind of the files this target runs (`onnx-fp32`, `trt-fp16`), None for the model."""
        files = self.spec.files
        return None if files is None else f"{files}-{self.precision.value}"

    @property
    def parity_kind(self) -> str:
        """The kind whose parity limits the target is held to (`StageSpec.tolerance`): its files', or `torch-fp16`."""
        spec = self.spec
        return f"{spec.tolerance_as or spec.files or spec.name}-{self.precision.value}"

    def __str__(self) -> str:
        return self.name


def choices() -> list[str]:
    """Every target name, as the command line accepts them."""
    return [Target(name, p).name for name, spec in BACKENDS.items() for p in spec.precisions]


def parse_list(text: str) -> list[Target]:
    """A comma-separated list of target names, in order, without repeats."""
    targets = [Target.parse(t) for t in text.split(",") if t.strip()]
    if not targets:
        raise TargetError(f"no backend named; choose from {', '.join(choices())}")
    repeated = sorted({t.name for t in targets if targets.count(t) > 1})
    if repeated:
        raise TargetError(f"backend(s) named twice: {', '.join(repeated)}")
    return targets


def auto_candidates(precision: Precision) -> list[Target]:
    """What `auto` may pick at `precision`, best first (refused when no backend `auto` picks runs it)."""
    ranked = sorted((s for s in BACKENDS.values() if s.auto_rank > 0 and precision in s.precisions),
                    key=lambda s: -s.auto_rank)
    if not ranked:
        raise TargetError(f"no backend that auto picks runs {precision.value}; name one that does with --backend")
    return [Target(s.name, precision) for s in ranked]
