"""Latency benchmark: backends measured interleaved, per stage and end to end, against a matmul roofline.

Within each repeat every backend generates the same batch once, in an order rotated by the repeat
index (round-robin), so a slow spell of a shared machine hits all backends alike and their ratios
hold. Stage calls are timed by `backends.hooks` (CUDA events when the backend runs on a GPU);
the runtime overhead is the end-to-end wall time minus the time inside stage calls. The draws
(`reference.draw_producer`) are timed twice: the time spent making them, and the part of it the loop
waited for (all of it when drawn inline; what the stage calls did not hide when drawn ahead).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from d2c_export.backends import Target, open_backend
from d2c_export.backends.base import Backend
from d2c_export.backends.hooks import CudaEventTimer, FlopCounted, StageTimer
from d2c_export.bench.roofline import matmul_roofline
from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable, BadInput
from d2c_export.generate import check_stages, generate_images
from d2c_export.stages import DEFAULT_MAX_BATCH
from reference.files import output_directory
from reference.pipeline import SamplingParams
from reference.settings import check_request

log = logging.getLogger(__name__)

MB = 1 << 20


@dataclass
class Column:
    """One column of the benchmark: a target's backend, where it computes, and the settings it samples with
    (`sampler`: the name of a set of `reference.samplers.SAMPLER_SETS`, or None for the run's own settings)."""

    target: Target
    backend: Backend
    params: SamplingParams = field(default_factory=SamplingParams)
    sampler: str | None = None

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def label(self) -> str:
        return self.name if self.sampler is None else f"{self.name} {self.sampler}"

    @property
    def device(self) -> str:
        """Where the column's stages compute (its timers, memory and roofline are that device's)."""
        return self.backend.compute_device or self.backend.device

    @property
    def description(self) -> str:
        return self.backend.description


@dataclass
class Measurement:
    """Every measured generation of one backend at one batch size (lists run over the repeats)."""

    backend: str
    batch: int
    sampler: str | None = None
    wall_s: list[float] = field(default_factory=list)
    stage_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    call_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # every call of every repeat
    calls: dict[str, int] = field(default_factory=dict)  # per generation
    draw_s: list[float] = field(default_factory=list)  # making the draws
    draw_wait_s: list[float] = field(default_factory=list)  # the part of it the loop waited for (not hidden)
    draws_ahead: bool = False  # made by a producer thread ahead of the loop, or inline
    base_rss_mb: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    peak_gpu_mb: list[float] = field(default_factory=list)  # PyTorch's caching allocator only
    gpu_used_mb: list[float] = field(default_factory=list)  # the driver's count: TensorRT and ONNX Runtime too


def _rss_mb(field_name: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return None


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float | None]]:
    """Peak resident memory of this process over the block (Linux resets VmHWM via clear_refs); on a GPU also
    PyTorch's allocator peak and the device's used memory from the driver at the block's end."""
    import resource
    out: dict[str, float | None] = {"base_rss_mb": _rss_mb("VmRSS"), "peak_rss_mb": None, "peak_gpu_mb": None,
                                    "gpu_used_mb": None}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
        reset = True
    except OSError:
        reset = False
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield out
    if reset:
        out["peak_rss_mb"] = _rss_mb("VmHWM")
    else:  # the process's lifetime peak: an upper bound
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    if device == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / MB
        # the device's used memory as the driver reports it, taken while the column's stages still hold theirs:
        # TensorRT's engine and context memory and ONNX Runtime's CUDA arena, which PyTorch's figure misses
        free, total = torch.cuda.mem_get_info()
        out["gpu_used_mb"] = (total - free) / MB


def measure_once(column: Column, labels: list[int], seed: int, into: Measurement) -> None:
    """One generation of `labels` on `column` with its settings, appended to `into`."""
    timer = CudaEventTimer() if column.device == "cuda" else StageTimer()
    with peak_memory(column.device) as mem, torch.inference_mode():
        start = time.perf_counter()
        result, _ = generate_images(column.backend, labels, column.params, seed, timer=timer)
        if column.device == "cuda":
            torch.cuda.synchronize()
        into.wall_s.append(time.perf_counter() - start)
    for name, durations in timer.durations.items():
        into.stage_s[name].append(sum(durations))
        into.call_s[name].extend(durations)
        into.calls[name] = len(durations)
    into.draw_s.append(result.draw_time.drawing_s)
    into.draw_wait_s.append(result.draw_time.waiting_s)
    into.draws_ahead = result.draw_time.ahead
    into.base_rss_mb.append(mem["base_rss_mb"] or 0.0)
    into.peak_rss_mb.append(mem["peak_rss_mb"] or 0.0)
    if mem["peak_gpu_mb"] is not None:
        into.peak_gpu_mb.append(mem["peak_gpu_mb"])
        into.gpu_used_mb.append(mem["gpu_used_mb"])


