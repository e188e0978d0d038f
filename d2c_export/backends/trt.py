"""The TensorRT backend: one `Engine` per plan, and `TrtBackend`, whose `run` feeds the stage's engine.

An `Engine` keeps device buffers per input-shape key, allocated once and reused, binds them with
`set_input_shape` + `set_tensor_address` (every return value checked: an address must be non-null and
256-byte aligned, NvInferRuntime.h; a zero-element tensor, whose `data_ptr()` is 0, is bound to a small
aligned dummy allocation), and runs `execute_async_v3` on one non-default stream.

CUDA graphs (stages whose spec says `cuda_graph`: a diffusion step runs 100 times per masked step, a gpt
decode step once per token): TensorRT's guide asks for one execution context per captured graph, so each
shape key of such a stage gets its own context, bound once and never changed, and on the key's second call
its execution is captured and replayed from then on. Those keys live in a bounded LRU (`GRAPH_CACHE` per
engine; `TrtBackend.graph_memory_bytes` reports their buffers and context memory). Other stages share one
context, rebound whenever the shape changes. A shape outside the built profile is refused before the
context is touched; a failed bind leaves the context marked unbound, so the next call binds it afresh. A
capture that fails turns graphs off for that engine and drops every graph it captured; an enqueue that
fails during capture is an error.

Host copies: `TrtBackend` returns tensors on the device its first input came from. The shared loop in
`reference/pipeline.py` keeps its state on the backend's `device`, so a stage call copies its device inputs
into the engine's buffers (device to device) and its outputs out of them, and nothing crosses the bus but
the draws. The gpt KV cache is bound in place: `gpt_cache` hands out device buffers bound as the engine's
inputs (each layer on its own 256-byte boundary). The denoising steps of a masked step replay the per-step
graph one step at a time (one whole-loop graph is PyTorch's, `backends.graphs`).

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

from d2c_export.backends.base import Backend, check_graph_io
from d2c_export.backends.cuda_device import ALIGNMENT
from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.export.manifest import StageEntry
from d2c_export.export.trt_build import input_profiles
from d2c_export.targets import BackendName, Precision, Target
from d2c_export.trt_platform import RUN_HINT, platform_mismatch, require_tensorrt, running_platform, tensorrt_missing
from reference.gpt import cache_feeds

log = logging.getLogger(__name__)


def trt_usable(engines: Engines, precision: Precision) -> bool:
    """Plans of `precision` exist, TensorRT is installed and a CUDA device is visible (what `auto` asks)."""
    return engines.has(Target(BackendName.TRT, precision).kind) and tensorrt_missing() is None


def check_plan(engines: Engines, stage: str, entry: StageEntry, running: dict) -> None:
    """Refuse a plan built by another TensorRT or GPU, or from a graph that was re-exported since."""
    kind = f"trt-{entry.precision}"
    diff = platform_mismatch(entry.tensorrt, running)
    if diff:
        raise EngineError(f"{engines.directory / entry.main_file} was built for another TensorRT/GPU ({diff}); "
                          f"rebuild with `{engines.rebuild_command(kind)}`")
    info = entry.tensorrt or {}
    source = engines.manifest.stages.get(stage, {}).get(f"onnx-{entry.precision}")
    if source is not None and source.files.get(info.get("onnx")) != info.get("onnx_sha256"):
        raise EngineError(f"{engines.directory / entry.main_file} was built from an older {info.get('onnx')}; "
                          f"rebuild with `{engines.rebuild_command(kind)}`")


def device_buffer(device, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A device tensor of `shape` (one without elements has no address; `Engine._address` binds a dummy)."""
    return device.empty(tuple(int(d) for d in shape), dtype)


GRAPH_CACHE = 16  # shape keys with their own context and captured graph, per engine (least recently used go)
BUFFER_CACHE = 64  # shape keys whose buffers an engine keeps for the shared context


@dataclass
class Binding:
    """The buffers of one input-shape key; for a graph stage also its own context and captured graph."""

    key: tuple
    buffers: dict[str, Tensor]
    context: object | None = None  # own context (graph stages), bound once
    graph: object | None = None
    calls: int = 0


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
        self._check_shapes(shapes)
        buffers = {n: (given or {}).get(n) if n in (given or {}) else
                   device_buffer(self.device, tuple(shapes[n]), self.dtypes[n]) for n in self.inputs}
        if self.cuda_graphs:
            context = self.engine.create_execution_context()
            self._bind_new(context, buffers)
            b, limit = Binding(key, buffers, context), GRAPH_CACHE
        else:
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

    # -- running ------------------------------------------------------------------------------------------
    def _enqueue(self, context) -> None:
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
                    b.buffers[n].copy_(t, non_blocking=True)
            if b.context is None:
                if self._shared_key != b.key:
                    self._shared_key = None
                    self._bind(self._shared, b.buffers)
                    self._shared_key = b.key
                self._enqueue(self._shared)
            elif b.graph is not None or (self.cuda_graphs and b.calls >= 1 and self._capture(b)):
                b.graph.replay()
                self.replays += 1
            else:
                self._enqueue(b.context)
            b.calls += 1
        return {n: b.buffers[n] for n in self.outputs}

    def _capture(self, b: Binding) -> bool:
        """Capture one execution of `b`'s own context; False (graphs off for this engine) when capture fails."""
        graph = self.device.new_graph()
        try:
            with self.device.capture(graph, self.stream):
                ok = b.context.execute_async_v3(self.device.handle(self.stream))
        except RuntimeError as exc:  # kernels that cannot be captured: run uncaptured from now on
            log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", self.path.name, exc)
            self.cuda_graphs = False
            for other in self._bindings.values():
                other.graph = None
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
        per_context = int(getattr(self.engine, "device_memory_size_v2", getattr(self.engine, "device_memory_size", 0)))
        own = [b for b in self._bindings.values() if b.context is not None]
        return sum(t.numel() * t.element_size() for b in own for t in b.buffers.values()) + per_context * len(own)


