"""One TensorRT plan on the device: `Engine` (bindings per input shape, enqueues, per-call CUDA graphs) and
`DenoiseLoops` (a masked step's denoising steps on the diffusion engine, captured as one graph).

An `Engine` keeps device buffers per input-shape key, allocated once and reused, binds them with
`set_input_shape` + `set_tensor_address` (every return value checked: an address must be non-null and
256-byte aligned, NvInferRuntime.h; a zero-element tensor, whose `data_ptr()` is 0, is bound to a small
aligned dummy allocation), and runs `execute_async_v3` on one non-default stream.

CUDA graphs (stages whose spec says `cuda_graph`: a diffusion step runs 100 times per masked step, a gpt
decode step once per token): TensorRT's guide asks for one execution context per captured graph, so each
shape key of such a stage gets its own context, bound once and never changed, and on the key's second call
its execution is captured and replayed from then on. Those keys live in a bounded LRU (`GRAPH_CACHE` per
engine; `memory_bytes` reports their buffers and context memory). Other stages share one context, rebound
whenever the shape changes. A shape outside the built profile is refused before the context is touched; a
failed bind leaves the context marked unbound, so the next call binds it afresh. A capture that fails turns
graphs off for that engine and drops every graph it captured; an enqueue that fails during capture is an error.

`DenoiseLoops` captures `reference.diffusion.denoise_steps` whole: every step's copies into a binding with
its own context and its `execute_async_v3`, all on the engine's stream and through the device seam, per
feed-shape key in an LRU of `LOOP_CACHE`.

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

from d2c_export.cuda_device import ALIGNMENT
from d2c_export.errors import EngineError
from reference.diffusion import denoise_steps

log = logging.getLogger(__name__)


def device_buffer(device, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A device tensor of `shape` (one without elements has no address; `Engine._address` binds a dummy)."""
    return device.empty(tuple(int(d) for d in shape), dtype)


GRAPH_CACHE = 16  # shape keys with their own context and captured graph, per engine (least recently used go)
LOOP_CACHE = 16  # captured denoising loops (feed-shape keys) per backend
BUFFER_CACHE = 64  # shape keys whose buffers an engine keeps for the shared context


@dataclass
class Binding:
    """The buffers of one input-shape key; for a graph stage also its own context and captured graph."""

    key: tuple
    buffers: dict[str, Tensor]
    context: object | None = None  # own context (graph stages), bound once
    graph: object | None = None
    calls: int = 0


def binding_bytes(b: Binding) -> int:
    return sum(t.numel() * t.element_size() for t in b.buffers.values())


