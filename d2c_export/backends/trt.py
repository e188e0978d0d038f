"""The TensorRT backend: `TrtBackend`, whose `run` feeds each stage's plan (`trt_engine.Engine`).

Plans are checked before use (built by this TensorRT on this GPU, from the graph the manifest has now), and
each plan's inputs and outputs must be its stage's.

Host copies: `TrtBackend` returns tensors on the device its first input came from. The shared loop in
`reference/pipeline.py` keeps its state on the backend's `device`, so a stage call copies its device inputs
into the engine's buffers (device to device) and its outputs out of them, and nothing crosses the bus but
the draws. The gpt KV cache is bound in place: `gpt_cache` hands out views of one device cache, allocated for
the most rows asked so far (a power of two, at most the guided max batch), bound as the engine's inputs (each
layer on its own 256-byte boundary) in the plan's dtype (FP16 in an FP16 plan: `trt_build.half_inputs`).

The denoising steps of a masked step (`denoise`) replay as one CUDA graph (`trt_loops.DenoiseLoops`), whose
memory `graph_memory_bytes` counts with the engines' per-call graphs. Without graphs, or once a capture has
failed, they run one `run` per step.

Device memory is bounded: each engine's contexts share one scratch allocation (`trt_memory`), the graph caches
are keyed by row bucket and bounded, and `device_memory` reports what the backend holds by kind (the bench shows
it); `close` gives all of it back.

The GPU is reached only through a device object (`cuda_device.CudaDevice`) and `tensorrt` only through the
module passed in, so the tests run this code on the CPU under contract fakes.
"""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.backends.base import Backend, check_graph_io
from d2c_export.backends.registry import BackendSpec, OpenOptions, Precision, Target, register_backend
from d2c_export.backends.trt_engine import Engine
from d2c_export.backends.trt_loops import DenoiseLoops
from d2c_export.cuda_device import ALIGNMENT
from d2c_export.engines import Engines
from d2c_export.errors import StaleEngines
from d2c_export.export.trt_build import input_profiles
from d2c_export.manifest import StageEntry
from d2c_export.trt_platform import (RUN_HINT, platform_mismatch, require_tensorrt, running_platform, tensorrt_missing,
                                     trt_logger)
from reference.diffusion import denoise_steps
from reference.gpt import cache_feeds, cache_input_names


def trt_usable(engines: Engines, precision: Precision) -> bool:
    """Plans of `precision` exist, TensorRT is installed and a CUDA device is visible (what `auto` asks)."""
    return engines.has(Target("trt", precision).kind) and tensorrt_missing() is None


def check_plan(engines: Engines, stage: str, entry: StageEntry, running: dict) -> None:
    """Refuse a plan built by another TensorRT or GPU, or from a graph that was re-exported since."""
    kind = f"trt-{entry.precision}"
    diff = platform_mismatch(entry.tensorrt, running)
    if diff:
        raise StaleEngines(f"{engines.directory / entry.main_file} was built for another TensorRT/GPU ({diff}); "
                           f"rebuild with `{engines.rebuild_command(kind)}`")
    info = entry.tensorrt or {}
    source = engines.manifest.stages.get(stage, {}).get(f"onnx-{entry.precision}")
    if source is not None and source.files.get(info.get("onnx")) != info.get("onnx_sha256"):
        raise StaleEngines(f"{engines.directory / entry.main_file} was built from an older {info.get('onnx')}; "
                           f"rebuild with `{engines.rebuild_command(kind)}`")


