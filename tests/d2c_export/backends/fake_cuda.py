"""A CPU stand-in for the CUDA seam of the TensorRT backend (`d2c_export.cuda_device.CudaDevice`).

Device memory is CPU memory that the fake tracks by address, so the fake TensorRT can read and write a
tensor from nothing but the address bound to it, as TensorRT does. The rules it keeps are CUDA's:

- `cudaMalloc` returns memory aligned to at least 256 bytes (CUDA C Programming Guide, "Device Memory
  Accesses": "any address of a variable residing in global memory or returned by one of the memory
  allocation routines from the driver or runtime API is always aligned to at least 256 bytes"); an
  allocation of zero bytes has no address (PyTorch reports `data_ptr() == 0` for every tensor without
  elements, on CPU and CUDA alike).
- Device memory is freed when nothing holds it any more (`cudaFree`): here when the last tensor over an
  allocation is gone, and TensorRT's own memory (`reserve`) when the object that owns it is; `memory_used` counts
  what is live, as the driver's used-memory figure does. Reading freed memory is an error (use after free).
- A CUDA graph is captured on a stream that is not the legacy default stream (CUDA Runtime API,
  `cudaStreamBeginCapture`: capture on the legacy NULL stream is not allowed); work issued while
  capturing is recorded, not run, and `replay` runs what was recorded. `torch.cuda.graph` makes the
  capture stream the current one, so PyTorch work (here `copy`) is captured with it.
- While a stream is capturing, work on another stream of the same capture is an error (CUDA Programming
  Guide, "Stream Capture": with the default `cudaStreamCaptureModeGlobal`, an unjoined stream's or the
  legacy stream's work invalidates the capture), and so is a copy from or to pageable host memory
  ("Prohibited and Unhandled Operations": synchronous host copies are not allowed during capture).
- Work that fails while a stream captures invalidates the capture: `cudaStreamEndCapture` then returns
  `cudaErrorStreamCaptureInvalidated` and no graph (CUDA Runtime API, `cudaStreamEndCapture`); PyTorch's
  `torch.cuda.graph` raises a RuntimeError as it ends the capture. A capture whose work a library reported failed
  (`invalidate_capture(False)`) ends with a graph that must not be replayed.
"""
from __future__ import annotations

import bisect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

ALIGNMENT = 256
RESERVED_BASE = 1 << 52  # addresses of memory only TensorRT touches (above any host address of a 47-bit user space)


class ContractViolation(AssertionError):
    """What real CUDA or TensorRT would refuse or silently get wrong."""


@dataclass
class Allocation:
    start: int
    nbytes: int
    backing: weakref.ref | None  # the host array that holds the bytes; None: memory only TensorRT itself touches
    offset: int = 0  # of `start` in the backing array

    def raw(self) -> Tensor:
        """The allocation's bytes (uint8)."""
        array = None if self.backing is None else self.backing()
        if array is None:
            raise ContractViolation(f"device memory at {self.start:#x} read after it was freed (or memory that only "
                                    "TensorRT itself may touch)")
        return torch.from_numpy(array)[self.offset:self.offset + self.nbytes]


@dataclass
class FakeStream:
    handle: int


@dataclass
class FakeGraph:
    device: "FakeCudaDevice"
    launches: list = field(default_factory=list)  # callables recorded while capturing
    captured: bool = False
    failed: bool = False  # its capture ended, but work in it was reported failed: it must not be used

    def replay(self) -> None:
        if not self.captured:
            raise ContractViolation("replay of a CUDA graph that was never captured")
        if self.failed:
            raise ContractViolation("replay of a CUDA graph whose capture reported a failed enqueue")
        for launch in self.launches:
            launch()
        self.device.replays += 1


class FakeCudaDevice:
    """Memory by address, streams and graph capture, on the CPU."""

    torch_device = "cpu"  # the fake's device memory is host memory

    def __init__(self):
        self.allocations: dict[int, Allocation] = {}  # by start address, live ones only
        self._starts: list[int] = []  # their start addresses, sorted
        self.capturing: tuple[FakeGraph, FakeStream] | None = None
        self.fail_capture = False  # make the next capture fail, as a kernel that cannot be captured does
        self.replays = 0  # graph replays on this device, counted here whatever the backend does
        self.captures = 0  # captures begun on this device
        self._invalidated: bool | None = None  # the running capture: None fine, True invalidated, False reported failed
        self._reserved = RESERVED_BASE
        self._streams = 0
        self.default_stream = FakeStream(0)
        self._current = [self.default_stream]  # the stream `use` (or a capture) made current, innermost last

    # -- memory ---------------------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)  # no address, like a zero-byte device allocation
        array = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)  # freed with the last tensor over it
        raw = torch.from_numpy(array)
        offset = (-raw.data_ptr()) % ALIGNMENT
        start = raw.data_ptr() + offset
        self._add(Allocation(start, nbytes, weakref.ref(array), offset), array)
        return raw[offset:offset + nbytes].view(dtype).view(shape)

    def _add(self, a: Allocation, owner: object) -> None:
        """Track `a` until `owner` is gone."""
        self.allocations[a.start] = a
        bisect.insort(self._starts, a.start)
        weakref.finalize(owner, self._free, a.start)

    def _free(self, start: int) -> None:
        self.allocations.pop(start, None)
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start:
            del self._starts[i]

    def reserve(self, nbytes: int, owner: object) -> int:
        """`nbytes` of device memory that only TensorRT touches (a context's own activation memory), held while
        `owner` lives; its address."""
        start = self._reserved
        self._reserved += -(-max(nbytes, 1) // ALIGNMENT) * ALIGNMENT
        self._add(Allocation(start, nbytes, None), owner)
        return start

    def is_device(self, t: Tensor) -> bool:
        return t.numel() > 0 and self._find(t.data_ptr(), 1) is not None

    def _find(self, address: int, nbytes: int) -> Allocation | None:
        i = bisect.bisect_right(self._starts, address) - 1
        a = self.allocations.get(self._starts[i]) if i >= 0 else None
        if a is None or not a.start <= address < a.start + a.nbytes:
            return None
        return a if address + nbytes <= a.start + a.nbytes else None

    def allocation(self, address: int) -> Allocation:
        """The live allocation that holds `address`."""
        a = self._find(address, 1)
        if a is None:
            raise ContractViolation(f"address {address:#x} is not in a live device allocation")
        return a

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
        return a.raw()[offset:offset + nbytes].view(dtype).view(shape)

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

    def synchronize(self, stream) -> None:
        pass  # the fake runs work when it is issued

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
        self.captures += 1
        self.capturing = (graph, stream)
        self._invalidated = None
        self._current.append(stream)
        try:
            yield graph
        finally:
            self._current.pop()
            self.capturing = None
        invalidated, self._invalidated = self._invalidated, None
        if invalidated:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture "
                               "(cudaErrorStreamCaptureInvalidated)")
        graph.captured = True
        graph.failed = invalidated is False

    def invalidate_capture(self, invalidated: bool = True) -> None:
        """Work issued into the running capture failed: the capture is invalidated (True), or the library that
        issued it reported the failure and the capture still ends with a graph that must not be used (False)."""
        if self.capturing is None:
            raise ContractViolation("invalidate_capture outside a capture")
        self._invalidated = invalidated if self._invalidated is None else self._invalidated

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
        """Bytes of device memory live now (what the driver would count as used)."""
        return sum(a.nbytes for a in list(self.allocations.values()))
