"""What runs the stages: a backend and a precision, parsed once from one spelling (`ort-fp16`, `trt`, `torch`).

A `Target` knows the kind of engine file it runs (`onnx-fp16`, `trt-fp32`; none for PyTorch, which
rebuilds the model from the manifest's source, in FP32 or with FP16 / BF16 weights). A precision a backend cannot run is refused here,
when the name is parsed, never silently replaced by another.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"  # PyTorch only: bfloat16 weights under autocast


class BackendName(str, Enum):
    TORCH = "torch"  # the reference modules, rebuilt from the manifest's source
    ORT = "ort"  # ONNX Runtime over the ONNX graphs
    TRT = "trt"  # TensorRT plans


AUTO = "auto"  # TensorRT where its plans and a GPU exist, else ONNX Runtime (`backends.resolve_auto`)
PRECISIONS: dict[BackendName, tuple[Precision, ...]] = {
    BackendName.TORCH: (Precision.FP32, Precision.FP16, Precision.BF16),  # reduced: weights cast, autocast
    BackendName.ORT: (Precision.FP32, Precision.FP16),
    BackendName.TRT: (Precision.FP32, Precision.FP16),
}
FILE_PREFIX = {BackendName.ORT: "onnx", BackendName.TRT: "trt"}


class TargetError(ValueError):
    """A backend or precision name that does not exist, or a combination that cannot run."""


@dataclass(frozen=True)
class Target:
    backend: BackendName
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS[self.backend]:
            allowed = ", ".join(p.value for p in PRECISIONS[self.backend])
            raise TargetError(f"the {self.backend.value} backend runs {allowed} only, not {self.precision.value}")

    @classmethod
    def parse(cls, name: str) -> "Target":
        """`torch`, `ort`, `ort-fp16`, `trt`, `trt-fp16`, ...: a backend, then optionally `-precision` (default fp32)."""
        backend, _, precision = name.strip().partition("-")
        return cls.of(backend, precision or Precision.FP32.value)

    @classmethod
    def of(cls, backend: str, precision: str) -> "Target":
        try:
            b = BackendName(backend)
        except ValueError:
            raise TargetError(f"unknown backend {backend!r}; choose from {', '.join(choices())}") from None
        try:
            p = Precision(precision)
        except ValueError:
            raise TargetError(f"unknown precision {precision!r}; choose from "
                              f"{', '.join(x.value for x in Precision)}") from None
        return cls(b, p)

    @property
    def name(self) -> str:
        return self.backend.value if self.precision is Precision.FP32 else f"{self.backend.value}-{self.precision.value}"

    @property
    def kind(self) -> str | None:
        """The manifest's kind of the files this target runs (`onnx-fp32`, `trt-fp16`), None for PyTorch."""
        prefix = FILE_PREFIX.get(self.backend)
        return None if prefix is None else f"{prefix}-{self.precision.value}"

    @property
    def parity_kind(self) -> str:
        """The kind whose parity limits the target is held to (`StageSpec.tolerance`): its files', or `torch-fp16`."""
        return self.kind or f"{self.backend.value}-{self.precision.value}"

    def __str__(self) -> str:
        return self.name


def choices() -> list[str]:
    """Every target name, as the command line accepts them."""
    return [Target(b, p).name for b, ps in PRECISIONS.items() for p in ps]


def parse_list(text: str) -> list[Target]:
    """A comma-separated list of target names, in order, without repeats."""
    targets = [Target.parse(t) for t in text.split(",") if t.strip()]
    if not targets:
        raise TargetError(f"no backend named; choose from {', '.join(choices())}")
    repeated = sorted({t.name for t in targets if targets.count(t) > 1})
    if repeated:
        raise TargetError(f"backend(s) named twice: {', '.join(repeated)}")
    return targets