def count_flops(column: Column, labels: list[int], seed: int) -> dict[str, int]:
    """FLOPs per stage of one generation with the column's settings (a warm-up run through counting stages)."""
    counter = FlopCounted(column.backend)
    with torch.inference_mode():
        generate_images(counter, labels, column.params, seed)
    return dict(counter.flops)


def measure_rooflines(columns: list[Column], threads: int) -> dict[str, dict[str, float]]:
    """The matmul roofline of every device the columns run on (with ORT's MatMul where a column computes with
    ONNX Runtime, `BackendSpec.matmul`)."""
    out = {}
    for device in sorted({b.device for b in columns}):
        with_ort = any(b.device == device and b.target.spec.matmul == "onnxruntime" for b in columns)
        out[device] = matmul_roofline(device, threads, with_ort)
        log.info("matmul roofline (%s): %.1f GFLOP/s", device, out[device]["peak"] / 1e9)
    return out


def bench_labels(num_classes: int, batch: int) -> list[int]:
    """A fixed spread of class labels for a batch."""
    return [(7 * i + 1) % num_classes for i in range(batch)]


@dataclass
class BenchResult:
    config: dict
    backends: dict[str, str]  # name -> description
    batches: list[int]
    params: SamplingParams
    samplers: dict[str, SamplingParams] | None  # name -> settings of each sampler column (None: `params` only)
    repeat: int
    warmup: int
    threads: int
    roofline: dict[str, dict[str, float]]  # device -> {"torch", "ort", "peak"} FLOP/s
    devices: dict[str, str]  # backend -> device
    flops: dict[tuple[int, str | None], dict[str, int]]  # (batch, sampler) -> stage -> FLOPs per generation
    measurements: list[Measurement]
    load_average: dict[str, float]  # 1-minute load average of the machine at the start and the end
    graphs: dict[str, dict] = field(default_factory=dict)  # backend -> CUDA-graph replays per stage, memory held
    memory: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> device MB by kind (TensorRT)


def graph_use(backend: Backend) -> dict | None:
    """The CUDA graphs a backend replayed (per stage) and the device memory their caches hold; None without."""
    replays = backend.graph_replays()
    if not any(replays.values()):
        return None
    return {"replays": replays, "memory_mb": backend.graph_memory_bytes() / MB}


def memory_use(backend: Backend) -> dict[str, float] | None:
    """The device memory a backend says it holds, by kind, in MB (TensorRT: engines, contexts, graphs, buffers);
    None where it does not say."""
    report = getattr(backend, "device_memory", None)
    return None if report is None else {kind: nbytes / MB for kind, nbytes in report().items()}


def _warm_up(columns: list[Column], labels: list[int], seed: int, warmup: int,
             bar: tqdm) -> dict[str | None, dict[str, int]]:
    """`warmup` unmeasured generations per column; the first one of each sampler counts the FLOPs of a generation."""
    flops = {}
    for b in columns:
        bar.set_postfix_str(f"warm-up {b.label} x{len(labels)}")
        for w in range(warmup):
            if w == 0 and b.sampler not in flops:
                flops[b.sampler] = count_flops(b, labels, seed)
            else:
                with torch.inference_mode():
                    generate_images(b.backend, labels, b.params, seed)
            bar.update()
    return flops


def _measure_batch(columns: list[Column], labels: list[int], seed: int, repeat: int,
                   bar: tqdm) -> list[Measurement]:
    """`repeat` rounds, each running every column once, starting one column later every round."""
    cells = {b.label: Measurement(b.name, len(labels), b.sampler) for b in columns}
    for r in range(repeat):
        k = r % len(columns)
        for b in columns[k:] + columns[:k]:
            bar.set_postfix_str(f"round {r + 1} {b.label} x{len(labels)}")
            m = cells[b.label]
            measure_once(b, labels, seed, m)
            log.info("round %d %s x%d: %.2f s, %.2f s in stage calls, %.3f s drawing (%.3f s not hidden)", r + 1,
                     b.label, len(labels), m.wall_s[-1], sum(v[-1] for v in m.stage_s.values()), m.draw_s[-1],
                     m.draw_wait_s[-1])
            bar.update()
    return list(cells.values())


