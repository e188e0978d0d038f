"""A masked step's denoising steps on the TensorRT diffusion engine, captured as one CUDA graph (`DenoiseLoops`).

The graph is `reference.diffusion.denoise_steps` over static feed buffers, each step copying its x, noise, t and
coefficients into a binding with its own context (z, cfg and temperature are bound to their static buffers and
never copied) and enqueueing it on the engine's stream; every piece of work goes through the device seam on the
capture stream. Loops are keyed by the row bucket of the masked step (`d2c_export.row_buckets`): the feeds are placed
in the first rows of each group of a bucket's buffers, whose padding rows stay zero, and the real rows of the result
are handed back, so a serving mix of batch sizes captures one loop per bucket. A key's first call runs the loop once
uncaptured (TensorRT's guide: enqueue once before capturing), then captures it; every call copies its feeds in and
replays. A loop whose context was handed new scratch memory since (`Engine.attach`) is captured again. Keys live in
an LRU of `limit` (`LOOP_CACHE`, which holds every bucket up to 65536 rows).

The GPU is reached only through a device object (`cuda_device.CudaDevice`), so the tests run this code on the CPU
under contract fakes.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from d2c_export.backends.trt_engine import REFUSED, Binding, Engine, device_buffer, tensor_bytes
from d2c_export.errors import EngineError
from d2c_export.row_buckets import LOOP_CACHE, bucket_shapes, loop_rows, place_rows, row_bucket
from reference.diffusion import denoise_steps


@dataclass
class Loop:
    """One captured denoising loop: its static feeds (a bucket's rows), the binding its steps run on, the graph and
    its output."""

    static: dict[str, Tensor]
    binding: Binding
    output: Tensor
    graph: object | None = None


class DenoiseLoops:
    """The denoising steps of a masked step on the diffusion engine, captured as one CUDA graph per row bucket."""

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
        rows, _ = loop_rows(feeds)
        shapes = bucket_shapes(feeds, row_bucket(rows))
        key = tuple((n, shapes[n], t.dtype) for n, t in feeds.items())
        loop = self.entries.get(key)
        if loop is None:
            loop = self.entries[key] = self._new(feeds, shapes)
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        with self.cuda.use(self.stream):
            place_rows(self.cuda.copy, loop.static, feeds)
        if (self.engine.attach(loop.binding) or loop.graph is None) and not self._capture(loop):
            return None
        with self.cuda.use(self.stream):
            loop.graph.replay()
            self.replays += 1
            return loop.output[:rows].clone()

    def _new(self, feeds: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> Loop:
        cuda, engine = self.cuda, self.engine
        # the bound feeds in the engine's dtype (the copy in casts), the others in the loop's; padding rows zero
        static = {n: device_buffer(cuda, shapes[n], engine.dtypes[n] if n in self.BOUND else t.dtype)
                  for n, t in feeds.items()}
        with cuda.use(self.stream):
            for t in static.values():
                t.zero_()
        step = tuple(shapes["noise"][1:])
        step_shapes = {"x": step, "t": (1,), "noise": step, "coefs": tuple(feeds["coefs"].shape[1:]),
                       **{n: shapes[n] for n in self.BOUND}}
        binding = engine.own_binding(step_shapes, given={n: static[n] for n in self.BOUND})
        return Loop(static, binding, device_buffer(cuda, step, feeds["noise"].dtype))

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

    def _capture(self, loop: Loop) -> bool:
        """Run `loop` once uncaptured, then capture it; False (graphs off for the engine) when the capture fails."""
        cuda, engine = self.cuda, self.engine
        loop.graph = None
        with cuda.use(self.stream):
            if not all(self._body(loop)):  # uncaptured once: TensorRT's lazy set-up happens outside the capture
                raise EngineError(f"TensorRT failed to run {engine.path.name} (see the TensorRT log above)")
        graph = cuda.new_graph()
        try:
            with cuda.capture(graph, self.stream):
                enqueued = self._body(loop)
        except RuntimeError as exc:  # work that cannot be captured: per-step calls from now on
            return self._off(str(exc))
        if not all(enqueued):  # TensorRT refused an enqueue: the graph misses it, never replay it
            return self._off(REFUSED)
        loop.graph = graph
        return True

    def _off(self, reason: str) -> bool:
        self.engine.graphs_off(reason)
        self.entries.clear()
        return False

    def memory_bytes(self) -> int:
        """Device memory the captured loops hold: static feeds, outputs and their bindings' buffers."""
        return sum(tensor_bytes([*loop.static.values(), loop.output, *loop.binding.buffers.values()])
                   for loop in self.entries.values())

    def close(self) -> None:
        self.entries.clear()
