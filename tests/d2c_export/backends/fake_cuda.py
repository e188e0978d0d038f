"""A CPU stand-in for the CUDA seam of the TensorRT backend (`d2c_export.cuda_device.CudaDevice`).

Device memory is CPU memory that the fake tracks by address, so the fake TensorRT can read and write a
tensor from nothing but the address bound to it, as TensorRT does. The rules it keeps are CUDA's:

- `cudaMalloc` returns memory aligned to at least 256 bytes (CUDA C Programming Guide, "Device Memory
  Accesses": "any address of a variable residing in global memory or returned by one of the memory
  allocation routines from the driver or runtime API is always aligned to at least 256 bytes"); an
  allocation of zero bytes has no address (PyTorch reports `data_ptr() == 0` for every tensor without
  elements, on CPU and CUDA alike).
- A CUDA graph is captured on a stream that is not the legacy default stream (CUDA Runtime API,
  `cudaStreamBeginCapture`: capture on the legacy NULL stream is not allowed); work issued while
  capturing is recorded, not run, and `replay` runs what was recorded. `torch.cuda.graph` makes the
  capture stream the current one, so PyTorch work (here `copy`) is captured with it.
- While a stream is capturing, work on another stream of the same capture is an error (CUDA Programming
  Guide, "Stream Capture": with the default `cudaStreamCaptureModeGlobal`, an unjoined stream's or the
  legacy stream's work invalidates the capture), and so is a copy from or to pageable host memory
  ("Prohibited and Unhandled Operations": synchronous host copies are not allowed during capture).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

ALIGNMENT = 256


class ContractViolation(AssertionError):
    """What real CUDA or TensorRT would refuse or silently get wrong."""


def _uses(raw: Tensor) -> int:
    """How many holders use the memory under `raw` (PyTorch's count of its storage's references)."""
    return torch._C._storage_Use_Count(raw.untyped_storage()._cdata)


@dataclass
class Allocation:
    start: int
    nbytes: int
    raw: Tensor  # uint8, holds the bytes
    own: int = 0  # uses of its memory that are the fake's own (`raw` and what it was cut from)


@dataclass
class FakeStream:
    handle: int


@dataclass
class FakeGraph:
    device: "FakeCudaDevice"
    launches: list = field(default_factory=list)  # callables recorded while capturing
    captured: bool = False

    def replay(self) -> None:
        if not self.captured:
            raise ContractViolation("replay of a CUDA graph that was never captured")
        for launch in self.launches:
            launch()
        self.device.replays += 1


class FakeCudaDevice:
    """Memory by address, streams and graph capture, on the CPU."""

    torch_device = "cpu"  # the fake's device memory is host memory

    def __init__(self):
        self.allocations: list[Allocation] = []
        self.capturing: tuple[FakeGraph, FakeStream] | None = None
        self.fail_capture = False  # make the next capture fail, as a kernel that cannot be captured does
        self.replays = 0  # graph replays on this device, counted here whatever the backend does
        self._streams = 0
        self.default_stream = FakeStream(0)
        self._current = [self.default_stream]  # the stream `use` (or a capture) made current, innermost last

    # -- memory ---------------------------------------------------------------------------------------
    def _collect(self) -> list[Allocation]:
        """Forget the allocations nothing but this fake holds any more: their memory is freed, as PyTorch frees a
        device tensor's memory with its last reference (an access to it after that is out of bounds)."""
        self.allocations = [a for a in self.allocations if _uses(a.raw) > a.own]
        return self.allocations

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)  # no address, like a zero-byte device allocation
        self._collect()
        raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
        offset = (-raw.data_ptr()) % ALIGNMENT
        raw = raw[offset:offset + nbytes]
        self.allocations.append(Allocation(raw.data_ptr(), nbytes, raw, _uses(raw)))
        return raw.view(dtype).view(shape)

    def is_device(self, t: Tensor) -> bool:
        return t.numel() > 0 and self._find(t.data_ptr(), 1) is not None

    def _find(self, address: int, nbytes: int) -> Allocation | None:
        for a in self.allocations:
            if a.start <= address < a.start + a.nbytes:
                return a if address + nbytes <= a.start + a.nbytes else None
        return None

    def view(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The device memory at `address` as a contiguous tensor (what a kernel reads or writes there)."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        a = self._find(address, nbytes)
        if a is None:
            raise ContractViolation(f"{nbytes} bytes at address {address:#x} are not inside one device allocation "
                                    f"(an out-of-bounds access, or host memory handed to the device)")
        offset = address - a.start
        return a.raw[offset:offset + nbytes].view(dtype).view(shape)

    def to_host(self, t: Tensor) -> Tensor:
        return t.clone()

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """`dst.copy_(src)` on the current stream: recorded while that stream is capturing, else done now."""
        if self.capturing is None:
            dst.copy_(src)
            return
        graph, stream = self.capturing
        if self.current_stream() is not stream:
            raise ContractViolation("a copy on another stream while a stream is capturing (it would invalidate the "
                                    "capture): issue the graph's work on the capture stream")
        for what, t in (("source", src), ("destination", dst)):
            if t.numel() and not self.is_device(t):
                raise ContractViolation(f"a captured copy whose {what} is host memory (not allowed during capture)")
        graph.launches.append(lambda: dst.copy_(src))

    # -- streams ----------------------------------------------------------------------------------------
    def new_stream(self) -> FakeStream:
        self._streams += 1
        return FakeStream(self._streams)

    def current_stream(self) -> FakeStream:
        return self._current[-1]

    def handle(self, stream: FakeStream) -> int:
        return stream.handle

    @contextmanager
    def use(self, stream: FakeStream):
        self._current.append(stream)
        try:
            yield
        finally:
            self._current.pop()

    def wait(self, waiter, other) -> None:
        pass

    def record(self, t: Tensor, stream) -> None:
        pass

    # -- graphs -----------------------------------------------------------------------------------------
    def new_graph(self) -> FakeGraph:
        return FakeGraph(self)

    @contextmanager
    def capture(self, graph: FakeGraph, stream: FakeStream):
        if stream.handle == 0:
            raise ContractViolation("CUDA graph capture on the legacy default stream")
        if self.capturing is not None:
            raise ContractViolation("nested CUDA graph capture")
        if self.fail_capture:
            self.fail_capture = False
            raise RuntimeError("operation not permitted when stream is capturing")
        self.capturing = (graph, stream)
        self._current.append(stream)
        try:
            yield graph
        finally:
            self._current.pop()
            self.capturing = None
        graph.captured = True

    def capture_call(self, graph: FakeGraph, stream: FakeStream, fn):
        """Capture of PyTorch work: the callable runs once now and again on every replay, writing into the
        output tensor it returned the first time (a replay rewrites the captured output in place); so a
        replay sees only what is in the tensors the callable closed over, as a real graph does."""
        with self.capture(graph, stream):
            output = fn()
            outputs = output if isinstance(output, tuple) else (output,)

            def launch():
                again = fn()
                for o, a in zip(outputs, again if isinstance(again, tuple) else (again,)):
                    o.copy_(a)
            graph.launches.append(launch)
        return output

    def reserved_bytes(self) -> int:
        return self.memory_used()

    def gpu(self) -> tuple[str, str]:
        return "Fake GPU (CPU memory)", "9.0"

    def memory_used(self) -> int:
        """Bytes of the allocations still held."""
        return sum(a.nbytes for a in self._collect())