def aligned_cache(device, n_layer: int, rows: int, n_head: int, slots: int, head_dim: int,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """A zeroed (L, rows, H, S, hd) cache whose every layer starts on an ALIGNMENT-byte boundary."""
    layer = rows * n_head * slots * head_dim
    size = torch.empty((), dtype=dtype).element_size()
    stride = -(-layer * size // ALIGNMENT) * ALIGNMENT // size  # elements per layer, rounded up
    flat = device.empty((n_layer * stride,), dtype)
    flat.zero_()
    return flat.as_strided((n_layer, rows, n_head, slots, head_dim),
                           (stride, n_head * slots * head_dim, slots * head_dim, head_dim, 1))


class TrtBackend(Backend):
    """The plans of `precision` in an engines directory on TensorRT; the loop's tensors live on the device seam's
    `torch_device` (CUDA; host memory under the tests' fake)."""

    def __init__(self, engines: Engines, precision: Precision = Precision.FP16, trt=None, device=None):
        trt = trt or require_tensorrt(RUN_HINT)  # checks for a CUDA device before any TensorRT object exists
        if device is None:
            from d2c_export.cuda_device import CudaDevice
            device = CudaDevice()
        self.cuda = device
        self.device = device.torch_device
        self.target = Target("trt", precision)
        self.config = engines.config
        self.max_batch = engines.max_batch
        self.running = running_platform(trt, device)
        self.stream = device.new_stream()  # non-default: execute_async_v3 and graph capture need one
        self.runtime = trt.Runtime(trt_logger(trt))
        self.engines: dict[str, Engine] = {}
        self._gpt_cache: tuple[Tensor, Tensor] | None = None  # stacked k, v for the most rows so far
        self.absent_optional = engines.absent_optional(self.target.kind)
        for spec in engines.specs(kind=self.target.kind):
            entry = engines.entry(spec.name, self.target.kind)  # files present, sha256 matches
            check_plan(engines, spec.name, entry, self.running)
            engine = Engine(trt, self.runtime, device, engines.file(spec.name, self.target.kind), self.stream,
                            input_profiles(entry), spec.cuda_graph)
            check_graph_io(engine.path, spec.name, self.config,
                           [(n, len(engine.engine.get_tensor_shape(n))) for n in engine.inputs],
                           [(n, len(engine.engine.get_tensor_shape(n))) for n in engine.outputs],
                           lambda: engines.rebuild_command(self.target.kind))
            self.engines[spec.name] = engine
        diffusion = self.engines.get("diffusion")
        self.loops = DenoiseLoops(device, diffusion, self.stream) if diffusion and diffusion.cuda_graphs else None
        self.graphs_denoise = self.loops is not None
        self.description = f"TensorRT {trt.__version__} ({precision.value}) on {self.running['gpu']}"

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        """Zeroed device caches for `rows` whose layers are the gpt engine's bound inputs: decode steps read them
        in place, with no copy, and the loop writes each step's keys and values into them (KiB per step). They are
        the first `rows` rows of one cache; a larger one replaces it (and the gpt's keys bound to it)."""
        gpt = self._open().engines["gpt"]
        if self._gpt_cache is None or self._gpt_cache[0].shape[1] < rows:
            g = self.config.gpt
            capacity = max(rows, min(2 * self.max_batch, 1 << (rows - 1).bit_length()))
            dtype = gpt.dtypes[cache_input_names(g.n_layer)[0]]
            self._gpt_cache = None
            gpt.drop_bindings()  # bound to the cache that goes
            self._gpt_cache = tuple(aligned_cache(self.cuda, g.n_layer, capacity, g.n_head, g.max_seq_len,
                                                  g.head_dim, dtype) for _ in "kv")
        k, v = (c[:, :rows] for c in self._gpt_cache)
        layers = cache_feeds(k, v)
        shapes = {"ids": (rows, 1), "input_pos": (1,), **{n: tuple(t.shape) for n, t in layers.items()}}
        gpt.binding(shapes, given=layers)
        k.zero_()
        v.zero_()
        return k, v

    def _open(self) -> "TrtBackend":
        if not self.engines:
            raise RuntimeError("this TensorRT backend was closed; open another one to run stages")
        return self

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        cuda = self._open().cuda
        on_host = not cuda.is_device(next(iter(inputs.values())))  # the caller's own data, not a gpt_cache buffer
        cuda.wait(self.stream, cuda.current_stream())  # inputs made on the caller's stream
        out = self.engines[stage].run(inputs)
        with cuda.use(self.stream):
            results = [cuda.to_host(out[name]) if on_host else out[name].clone() for name in self.output_names(stage)]
        return self._hand_back(results)

    def _hand_back(self, results: list[Tensor]) -> tuple[Tensor, ...]:
        """Results made on `self.stream`, handed to the caller's stream (which waits for them)."""
        caller = self.cuda.current_stream()
        self.cuda.wait(caller, self.stream)
        for r in results:
            if self.cuda.is_device(r):
                self.cuda.record(r, caller)  # made on self.stream, used on the caller's
        return tuple(results)

    def denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        """A masked step's denoising steps: one replay of its captured loop, or one `run` per step once capture has
        failed (or without graphs)."""
        if self.loops is not None:
            self.cuda.wait(self.stream, self.cuda.current_stream())  # feeds made on the caller's stream
            x = self.loops(feeds)
            if x is not None:
                return self._hand_back([x])[0]
        return denoise_steps(self.run, feeds)

    def graph_replays(self) -> dict[str, int]:
        """CUDA graph replays so far, per stage, and of whole denoising loops (`denoise`)."""
        counts = {name: e.replays for name, e in self.engines.items()}
        if self.loops is not None:
            counts["denoise"] = self.loops.replays
        return counts

    def graph_memory_bytes(self) -> int:
        """Device memory held by the graph caches (the buffers of the captured keys and loops)."""
        loops = 0 if self.loops is None else self.loops.memory_bytes()
        return sum(e.graph_bytes() for e in self.engines.values()) + loops

    def device_memory(self) -> dict[str, int]:
        """Device memory the backend holds, by kind: the plans (`engines`, what loading each took), the activation
        scratch their contexts share (`contexts`), the graph caches (`graphs`), and the other buffers (`buffers`: the
        uncaptured stages' tensors and the KV cache)."""
        cache = 0 if self._gpt_cache is None else sum(c.stride(0) * c.shape[0] * c.element_size()
                                                      for c in self._gpt_cache)  # the layers' padded allocation
        return {"engines": sum(e.weight_bytes for e in self.engines.values()),
                "contexts": sum(e.scratch.size for e in self.engines.values()),
                "graphs": self.graph_memory_bytes(),
                "buffers": sum(e.buffer_bytes() for e in self.engines.values()) + cache}

    def close(self) -> None:
        """Give back every context, graph, scratch allocation, buffer and plan, once the stream's work is done."""
        if not self.engines:
            return
        self.cuda.synchronize(self.stream)
        if self.loops is not None:
            self.loops.close()
        for engine in self.engines.values():
            engine.close()
        self.engines, self.loops, self._gpt_cache, self.runtime = {}, None, None, None
        self.graphs_denoise = False


def open_trt(engines: Engines, precision: Precision, options: OpenOptions) -> TrtBackend:
    return TrtBackend(engines, precision)


def build_plans(engines: Engines, precision: Precision, progress: bool) -> None:
    """The plans of `precision`, where missing (from the FP16 graphs for FP16, made first where missing)."""
    if not engines.has(Target("trt", precision).kind):
        from d2c_export.export.trt_build import build_engines
        build_engines(engines, fp16=precision is Precision.FP16, progress=progress)


register_backend(BackendSpec(
    name="trt", summary="TensorRT plans on an NVIDIA GPU", precisions=(Precision.FP32, Precision.FP16),
    open=open_trt, files="trt", build=build_plans, missing=tensorrt_missing, hint=RUN_HINT, auto_rank=2))