class Engine:
    """One deserialised plan: buffers per input shape, `execute_async_v3` on `stream`, optional CUDA graphs."""

    def __init__(self, trt, device, path: Path, stream, profiles: dict[str, tuple], cuda_graphs: bool = False):
        self.device, self.path, self.stream, self.profiles = device, path, stream, profiles
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot load {path}; rebuild it with `d2c-export trt --engines {path.parent}`")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.cuda_graphs = cuda_graphs
        self.replays = 0
        self._bindings: OrderedDict[tuple, Binding] = OrderedDict()
        self._shared = None  # the context of the keys without their own
        self._shared_key: tuple | None = None  # the key whose shapes and addresses `_shared` holds, if any
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

    def _set_shapes(self, context, buffers: dict[str, Tensor]) -> None:
        for n in self.inputs:
            if not context.set_input_shape(n, tuple(buffers[n].shape)):
                raise EngineError(f"{self.path.name}: TensorRT refused input {n} of shape {tuple(buffers[n].shape)}; "
                                  "re-export with a larger --max-batch")

    def _set_addresses(self, context, buffers: dict[str, Tensor]) -> None:
        for n in self.outputs + self.inputs:
            if not context.set_tensor_address(n, self._address(n, buffers[n])):
                raise EngineError(f"{self.path.name}: TensorRT refused the address of tensor {n}")

    def _bind(self, context, buffers: dict[str, Tensor]) -> None:
        """Shapes and addresses of `buffers` onto `context`, every return value checked."""
        self._set_shapes(context, buffers)
        self._set_addresses(context, buffers)

    def _bind_new(self, context, buffers: dict[str, Tensor]) -> None:
        """Input `buffers` bound on `context`, with output buffers (added) of the shapes TensorRT computes for them."""
        self._set_shapes(context, buffers)
        for n in self.outputs:
            buffers[n] = device_buffer(self.device, tuple(context.get_tensor_shape(n)), self.dtypes[n])
        self._set_addresses(context, buffers)

    def binding(self, shapes: dict[str, tuple[int, ...]], given: dict[str, Tensor] | None = None) -> Binding:
        """The binding of these input shapes, made on first use and reused. The inputs in `given` are bound to those
        tensors (the caller's, e.g. the layers of a KV cache); a graph captured with other tensors is dropped."""
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        b = self._bindings.get(key)
        if b is not None:
            self._bindings.move_to_end(key)
            if given and any(b.buffers[n].data_ptr() != t.data_ptr() for n, t in given.items()):
                b.buffers.update(given)
                b.graph, b.calls = None, 0
                if b.context is not None:
                    self._bind(b.context, b.buffers)
                elif self._shared_key == key:
                    self._shared_key = None
            return b
        if self.cuda_graphs:
            b, limit = self.own_binding(shapes, given), GRAPH_CACHE
        else:
            buffers = self._input_buffers(shapes, given)
            if self._shared is None:
                self._shared = self.engine.create_execution_context()
            self._shared_key = None  # half-updated until the bind below has succeeded
            self._bind_new(self._shared, buffers)
            self._shared_key = key
            b, limit = Binding(key, buffers), BUFFER_CACHE
        self._bindings[key] = b
        while len(self._bindings) > limit:
            old, _ = self._bindings.popitem(last=False)
            self._shared_key = None if self._shared_key == old else self._shared_key
        return b

    def _input_buffers(self, shapes: dict[str, tuple[int, ...]], given: dict[str, Tensor] | None) -> dict[str, Tensor]:
        self._check_shapes(shapes)
        given = given or {}
        return {n: given[n] if n in given else device_buffer(self.device, tuple(shapes[n]), self.dtypes[n])
                for n in self.inputs}

    def own_binding(self, shapes: dict[str, tuple[int, ...]], given: dict[str, Tensor] | None = None) -> Binding:
        """A binding of these input shapes with its own execution context, bound once (for a captured graph),
        outside the LRU: the caller keeps it. Inputs in `given` are bound to those tensors."""
        buffers = self._input_buffers(shapes, given)
        context = self.engine.create_execution_context()
        self._bind_new(context, buffers)
        return Binding(tuple(tuple(shapes[n]) for n in self.inputs), buffers, context)

    def context_bytes(self) -> int:
        """Device memory of one execution context (TensorRT's activation memory)."""
        return int(getattr(self.engine, "device_memory_size_v2", getattr(self.engine, "device_memory_size", 0)))

    def graphs_off(self, reason: str) -> None:
        """Stop capturing and replaying for good (a capture failed): every graph of this engine is dropped."""
        log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.path.name, reason)
        self.cuda_graphs = False
        for other in self._bindings.values():
            other.graph = None

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
            if b.context is None:
                if self._shared_key != b.key:
                    self._shared_key = None
                    self._bind(self._shared, b.buffers)
                    self._shared_key = b.key
                self.enqueue(self._shared)
            elif b.graph is not None or (self.cuda_graphs and b.calls >= 1 and self._capture(b)):
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
                ok = b.context.execute_async_v3(self.device.handle(self.stream))
        except RuntimeError as exc:  # kernels that cannot be captured: run uncaptured from now on
            self.graphs_off(str(exc))
            return False
        if not ok:
            raise EngineError(f"TensorRT failed to run {self.path.name} while capturing a CUDA graph "
                              "(see the TensorRT log above)")
        b.graph = graph
        return True

    def graphs(self) -> list:
        return [b.graph for b in self._bindings.values() if b.graph is not None]

    def memory_bytes(self) -> int:
        """Device memory held for the keys with their own context: their buffers and context memory."""
        own = [b for b in self._bindings.values() if b.context is not None]
        return sum(binding_bytes(b) for b in own) + self.context_bytes() * len(own)


@dataclass
class Loop:
    """One captured denoising loop: its static feeds, the binding its steps run on, the graph and its output."""

    static: dict[str, Tensor]
    binding: Binding
    graph: object
    output: Tensor


