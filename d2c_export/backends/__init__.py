"""Backends behind one interface (`base.Backend.run(stage, inputs)`), each registered once (`registry`).

`open_backend` is the one factory: it refuses a target this machine cannot run (`BackendSpec.missing`) or whose
files the engines lack, naming the fix, then opens it. `auto` picks the available backend of the highest rank
(TensorRT when plans of the precision, TensorRT and a CUDA device exist, else ONNX Runtime), and the backend's
description says which. An explicitly requested target that cannot run is an error, never a silent fallback.
Importing this package registers every backend below; TensorRT itself is imported only when plans are opened.
"""
from __future__ import annotations

from d2c_export.backends import pytorch, ort, trt  # noqa: F401,I001  (registration: names list in this order)
from d2c_export.backends.base import Backend
from d2c_export.backends.registry import (AUTO, BACKENDS, BackendSpec, OpenOptions, Precision, Target, TargetError,
                                          auto_candidates, backend_names, backend_spec, choices, parse_list,
                                          register_backend)
from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable

__all__ = ["AUTO", "BACKENDS", "Backend", "BackendSpec", "OpenOptions", "Precision", "Target", "TargetError",
           "auto_candidates", "backend_names", "backend_spec", "choices", "open_backend", "open_named",
           "parse_list", "register_backend", "resolve_auto", "unbuilt"]


def unbuilt(engines: Engines, target: Target) -> str | None:
    """Why `engines` cannot feed `target` (its files are not built), naming the build; None when they can."""
    if target.kind is None or engines.has(target.kind):
        return None
    return (f"{engines.directory} has no {target.kind} build of every stage, so {target.name!r} cannot run; build it "
            f"with `{engines.rebuild_command(target.kind)}`")


def resolve_auto(engines: Engines, precision: Precision) -> Target:
    """The best target `auto` may pick at `precision` that runs here on these engines; else the last candidate
    (whose opening then says what is missing)."""
    candidates = auto_candidates(precision)
    for target in candidates:
        if target.spec.missing() is None and unbuilt(engines, target) is None:
            return target
    return candidates[-1]


def open_backend(engines: Engines, target: Target, threads: int = 0, keep_fp16_rounding: bool = False,
                 device: str | None = None, cuda_graphs: bool | None = None) -> Backend:
    """The stages of `engines` on `target` (the options: `registry.OpenOptions`); use it as a context manager, or
    `close()` it, to give back what it holds."""
    spec = target.spec
    why = spec.missing()  # what is missing here comes before what is missing in the directory
    if why:
        raise BackendUnavailable(f"{why}: {spec.hint}" if spec.hint else why)
    if (why := unbuilt(engines, target)) is not None:
        raise BackendUnavailable(why)
    return spec.open(engines, target.precision, OpenOptions(threads, keep_fp16_rounding, device, cuda_graphs))


def open_named(engines: Engines, backend: str, precision: str, threads: int = 0) -> Backend:
    """`open_backend` for the command line's --backend (a backend name or `auto`) and --precision."""
    if backend == AUTO:
        return open_backend(engines, resolve_auto(engines, Precision(precision)), threads)
    return open_backend(engines, Target.of(backend, precision), threads)
