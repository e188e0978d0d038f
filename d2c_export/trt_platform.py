"""Whether TensorRT can run here, and the platform a plan is built for; `tensorrt` is imported only after a CUDA
device is found (creating a TensorRT builder or runtime without one can crash the process)."""
from __future__ import annotations

import importlib.util
from types import ModuleType

from d2c_export.errors import BackendUnavailable

INSTALL_HINT = "pip install 'd2c-export[trt]' on a machine with an NVIDIA GPU"
BUILD_HINT = f"TensorRT plans are built on the kind of GPU they run on; {INSTALL_HINT} and run `d2c-export trt` there"
RUN_HINT = f"the trt backend runs TensorRT plans on an NVIDIA GPU ({INSTALL_HINT}); use --backend ort here"
PLATFORM_KEYS = ("version", "gpu", "compute_capability")


def tensorrt_missing() -> str | None:
    """What TensorRT lacks here (the package, a CUDA device), or None. Imports nothing of TensorRT."""
    import torch
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("TensorRT is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA device is visible")
    return " and ".join(missing) or None


def require_tensorrt(purpose: str = BUILD_HINT) -> ModuleType:
    """The `tensorrt` module, imported after checking for a CUDA device; BackendUnavailable (one line) otherwise."""
    reason = tensorrt_missing()
    if reason:
        raise BackendUnavailable(f"{reason}: {purpose}")
    import tensorrt as trt
    return trt


def running_platform(trt: ModuleType, device=None) -> dict:
    """TensorRT version, GPU name and compute capability of this process (a plan runs only where it was built)."""
    if device is None:
        from d2c_export.cuda_device import CudaDevice
        device = CudaDevice()
    gpu, capability = device.gpu()
    return {"version": trt.__version__, "gpu": gpu, "compute_capability": capability}


def platform_mismatch(recorded: dict | None, running: dict) -> str | None:
    """What differs between the platform a plan was built on and this one, or None."""
    recorded = recorded or {}
    diffs = [f"{k} {recorded.get(k)!r} (plan) vs {running[k]!r} (here)" for k in PLATFORM_KEYS
             if str(recorded.get(k)) != str(running[k])]
    return ", ".join(diffs) or None
