"""Backends behind one interface (`base.Backend.run(stage, inputs)`): PyTorch, ONNX Runtime, TensorRT.

`open_backend` is the one factory. `auto` picks TensorRT when plans of the precision, TensorRT and a
CUDA device exist, else ONNX Runtime, and the description says which. An explicitly requested target
that cannot run is an error, never a silent fallback. TensorRT is imported only when plans are opened.
"""
from __future__ import annotations

import torch

from d2c_export.backends.base import Backend
from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.targets import AUTO, BackendName, Precision, Target


def resolve_auto(engines: Engines, precision: Precision) -> Target:
    """TensorRT where its plans of `precision`, TensorRT and a GPU exist; else ONNX Runtime."""
    from d2c_export.backends.trt import trt_usable
    backend = BackendName.TRT if trt_usable(engines, precision) else BackendName.ORT
    return Target(backend, precision)


def open_backend(engines: Engines, target: Target, threads: int = 0, keep_fp16_rounding: bool = False,
                 device: str | None = None, cuda_graphs: bool | None = None) -> Backend:
    """The stages of `engines` on `target`.

    `threads`: ONNX Runtime's intra-op threads (0: its default). `keep_fp16_rounding`: run FP16 graphs on ONNX
    Runtime without graph optimisations, which would fuse away the FP16 casts on the CPU (for parity checks).
    `device`: where the PyTorch backend computes (default: CUDA when present, else the CPU). `cuda_graphs`:
    whether PyTorch on CUDA replays its gpt step and denoising loops as CUDA graphs (default: at FP16 / BF16,
    the GPU fast path; FP32 stays the eager baseline); CUDA graphs need CUDA.
    """
    if target.backend is BackendName.TORCH:
        from d2c_export.backends.pytorch import TorchBackend
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        on_cuda = torch.device(device).type == "cuda"
        graphs = (on_cuda and target.precision is not Precision.FP32) if cuda_graphs is None else cuda_graphs
        if graphs and not on_cuda:
            raise EngineError(f"CUDA graphs need a CUDA device; {target.name} runs on {device} here")
        graph_device = None
        if graphs:
            from d2c_export.backends.cuda_device import CudaDevice
            graph_device = CudaDevice()
        return TorchBackend(engines, device, target.precision, graph_device)
    trt = None
    if target.backend is BackendName.TRT:
        from d2c_export.trt_platform import RUN_HINT, require_tensorrt
        trt = require_tensorrt(RUN_HINT)  # what is missing here comes before what is missing in the directory
    if not engines.has(target.kind):
        raise EngineError(f"{engines.directory} has no {target.kind} build of every stage, so {target.name!r} "
                          f"cannot run; build it with `{engines.rebuild_command(target.kind)}`")
    if trt is not None:
        from d2c_export.backends.trt import TrtBackend
        return TrtBackend(engines, target.precision, trt=trt)
    from d2c_export.backends.ort import OrtBackend
    return OrtBackend(engines, target.precision, threads, keep_fp16_rounding)


def open_named(engines: Engines, backend: str, precision: str, threads: int = 0) -> Backend:
    """`open_backend` for the command line's --backend (a backend name or `auto`) and --precision."""
    if backend == AUTO:
        return open_backend(engines, resolve_auto(engines, Precision(precision)), threads)
    return open_backend(engines, Target.of(backend, precision), threads)
