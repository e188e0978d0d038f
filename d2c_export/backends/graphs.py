"""CUDA graphs of PyTorch callables: captured once per input-shape key, replayed after, in a bounded cache.

`CallableGraphs(device)(name, fn, feeds)` returns `fn(feeds)`. The first call of a key copies the feeds into
static buffers, runs `fn` once on a side stream (warm-up: lazy initialisation must not be captured), then
captures `fn(static)` as a graph; every call copies its feeds into the static buffers, replays the graph and
returns a copy of its output (a tensor or a tuple of them). Feeds named in `persistent` (a KV cache the backend owns) are bound as they are,
never copied; another tensor under that name is another key. Keys live in an LRU of `limit` entries; the
memory they hold (static buffers and the graphs' private pools) is `memory_bytes()`.

The GPU is reached only through the device seam (`cuda_device.CudaDevice`), so the tests run this on the CPU
under the contract fake, which re-runs the captured callable on replay and so reads only what sits in the
static buffers.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

log = logging.getLogger(__name__)

GRAPH_CACHE = 16  # captured keys per cache (least recently used go first)


@dataclass
class Captured:
    graph: object
    static: dict[str, Tensor]
    output: Tensor | tuple[Tensor, ...]
    nbytes: int  # device memory the capture added (static buffers, the graph's pool)


def _key(name: str, feeds: dict[str, Tensor], persistent: frozenset[str]) -> tuple:
    return (name,) + tuple((n, tuple(t.shape), t.dtype, t.data_ptr() if n in persistent else None)
                           for n, t in feeds.items())


class CallableGraphs:
    """Graphs of callables per shape key on `device`; `enabled` turns off (for good) when a capture fails."""

    def __init__(self, device, limit: int = GRAPH_CACHE):
        self.device, self.limit = device, limit
        self.stream = device.new_stream()  # capture needs a stream other than the default one
        self.entries: OrderedDict[tuple, Captured] = OrderedDict()
        self.replays = 0
        self.enabled = True

    def __call__(self, name: str, fn: Callable[[dict[str, Tensor]], Tensor | tuple[Tensor, ...]],
                 feeds: dict[str, Tensor], persistent: frozenset[str] = frozenset()) -> Tensor | tuple[Tensor, ...]:
        if not self.enabled:
            return fn(feeds)
        key = _key(name, feeds, persistent)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(name, fn, feeds, persistent)
            if entry is None:
                return fn(feeds)
            self.entries[key] = entry
            while len(self.entries) > self.limit:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        for n, t in feeds.items():
            if n not in persistent:
                entry.static[n].copy_(t)
        entry.graph.replay()
        self.replays += 1
        if isinstance(entry.output, tuple):
            return tuple(o.clone() for o in entry.output)
        return entry.output.clone()

    def _capture(self, name: str, fn, feeds: dict[str, Tensor], persistent: frozenset[str]) -> Captured | None:
        dev = self.device
        before = dev.reserved_bytes()
        static = {n: (t if n in persistent else t.clone()) for n, t in feeds.items()}
        dev.wait(self.stream, dev.current_stream())  # the feeds were made on the caller's stream
        with dev.use(self.stream):
            fn(static)  # warm-up, not captured
        dev.wait(dev.current_stream(), self.stream)
        graph = dev.new_graph()
        try:
            output = dev.capture_call(graph, self.stream, lambda: fn(static))
        except RuntimeError as exc:  # an operation that cannot be captured: run uncaptured from now on
            log.warning("%s: CUDA graph capture failed (%s); running without CUDA graphs", name, exc)
            self.enabled = False
            self.entries.clear()
            return None
        buffers = sum(t.numel() * t.element_size() for n, t in static.items() if n not in persistent)
        outputs = output if isinstance(output, tuple) else (output,)
        buffers += sum(o.numel() * o.element_size() for o in outputs)
        pool = max(0, dev.reserved_bytes() - before)  # the graph's private pool (already counts the buffers)
        return Captured(graph, static, output, max(pool, buffers))

    def memory_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())