class DenoiseLoops:
    """The denoising steps of a masked step on the diffusion engine, captured as one CUDA graph per feed-shape key.

    The graph is `reference.diffusion.denoise_steps` over static feed buffers, each step copying its x, noise, t
    and coefficients into a binding with its own context (z, cfg and temperature are bound to their static buffers
    and never copied) and enqueueing it on `stream`; every piece of work goes through the device seam on the
    capture stream. A key's first call runs that loop once uncaptured (TensorRT's guide: enqueue once before
    capturing), then captures it; every call copies its feeds in and replays. Keys live in an LRU of `limit`.
    """

    BOUND = ("z", "cfg", "temperature")  # the same tensor for every step: bound, not copied

    def __init__(self, cuda, engine: Engine, stream, limit: int = LOOP_CACHE):
        self.cuda, self.engine, self.stream, self.limit = cuda, engine, stream, limit
        (self.output_name,) = engine.outputs
        self.entries: OrderedDict[tuple, Loop] = OrderedDict()
        self.replays = 0

    def __call__(self, feeds: dict[str, Tensor]) -> Tensor | None:
        """x_0 of the masked step, on the device (a fresh tensor); None once the engine runs without graphs (a
        capture failed here or in its per-call graphs): run the steps one by one."""
        if not self.engine.cuda_graphs:
            return None
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in feeds.items())
        loop = self.entries.get(key)
        if loop is None:
            loop = self._capture(feeds)
            if loop is None:
                return None
            self.entries[key] = loop
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
            with self.cuda.use(self.stream):
                self._load(loop, feeds)
        with self.cuda.use(self.stream):
            loop.graph.replay()
            self.replays += 1
            return loop.output.clone()

    def _load(self, loop: Loop, feeds: dict[str, Tensor]) -> None:
        for n, t in feeds.items():
            self.cuda.copy(loop.static[n], t)

    def _body(self, loop: Loop) -> list[bool]:
        """The loop's work on the current stream: every step's copies and enqueue, then the output copied out.
        Returns what each `execute_async_v3` returned (checked by the caller, outside any capture)."""
        b, copy, handle = loop.binding, self.cuda.copy, self.cuda.handle(self.stream)
        enqueued = []

        def step(stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor]:
            for n, t in inputs.items():
                if t.data_ptr() != b.buffers[n].data_ptr():
                    copy(b.buffers[n], t)
            enqueued.append(bool(b.context.execute_async_v3(handle)))
            return (b.buffers[self.output_name],)

        copy(loop.output, denoise_steps(step, loop.static))
        return enqueued

    def _capture(self, feeds: dict[str, Tensor]) -> Loop | None:
        cuda, engine = self.cuda, self.engine
        # the bound feeds in the engine's dtype (the copy in casts), the others in the loop's
        static = {n: device_buffer(cuda, tuple(t.shape), engine.dtypes[n] if n in self.BOUND else t.dtype)
                  for n, t in feeds.items()}
        noise = feeds["noise"]
        step = tuple(noise.shape[1:])
        shapes = {"x": step, "t": (1,), "noise": step, "coefs": tuple(feeds["coefs"].shape[1:]),
                  **{n: tuple(feeds[n].shape) for n in self.BOUND}}
        binding = engine.own_binding(shapes, given={n: static[n] for n in self.BOUND})
        loop = Loop(static, binding, cuda.new_graph(), device_buffer(cuda, step, noise.dtype))
        with cuda.use(self.stream):
            self._load(loop, feeds)
            if not all(self._body(loop)):  # uncaptured once: TensorRT's lazy set-up happens outside the capture
                raise EngineError(f"TensorRT failed to run {engine.path.name} (see the TensorRT log above)")
        try:
            with cuda.capture(loop.graph, self.stream):
                enqueued = self._body(loop)
        except RuntimeError as exc:  # work that cannot be captured: per-step calls from now on
            engine.graphs_off(str(exc))
            self.entries.clear()
            return None
        if not all(enqueued):
            raise EngineError(f"TensorRT failed to run {engine.path.name} while capturing a CUDA graph "
                              "(see the TensorRT log above)")
        return loop

    def memory_bytes(self) -> int:
        """Device memory the captured loops hold: static feeds, outputs, their bindings and contexts."""
        total = 0
        for loop in self.entries.values():
            tensors = {t.data_ptr(): t for t in [*loop.static.values(), loop.output, *loop.binding.buffers.values()]}
            total += sum(t.numel() * t.element_size() for t in tensors.values()) + self.engine.context_bytes()
        return total