def check_available(targets: list[Target]) -> None:
    """Refuse a column that cannot run here, before any work, naming why."""
    for t in targets:
        if why := t.spec.missing():
            raise BackendUnavailable(f"backend {t.name} cannot run: {why}; drop it from --backends")


def run_benchmark(engines: Engines, targets: list[Target], batches: list[int], params: SamplingParams,
                  repeat: int = 3, warmup: int = 1, threads: int | None = None, seed: int = 0,
                  progress: bool = True, samplers: list[str] | None = None) -> BenchResult:
    """Warm up, then measure every target at every batch `repeat` times, interleaved round-robin; with `samplers`
    (names of `reference.samplers.SAMPLER_SETS`) every target once per named set of settings over `params`."""
    if repeat < 1 or warmup < 1:
        raise BadInput(f"--repeat and --warmup must be >= 1, got {repeat} and {warmup}")
    variants = {name: params.with_sampler_set(name) for name in samplers} if samplers else None
    check_available(targets)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    config = engines.config
    for batch in batches:
        check_request(config, bench_labels(config.num_classes, batch), max_batch=engines.max_batch, params=params,
                      too_many=lambda n: f"use --batch values up to {engines.max_batch}, or re-export with "
                      f"`{engines.rebuild_command('onnx-fp32', max_batch=max(batches))}`")
    with ExitStack() as stack:
        backends = {t: stack.enter_context(open_backend(engines, t, threads)) for t in targets}
        columns = [Column(t, backends[t], p, name) for t in targets
                   for name, p in (variants or {None: params}).items()]
        for b in columns:
            check_stages(b.backend, b.params)
            log.info("%-9s %s; %s", b.label, b.description, b.params.describe())
        load = {"start": os.getloadavg()[0]}
        roofline = measure_rooflines(columns, threads)
        flops, results = {}, []
        bar = tqdm(total=len(batches) * len(columns) * (warmup + repeat), desc="d2c-bench", unit="gen",
                   disable=not progress)
        with logging_redirect_tqdm():
            for batch in batches:
                labels = bench_labels(config.num_classes, batch)
                for sampler, counted in _warm_up(columns, labels, seed, warmup, bar).items():
                    flops[batch, sampler] = counted
                results.extend(_measure_batch(columns, labels, seed, repeat, bar))
        bar.close()
        load["end"] = os.getloadavg()[0]
        for device, again in measure_rooflines(columns, threads).items():  # the better of before and after
            roofline[device] = {k: max(v, again[k]) for k, v in roofline[device].items()}
        graphs = {t.name: use for t, backend in backends.items() if (use := graph_use(backend)) is not None}
        memory = {t.name: use for t, backend in backends.items() if (use := memory_use(backend)) is not None}
    return BenchResult(config=config.to_dict(), backends={b.name: b.description for b in columns}, batches=batches,
                       params=params, samplers=variants, repeat=repeat, warmup=warmup, threads=threads, roofline=roofline,
                       devices={b.name: b.device for b in columns}, flops=flops, measurements=results,
                       load_average=load, graphs=graphs, memory=memory)


def export_for_bench(config: str, directory: Path, targets: list[Target], max_batch: int,
                     progress: bool = True) -> Engines:
    """Export preset `config` (random weights) with the files `targets` run (`BackendSpec.build`: FP16 graphs,
    TensorRT plans)."""
    from d2c_export.export.onnx import export_model
    from d2c_export.sources import ModelRequest, build_model
    model, source = build_model(ModelRequest(config=config))
    export_model(model, directory, source, max_batch=max_batch, progress=progress)
    engines = Engines.open(directory)
    for t in targets:
        if t.spec.build is not None:
            t.spec.build(engines, t.precision, progress)
    return engines


def bench_from_config(config: str, out: Path, targets: list[Target], batches: list[int], params: SamplingParams,
                      **kwargs) -> BenchResult:
    """Export `config` into a temporary engines directory under `out`, benchmark it, then remove it."""
    check_available(targets)
    for name in kwargs.get("samplers") or ():  # settings that cannot run are refused before the export
        params.with_sampler_set(name)
    with output_directory(out), tempfile.TemporaryDirectory(dir=out, prefix=".engines-") as tmp:
        engines = export_for_bench(config, Path(tmp), targets, max(DEFAULT_MAX_BATCH, *batches),
                                   kwargs.get("progress", True))
        return run_benchmark(engines, targets, batches, params, **kwargs)
