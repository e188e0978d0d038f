"""The CUDA seam of the TensorRT backend: device memory, streams and CUDA graphs, through torch.cuda.

`TrtBackend` touches the GPU only through a device object of this shape, so its real code also runs
on the CPU under the contract fake of the tests (`tests/d2c_export/backends/fake_cuda.py`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor

ALIGNMENT = 256  # bytes: TensorRT's alignment of every tensor address (NvInferRuntime.h, setTensorAddress)


class CudaDevice:
    """torch.cuda behind the methods the TensorRT backend and the CUDA graphs of PyTorch stages call."""

    torch_device = "cuda"  # where tensors on this device live, as torch names it

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, device="cuda")

    def is_device(self, t: Tensor) -> bool:
        return t.is_cuda

    def to_host(self, t: Tensor) -> Tensor:
        return t.to("cpu")

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """`dst` <- `src` on the current stream, without waiting (captured when the stream is being captured)."""
        dst.copy_(src, non_blocking=True)

    def new_stream(self):
        return torch.cuda.Stream()

    def current_stream(self):
        return torch.cuda.current_stream()

    def handle(self, stream) -> int:
        return stream.cuda_stream

    def use(self, stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def wait(self, waiter, other) -> None:
        waiter.wait_stream(other)

    def record(self, t: Tensor, stream) -> None:
        t.record_stream(stream)

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def capture(self, graph, stream) -> AbstractContextManager:
        return torch.cuda.graph(graph, stream=stream)

    def capture_call(self, graph, stream, fn) -> Tensor:
        """Capture `fn()` into `graph` on `stream`; its output tensor, which each replay rewrites."""
        with torch.cuda.graph(graph, stream=stream):
            return fn()

    def reserved_bytes(self) -> int:
        """Bytes PyTorch's caching allocator holds on the device (graph pools included)."""
        return torch.cuda.memory_reserved()

    def gpu(self) -> tuple[str, str]:
        """The GPU's name and compute capability ("9.0")."""
        major, minor = torch.cuda.get_device_capability(0)
        return torch.cuda.get_device_name(0), f"{major}.{minor}"

    def memory_used(self) -> int | None:
        """Bytes in use on the device as the driver counts them (every allocator, TensorRT's included)."""
        free, total = torch.cuda.mem_get_info()
        return total - free
