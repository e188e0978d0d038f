"""One TensorRT plan on the device (`Engine`): bindings per input shape, enqueues, per-call CUDA graphs, and the one
scratch allocation its execution contexts share.

Every context is made USER_MANAGED and holds no activation memory of its own: before it runs, the engine hands it
its scratch (`trt_memory.Scratch`), sized for the shapes it is bound to (`attach`). Addresses are bound with
`set_input_shape` + `set_tensor_address`, every return value checked (an address must be non-null and 256-byte
aligned, NvInferRuntime.h; a zero-element tensor, whose `data_ptr()` is 0, is bound to a small aligned dummy
allocation), and `execute_async_v3` runs on one non-default stream.

CUDA graphs (stages whose spec says `cuda_graph`: a diffusion step runs 100 times per masked step, a gpt decode
step once per token): TensorRT's guide asks for one execution context per captured graph, so each shape key of such
a stage gets its own context, bound once and never changed, and on the key's second call its execution is captured
and replayed from then on. Those keys live in a bounded LRU (`GRAPH_CACHE` per engine; `graph_bytes` reports their
buffers). A graph captured before the scratch moved is captured again. The other stages share one context, bound
anew whenever the shape changes, whose buffers are views of one allocation per tensor, grown to the largest shape
seen (`buffer_bytes`). A shape outside the built profile is refused before the context is touched; a failed bind
leaves the context marked unbound, so the next call binds it afresh. A capture that fails, or in which
`execute_async_v3` returns False, turns graphs off for that engine with one warning and drops every graph it
captured; the call runs uncaptured, as trtexec does (`samples/common/sampleInference.cpp`).

The GPU is reached only through a device object (`cuda_device.CudaDevice`) and `tensorrt` only through the
module passed in, so the tests run this code on the CPU under contract fakes.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from d2c_export.backends.trt_memory import (Scratch, give_memory, memory_needed, profile_memory_bytes,
                                            user_managed_context)
from d2c_export.cuda_device import ALIGNMENT
from d2c_export.errors import EngineError

log = logging.getLogger(__name__)

GRAPH_CACHE = 32  # shape keys with their own context and captured graph, per engine (least recently used go)
REFUSED = "execute_async_v3 returned False while capturing"


def device_buffer(device, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A device tensor of `shape` (one without elements has no address; `Engine._address` binds a dummy)."""
    return device.empty(tuple(int(d) for d in shape), dtype)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct device tensors (each address counted once)."""
    distinct = {t.data_ptr(): t for t in tensors if t.numel()}
    return sum(t.numel() * t.element_size() for t in distinct.values())


@dataclass
class Binding:
    """The buffers of one input-shape key and the context bound to them (its own, for a graph stage)."""

    key: tuple | None
    buffers: dict[str, Tensor]
    context: object
    need: int = 0  # activation memory the context needs for these shapes
    given: tuple[int, int] | None = None  # the scratch (address, size) the context was handed
    graph: object | None = None
    calls: int = 0
    borrowed: frozenset[str] = frozenset()  # inputs bound to the caller's tensors (a KV cache), not its own

    def own_bytes(self) -> int:
        return tensor_bytes(t for n, t in self.buffers.items() if n not in self.borrowed)


class Engine:
    """One deserialised plan: buffers per input shape, `execute_async_v3` on `stream`, optional CUDA graphs."""

    def __init__(self, trt, runtime, device, path: Path, stream, profiles: dict[str, tuple], cuda_graphs: bool = False):
        self.trt, self.device, self.path, self.stream, self.profiles = trt, device, path, stream, profiles
        before = device.memory_used() or 0
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot load {path}; rebuild it with `d2c-export trt --engines {path.parent}`")
        self.weight_bytes = max(0, (device.memory_used() or 0) - before)  # what loading the plan took on the device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.graph_stage = cuda_graphs  # its keys get their own contexts (and graphs while `cuda_graphs`)
        self.cuda_graphs = cuda_graphs  # capturing and replaying (off for good once a capture failed)
        self.replays = 0
        self.scratch = Scratch(device, stream, profile_memory_bytes(self.engine))
        self._bindings: OrderedDict[tuple, Binding] = OrderedDict()  # graph stages: own context per key
        self._shared: Binding | None = None  # other stages: one context, bound anew when the shape changes
        self._arenas: dict[str, Tensor] = {}  # ...its buffers: one allocation per tensor, the largest seen
        self._dummy = device.empty((ALIGNMENT,), torch.uint8)  # the address of zero-element tensors

    # -- binding ------------------------------------------------------------------------------------------
    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for n in self.inputs:
            if n in self.profiles:
                lo, _, hi = self.profiles[n]
                if len(shapes[n]) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi)):
                    raise EngineError(f"{self.path.name}: input {n} of shape {tuple(shapes[n])} is outside the built "
                                      f"profile ({tuple(lo)} to {tuple(hi)}); re-export with a larger --max-batch")

    def _address(self, name: str, t: Tensor) -> int:
        if t.numel() == 0:
            return self._dummy.data_ptr()
        address = t.data_ptr()
        if address % ALIGNMENT:
            raise EngineError(f"{self.path.name}: tensor {name} at {address:#x} is not {ALIGNMENT}-byte aligned, "
                              "which TensorRT requires")
        return address

    def _set_shapes(self, context, shapes: dict[str, tuple[int, ...]]) -> None:
        for n in self.inputs:
            if not context.set_input_shape(n, tuple(shapes[n])):
                raise EngineError(f"{self.path.name}: TensorRT refused input {n} of shape {tuple(shapes[n])}; "
                                  "re-export with a larger --max-batch")

    def _set_addresses(self, context, buffers: dict[str, Tensor]) -> None:
        for n in self.outputs + self.inputs:
            if not context.set_tensor_address(n, self._address(n, buffers[n])):
                raise EngineError(f"{self.path.name}: TensorRT refused the address of tensor {n}")

    def binding(self, shapes: dict[str, tuple[int, ...]], given: dict[str, Tensor] | None = None) -> Binding:
        """The binding of these input shapes: a graph stage's own (made on first use, kept in the LRU), else the
        shared context bound to them. The inputs in `given` are bound to those tensors (the caller's, e.g. the
        layers of a KV cache); a graph captured with other tensors is dropped."""
        if not self.graph_stage:
            return self._shared_binding(shapes)
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        b = self._bindings.get(key)
        if b is not None:
            self._bindings.move_to_end(key)
            if given and any(b.buffers[n].data_ptr() != t.data_ptr() for n, t in given.items()):
                b.buffers.update(given)
                b.graph, b.calls = None, 0
                self._set_addresses(b.context, b.buffers)
            return b
        b = self.own_binding(shapes, given)
        self._bindings[key] = b
        while len(self._bindings) > GRAPH_CACHE:
            self._bindings.popitem(last=False)
        return b

    def own_binding(self, shapes: dict[str, tuple[int, ...]], given: dict[str, Tensor] | None = None) -> Binding:
        """A binding of these input shapes with its own execution context, bound once (for a captured graph),
        outside the LRU: the caller keeps it. Inputs in `given` are bound to those tensors."""
        self._check_shapes(shapes)
        given = given or {}
        buffers = {n: given[n] if n in given else device_buffer(self.device, shapes[n], self.dtypes[n])
                   for n in self.inputs}
        context = user_managed_context(self.trt, self.engine)
        self._set_shapes(context, shapes)
        for n in self.outputs:
            buffers[n] = device_buffer(self.device, tuple(context.get_tensor_shape(n)), self.dtypes[n])
        self._set_addresses(context, buffers)
        return Binding(tuple(tuple(shapes[n]) for n in self.inputs), buffers, context,
                       need=memory_needed(context, self.engine), borrowed=frozenset(given))

    def _arena(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A view of `shape` at the start of the tensor's one allocation, grown (moved) when too small."""
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        arena = self._arenas.get(name)
        if nbytes == 0:
            return device_buffer(self.device, shape, dtype)
        if arena is None or arena.numel() < nbytes:
            self._arenas.pop(name, None)  # the old one goes back before the new one is taken
            with self.device.use(self.stream):
                arena = self._arenas[name] = device_buffer(self.device, (nbytes,), torch.uint8)
        return arena[:nbytes].view(dtype).view(shape)

    def _shared_binding(self, shapes: dict[str, tuple[int, ...]]) -> Binding:
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        self._check_shapes(shapes)
        if self._shared is None:
            self._shared = Binding(None, {}, user_managed_context(self.trt, self.engine))
        b = self._shared
        if b.key == key:
            return b
        b.key = None  # half-bound until the bind below has succeeded
        self._set_shapes(b.context, shapes)
        buffers = {n: self._arena(n, shapes[n], self.dtypes[n]) for n in self.inputs}
        for n in self.outputs:
            buffers[n] = self._arena(n, tuple(b.context.get_tensor_shape(n)), self.dtypes[n])
        self._set_addresses(b.context, buffers)
        b.buffers, b.need, b.key = buffers, memory_needed(b.context, self.engine), key
        return b

    def attach(self, b: Binding) -> bool:
        """Hand `b`'s context the engine's scratch, large enough for its shapes; True when that is memory it did not
        hold (so a graph captured with what it held before must not replay)."""
        self.scratch.fit(b.need)
        memory = (self.scratch.address, self.scratch.size)
        if b.given == memory:
            return False
        give_memory(b.context, *memory)
        b.given = memory
        return True

    def graphs_off(self, reason: str) -> None:
        """Stop capturing and replaying for good (a capture failed): every graph of this engine is dropped."""
        if self.cuda_graphs:
            log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.path.name, reason)
        self.cuda_graphs = False
        for other in self._bindings.values():
            other.graph = None

    def drop_bindings(self) -> None:
        """Forget every shape key (their contexts, graphs and buffers), e.g. when the tensors given to them go."""
        self._bindings.clear()

    # -- running ------------------------------------------------------------------------------------------
    def enqueue(self, context) -> None:
        if not context.execute_async_v3(self.device.handle(self.stream)):
            raise EngineError(f"TensorRT failed to run {self.path.name} (see the TensorRT log above)")

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run on `self.stream` (the caller orders it); returns the output buffers of this shape (reused).

        A feed that is the bound buffer itself (see `binding`) is not copied.
        """
        b = self.binding({n: tuple(feeds[n].shape) for n in self.inputs})
        with self.device.use(self.stream):
            for n in self.inputs:
                t = feeds[n]
                if t.numel() and not (self.device.is_device(t) and t.data_ptr() == b.buffers[n].data_ptr()):
                    self.device.copy(b.buffers[n], t)
            if self.attach(b):
                b.graph, b.calls = None, 0  # new memory: run once uncaptured, then capture again
            if b.graph is not None or (self.cuda_graphs and self.graph_stage and b.calls >= 1 and self._capture(b)):
                b.graph.replay()
                self.replays += 1
            else:
                self.enqueue(b.context)
            b.calls += 1
        return {n: b.buffers[n] for n in self.outputs}

    def _capture(self, b: Binding) -> bool:
        """Capture one execution of `b`'s own context; False (graphs off for this engine) when capture fails."""
        graph = self.device.new_graph()
        try:
            with self.device.capture(graph, self.stream):
                enqueued = bool(b.context.execute_async_v3(self.device.handle(self.stream)))
        except RuntimeError as exc:  # kernels that cannot be captured: the capture was invalidated
            self.graphs_off(str(exc))
            return False
        if not enqueued:  # the graph misses that execution: never replay it
            self.graphs_off(REFUSED)
            return False
        b.graph = graph
        return True

    def graphs(self) -> list:
        return [b.graph for b in self._bindings.values() if b.graph is not None]

    def graph_bytes(self) -> int:
        """Device memory of the keys with their own context (their buffers; their activations are the scratch)."""
        return sum(b.own_bytes() for b in self._bindings.values())

    def buffer_bytes(self) -> int:
        """Device memory of the shared context's buffers (and the dummy address)."""
        return tensor_bytes([*self._arenas.values(), self._dummy])

    def close(self) -> None:
        """Give back every context, graph and buffer, the scratch and the plan (the stream's work must be done)."""
        self._bindings.clear()
        self._shared = None
        self._arenas.clear()
        self.scratch.release()
        self._dummy = None
        self.engine = None
        self.cuda_graphs = False