def aligned_cache(device, n_layer: int, rows: int, n_head: int, slots: int, head_dim: int) -> Tensor:
    """A zeroed (L, rows, H, S, hd) cache whose every layer starts on an ALIGNMENT-byte boundary."""
    layer = rows * n_head * slots * head_dim
    stride = -(-layer * 4 // ALIGNMENT) * ALIGNMENT // 4  # float32 elements per layer, rounded up
    flat = device.empty((n_layer * stride,), torch.float32)
    flat.zero_()
    return flat.as_strided((n_layer, rows, n_head, slots, head_dim),
                           (stride, n_head * slots * head_dim, slots * head_dim, head_dim, 1))


class TrtBackend(Backend):
    """The plans of `precision` in an engines directory on TensorRT; the loop's tensors live on the device seam's
    `torch_device` (CUDA; host memory under the tests' fake)."""

    def __init__(self, engines: Engines, precision: Precision = Precision.FP16, trt=None, device=None):
        trt = trt or require_tensorrt(RUN_HINT)  # checks for a CUDA device before any TensorRT object exists
        if device is None:
            from d2c_export.backends.cuda_device import CudaDevice
            device = CudaDevice()
        self.cuda = device
        self.device = device.torch_device
        self.target = Target(BackendName.TRT, precision)
        self.config = engines.config
        self.max_batch = engines.max_batch
        self.running = running_platform(trt, device)
        self.stream = device.new_stream()  # non-default: execute_async_v3 and graph capture need one
        self.engines: dict[str, Engine] = {}
        self._gpt_caches: dict[int, tuple[Tensor, Tensor]] = {}  # rows -> stacked k, v bound layer by layer
        for spec in engines.specs():
            entry = engines.entry(spec.name, self.target.kind)  # files present, sha256 matches
            check_plan(engines, spec.name, entry, self.running)
            engine = Engine(trt, device, engines.file(spec.name, self.target.kind), self.stream, input_profiles(entry),
                            spec.cuda_graph)
            check_graph_io(engine.path, spec.name, self.config,
                           [(n, len(engine.engine.get_tensor_shape(n))) for n in engine.inputs],
                           [(n, len(engine.engine.get_tensor_shape(n))) for n in engine.outputs],
                           engines.rebuild_command(self.target.kind))
            self.engines[spec.name] = engine
        self.description = f"TensorRT {trt.__version__} ({precision.value}) on {self.running['gpu']}"

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        """Zeroed device caches for `rows` whose layers are the gpt engine's bound inputs: decode steps read them
        in place, with no copy, and the loop writes each step's keys and values into them (KiB per step)."""
        if rows not in self._gpt_caches:
            g = self.config.gpt
            k, v = (aligned_cache(self.cuda, g.n_layer, rows, g.n_head, g.max_seq_len, g.head_dim) for _ in "kv")
            layers = cache_feeds(k, v)
            shapes = {"ids": (rows, 1), "input_pos": (1,), **{n: tuple(t.shape) for n, t in layers.items()}}
            self.engines["gpt"].binding(shapes, given=layers)
            self._gpt_caches[rows] = (k, v)
        k, v = self._gpt_caches[rows]
        k.zero_()
        v.zero_()
        return k, v

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        cuda = self.cuda
        on_host = not cuda.is_device(next(iter(inputs.values())))  # the caller's own data, not a gpt_cache buffer
        cuda.wait(self.stream, cuda.current_stream())  # inputs made on the caller's stream
        out = self.engines[stage].run(inputs)
        with cuda.use(self.stream):
            results = [cuda.to_host(out[name]) if on_host else out[name].clone() for name in self.output_names(stage)]
        caller = cuda.current_stream()
        cuda.wait(caller, self.stream)
        for r in results:
            if cuda.is_device(r):
                cuda.record(r, caller)  # made on self.stream, used on the caller's
        return tuple(results)

    def graph_replays(self) -> dict[str, int]:
        """CUDA graph replays so far, per stage."""
        return {name: e.replays for name, e in self.engines.items()}

    def graph_memory_bytes(self) -> int:
        """Device memory held by the graph caches (buffers and contexts of the captured keys)."""
        return sum(e.memory_bytes() for e in self.engines.values())
