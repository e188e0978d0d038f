"""The TensorRT backend: one `Engine` per plan, and `TrtBackend`, whose `run` feeds the stage's engine.

Each `Engine` keeps device buffers (torch CUDA tensors) per input shape, allocated once and reused,
binds them with `set_input_shape` + `set_tensor_address`, and runs `execute_async_v3` on one
non-default CUDA stream. Stages whose spec says `cuda_graph` run the same shape over and over (a diffusion
step 100 times per masked step, a gpt decode step per token): the second call of a shape captures a
CUDA graph and every later call replays it; inputs are copied into the bound buffers first.

Host copies: `TrtBackend` returns tensors on the device its first input came from. The shared loop in
`reference/pipeline.py` keeps its state on the CPU (the seeded draws, the discrete sampling from the
gpt logits, the scatter of predicted tokens), so under it every stage call copies its inputs to the
GPU and its outputs back; a caller holding CUDA tensors gets CUDA tensors and no host round trip.
The gpt KV cache is the exception: `gpt_cache` hands out the engine's bound device buffers, so the
cache (up to hundreds of MB at batch 16) never crosses the bus; only each step's keys and values do.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from d2c_export.backends.base import Backend
from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.export.manifest import StageEntry
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
    """A CUDA tensor of `shape`; an empty one still has a valid address (TensorRT binds it like any other)."""
    if all(shape):
        return device.empty(shape, dtype)
    return device.empty((1,), dtype)[:0].view(shape)


class Engine:
    """One deserialised plan: buffers per input shape, `execute_async_v3` on `stream`, optional CUDA graphs."""

    def __init__(self, trt, device, path: Path, stream, cuda_graphs: bool = False):
        self.device = device
        self.path = path
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot load {path}; rebuild it with `d2c-export trt --engines {path.parent}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                  trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in names}
        self.stream = stream
        self.cuda_graphs = cuda_graphs
        self._buffers: dict[tuple, dict[str, Tensor]] = {}
        self._graphs: dict[tuple, object] = {}
        self._calls: dict[tuple, int] = {}
        self._bound: tuple | None = None

    def buffers(self, shapes: dict[str, tuple[int, ...]], given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The device buffers bound for these input shapes, allocated on first use and then reused. The inputs in
        `given` are bound to those tensors instead (the caller's, e.g. views of one stacked cache); a CUDA graph
        captured with other buffers for these shapes is dropped."""
        key = tuple(tuple(shapes[n]) for n in self.inputs)
        if key not in self._buffers:
            return self._allocate(key, shapes, given)
        buffers = self._buffers[key]
        if any(buffers[n].data_ptr() != t.data_ptr() for n, t in (given or {}).items()):
            buffers.update(given)
            self._graphs.pop(key, None)
            self._calls.pop(key, None)
            self._bound = None
        return buffers

    def _allocate(self, key: tuple, shapes: dict[str, tuple[int, ...]],
                  given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        given = given or {}
        buffers = {n: given[n] if n in given else device_buffer(self.device, tuple(shapes[n]), self.dtypes[n]) for n in self.inputs}
        for n in self.inputs:
            if not self.context.set_input_shape(n, tuple(shapes[n])):
                raise EngineError(f"{self.path.name}: input {n} of shape {tuple(shapes[n])} is outside the "
                                  f"built profile; rebuild with a larger --max-batch")
        for n in self.outputs:
            buffers[n] = device_buffer(self.device, tuple(self.context.get_tensor_shape(n)), self.dtypes[n])
        self._buffers[key] = buffers
        self._bound = None
        return buffers

    def _bind(self, key: tuple) -> None:
        buffers = self._buffers[key]
        for n in self.inputs:
            self.context.set_input_shape(n, tuple(buffers[n].shape))
        for n, t in buffers.items():
            self.context.set_tensor_address(n, t.data_ptr())
        self._bound = key

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.device.handle(self.stream)):
            raise EngineError(f"TensorRT failed to run {self.path.name} (see the TensorRT log above)")

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run on `self.stream` (the caller orders it); returns the output buffers of this shape (reused).

        A feed that is the bound buffer itself (see `buffers`) is not copied.
        """
        key = tuple(tuple(feeds[n].shape) for n in self.inputs)
        buffers = self.buffers({n: tuple(feeds[n].shape) for n in self.inputs})
        with self.device.use(self.stream):
            for n in self.inputs:
                if not (self.device.is_device(feeds[n]) and feeds[n].data_ptr() == buffers[n].data_ptr()):
                    buffers[n].copy_(feeds[n], non_blocking=True)
            graph = self._graphs.get(key)
            if graph is not None:
                graph.replay()
                return {n: buffers[n] for n in self.outputs}
            if self._bound != key:
                self._bind(key)
            self._execute()
            self._calls[key] = self._calls.get(key, 0) + 1
            if self.cuda_graphs and self._calls[key] == 2:
                self._capture(key)
        return {n: buffers[n] for n in self.outputs}

    def _capture(self, key: tuple) -> None:
        """Capture one execution of the bound shape; later calls of that shape replay it."""
        graph = self.device.new_graph()
        try:
            with self.device.capture(graph, self.stream):
                self._execute()
        except RuntimeError as exc:  # a plan whose kernels cannot be captured still runs uncaptured
            log.warning("%s: CUDA graph capture failed (%s); running without graphs", self.path.name, exc)
            self.cuda_graphs = False
            return
        self._graphs[key] = graph


class TrtBackend(Backend):
    """The plans of `precision` in an engines directory on TensorRT."""

    device = "cuda"

    def __init__(self, engines: Engines, precision: Precision = Precision.FP16, trt=None, device=None):
        trt = trt or require_tensorrt(RUN_HINT)  # checks for a CUDA device before any TensorRT object exists
        if device is None:
            from d2c_export.backends.cuda_device import CudaDevice
            device = CudaDevice()
        self.cuda = device
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
            self.engines[spec.name] = Engine(trt, device, engines.file(spec.name, self.target.kind), self.stream,
                                             spec.cuda_graph)
        self.description = f"TensorRT {trt.__version__} ({precision.value}) on {self.running['gpu']}"

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        """Zeroed device caches for `rows` whose layers are the gpt engine's bound inputs: decode steps read them
        in place, with no copy, and the loop writes each step's keys and values into them (KiB per step)."""
        if rows not in self._gpt_caches:
            shape = (self.config.gpt.n_layer, rows, self.config.gpt.n_head, self.config.gpt.max_seq_len,
                     self.config.gpt.head_dim)
            k, v = self.cuda.empty(shape, torch.float32), self.cuda.empty(shape, torch.float32)
            layers = cache_feeds(k, v)
            shapes = {"ids": (rows, 1), "input_pos": (1,), **{n: tuple(t.shape) for n, t in layers.items()}}
            self.engines["gpt"].buffers(shapes, given=layers)
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
