"""Latency benchmark: backends measured interleaved, per stage and end to end, against a matmul roofline.

Within each repeat every backend generates the same batch once, in an order rotated by the repeat
index (round-robin), so a slow spell of a shared machine hits all backends alike and their ratios
hold. Stage calls are timed by `runtime.StageTimer` (CUDA events when the backend runs on a GPU);
the runtime overhead is the end-to-end wall time minus the time inside stage calls.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from d2c_export import runtime
from d2c_export.flops import matmul_roofline, stage_flops
from d2c_export.manifest import EngineError, Manifest
from d2c_export.runtime import StageTimer, check_request, generate_images, open_backend
from d2c_export.sources import model_from_source
from d2c_export.stages import DEFAULT_MAX_BATCH, STAGES
from reference.pipeline import SamplingParams, TorchStages

log = logging.getLogger(__name__)

BENCH_BACKENDS = ("torch", "ort", "ort-fp16", "trt")
MB = 1 << 20


@dataclass
class Backend:
    """One column of the benchmark: stages behind the runtime interface, and where they compute."""

    name: str
    stages: object
    description: str
    device: str  # "cpu" or "cuda"


@dataclass
class Measurement:
    """Every measured generation of one backend at one batch size (lists run over the repeats)."""

    backend: str
    batch: int
    wall_s: list[float] = field(default_factory=list)
    stage_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    call_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # every call of every repeat
    calls: dict[str, int] = field(default_factory=dict)  # per generation
    base_rss_mb: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    peak_gpu_mb: list[float] = field(default_factory=list)


# -- backends ------------------------------------------------------------------------------------------
def trt_unavailable() -> str | None:
    """Why the TensorRT column cannot run here, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (install it on a machine with an NVIDIA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if "trt" not in runtime.BACKENDS:
        return f"this runtime has no TensorRT backend (it has {', '.join(runtime.BACKENDS)})"
    return None


def fp16_unavailable() -> str | None:
    """Why FP16 graphs cannot be made here, or None."""
    if importlib.util.find_spec("d2c_export.fp16") is None:
        return "this install has no FP16 conversion (module d2c_export.fp16)"
    return None


def check_backends(names: list[str]) -> None:
    """Refuse unknown or unavailable backends before any work, naming which and why."""
    unknown = [n for n in names if n not in BENCH_BACKENDS]
    if unknown or not names:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BENCH_BACKENDS)}")
    if "trt" in names and (why := trt_unavailable()):
        raise EngineError(f"backend trt cannot run: {why}; drop it from --backends")
    if "ort-fp16" in names and (why := fp16_unavailable()):
        raise EngineError(f"backend ort-fp16 needs FP16 graphs (kind onnx-fp16) but {why}; drop it from --backends")


class TorchDeviceStages:
    """The reference modules on a GPU: inputs copied there and outputs back, as the ORT backend's IO binding does."""

    def __init__(self, model, device: str):
        self.inner = TorchStages(model.to(device))
        self.config = self.inner.config
        self.device = device

    def _call(self, name: str, *args):
        out = getattr(self.inner, name)(*(None if a is None else a.to(self.device) for a in args))
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()

    def gpt(self, *args):
        return self._call("gpt", *args)

    def gpt_cache(self, rows):  # on the device, as the reference keeps it there: no cache copies per step
        return self.inner.gpt_cache(rows)

    def cond(self, *args):
        return self._call("cond", *args)

    def mar(self, *args):
        return self._call("mar", *args)

    def diffusion(self, *args):
        return self._call("diffusion", *args)

    def vae(self, *args):
        return self._call("vae", *args)


def open_bench_backend(engines: Path, name: str, threads: int) -> Backend:
    """The stages of column `name` over `engines`."""
    if name == "torch":
        manifest = Manifest.load(engines)
        model = model_from_source(manifest.d2c_config, manifest.source).eval()
        if torch.cuda.is_available():
            return Backend(name, TorchDeviceStages(model, "cuda"), "PyTorch eager (fp32, cuda)", "cuda")
        return Backend(name, TorchStages(model), f"PyTorch eager (fp32, cpu, {threads} threads)", "cpu")
    if name == "trt":
        from d2c_export.trt_backend import plans_present
        precision = "fp16" if plans_present(Manifest.load(engines), "fp16") else "fp32"
        stages, description = open_backend(engines, "trt", precision)
        return Backend(name, stages, description, "cuda")
    precision = "fp16" if name == "ort-fp16" else "fp32"
    stages, description = open_backend(engines, "ort", precision, threads=threads)
    return Backend(name, stages, description, "cuda" if stages.providers[0].startswith("CUDA") else "cpu")


def export_for_bench(config: str, engines: Path, backends: list[str], max_batch: int) -> None:
    """Export the graphs (and FP16 graphs or TensorRT plans) that `backends` need into `engines`."""
    from d2c_export.onnx_export import export_model
    from d2c_export.sources import model_from_args
    model, source = model_from_args(config, None, 0)
    export_model(model, engines, source, max_batch=max_batch)
    if "ort-fp16" in backends:
        from d2c_export.fp16 import convert_engines
        convert_engines(engines)
    if "trt" in backends:
        from d2c_export.trt_build import build_engines
        build_engines(engines)


# -- measuring ------------------------------------------------------------------------------------------
class CudaEventTimer(StageTimer):
    """StageTimer whose calls are bracketed by CUDA events; `resolve()` turns them into seconds."""

    def __init__(self):
        super().__init__()
        self.events: dict[str, list[tuple]] = defaultdict(list)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self.events[name].append((start, end))
            return out
        return timed

    def resolve(self) -> None:
        torch.cuda.synchronize()
        for name, pairs in self.events.items():
            self.durations[name] = [s.elapsed_time(e) / 1e3 for s, e in pairs]
            self.seconds[name] = sum(self.durations[name])
            self.calls[name] = len(pairs)


class FlopCounter:
    """Stages that count the FLOPs of every call (from its input shapes) and pass it on."""

    def __init__(self, stages):
        self.config = stages.config
        self.flops: dict[str, int] = defaultdict(int)
        self.gpt_cache = stages.gpt_cache
        for name in STAGES:
            setattr(self, name, self._counted(name, getattr(stages, name)))

    def _counted(self, name, fn):
        specs = STAGES[name].input_specs(self.config) if STAGES[name].applies(self.config) else ()

        def counted(*args):
            shapes = {s.name: tuple(a.shape) for s, a in zip(specs, args) if a is not None}
            self.flops[name] += stage_flops(self.config, name, shapes)
            return fn(*args)
        return counted


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
    """Peak resident memory of this process over the block (Linux resets VmHWM via clear_refs) and GPU peak."""
    import resource
    out: dict[str, float | None] = {"base_rss_mb": _rss_mb("VmRSS"), "peak_rss_mb": None, "peak_gpu_mb": None}
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


def measure_once(backend: Backend, labels: list[int], params: SamplingParams, seed: int,
                 into: Measurement) -> None:
    """One generation of `labels` on `backend`, appended to `into`."""
    timer = CudaEventTimer() if backend.device == "cuda" else StageTimer()
    with peak_memory(backend.device) as mem, torch.inference_mode():
        start = time.perf_counter()
        generate_images(backend.stages, labels, params, seed, len(labels), timer=timer)
        if backend.device == "cuda":
            torch.cuda.synchronize()
        into.wall_s.append(time.perf_counter() - start)
    if backend.device == "cuda":
        timer.resolve()
    for name, durations in timer.durations.items():
        into.stage_s[name].append(sum(durations))
        into.call_s[name].extend(durations)
        into.calls[name] = len(durations)
    into.base_rss_mb.append(mem["base_rss_mb"] or 0.0)
    into.peak_rss_mb.append(mem["peak_rss_mb"] or 0.0)
    if mem["peak_gpu_mb"] is not None:
        into.peak_gpu_mb.append(mem["peak_gpu_mb"])


def count_flops(backend: Backend, labels: list[int], params: SamplingParams, seed: int) -> dict[str, int]:
    """FLOPs per stage of one generation (a warm-up run with counting stages)."""
    counter = FlopCounter(backend.stages)
    with torch.inference_mode():
        generate_images(counter, labels, params, seed, len(labels))
    return dict(counter.flops)


def measure_rooflines(columns: list[Backend], threads: int) -> dict[str, dict[str, float]]:
    """The matmul roofline of every device the columns run on (with ORT's MatMul where an ORT column runs)."""
    out = {}
    for device in sorted({b.device for b in columns}):
        with_ort = any(b.device == device and b.name.startswith("ort") for b in columns)
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
    repeat: int
    warmup: int
    threads: int
    roofline: dict[str, dict[str, float]]  # device -> {"torch", "ort", "peak"} FLOP/s
    devices: dict[str, str]  # backend -> device
    flops: dict[int, dict[str, int]]  # batch -> stage -> FLOPs per generation
    measurements: list[Measurement]
    load_average: dict[str, float]  # 1-minute load average of the machine at the start and the end


def _warm_up(columns: list[Backend], labels: list[int], params: SamplingParams, seed: int, warmup: int,
             bar: tqdm) -> dict[str, int]:
    """`warmup` unmeasured generations per column; the first one counts the FLOPs of a generation."""
    flops = {}
    for i, b in enumerate(columns):
        bar.set_postfix_str(f"warm-up {b.name} x{len(labels)}")
        for w in range(warmup):
            if i == 0 and w == 0:
                flops = count_flops(b, labels, params, seed)
            else:
                with torch.inference_mode():
                    generate_images(b.stages, labels, params, seed, len(labels))
            bar.update()
    return flops


def _measure_batch(columns: list[Backend], labels: list[int], params: SamplingParams, seed: int, repeat: int,
                   bar: tqdm) -> list[Measurement]:
    """`repeat` rounds, each running every column once, starting one column later every round."""
    cells = {b.name: Measurement(b.name, len(labels)) for b in columns}
    for r in range(repeat):
        k = r % len(columns)
        for b in columns[k:] + columns[:k]:
            bar.set_postfix_str(f"round {r + 1} {b.name} x{len(labels)}")
            m = cells[b.name]
            measure_once(b, labels, params, seed, m)
            log.info("round %d %s x%d: %.2f s, %.2f s in stage calls", r + 1, b.name, len(labels), m.wall_s[-1],
                     sum(v[-1] for v in m.stage_s.values()))
            bar.update()
    return list(cells.values())


def check_settings(backends: list[str], repeat: int, warmup: int) -> None:
    """Refuse what cannot be measured before any work."""
    check_backends(backends)
    if repeat < 1 or warmup < 1:
        raise ValueError(f"--repeat and --warmup must be >= 1, got {repeat} and {warmup}")


def run_benchmark(engines: str | Path, backends: list[str], batches: list[int], params: SamplingParams,
                  repeat: int = 3, warmup: int = 1, threads: int | None = None, seed: int = 0,
                  progress: bool = True) -> BenchResult:
    """Warm up, then measure every backend at every batch `repeat` times, interleaved round-robin."""
    check_settings(backends, repeat, warmup)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    engines = Path(engines)
    manifest = Manifest.load(engines)
    config = manifest.d2c_config
    for batch in batches:
        check_request(config, manifest.max_batch, bench_labels(config.num_classes, batch))
    columns = [open_bench_backend(engines, name, threads) for name in backends]
    for b in columns:
        log.info("%-9s %s", b.name, b.description)
    load = {"start": os.getloadavg()[0]}
    roofline = measure_rooflines(columns, threads)
    flops, results = {}, []
    bar = tqdm(total=len(batches) * len(columns) * (warmup + repeat), desc="bench", unit="gen", disable=not progress)
    with logging_redirect_tqdm():
        for batch in batches:
            labels = bench_labels(config.num_classes, batch)
            flops[batch] = _warm_up(columns, labels, params, seed, warmup, bar)
            results.extend(_measure_batch(columns, labels, params, seed, repeat, bar))
    bar.close()
    load["end"] = os.getloadavg()[0]
    for device, again in measure_rooflines(columns, threads).items():  # the better of before and after
        roofline[device] = {k: max(v, again[k]) for k, v in roofline[device].items()}
    return BenchResult(config=config.to_dict(), backends={b.name: b.description for b in columns}, batches=batches,
                       params=params, repeat=repeat, warmup=warmup, threads=threads, roofline=roofline,
                       devices={b.name: b.device for b in columns}, flops=flops, measurements=results,
                       load_average=load)


def bench_from_config(config: str, out: Path, backends: list[str], batches: list[int], params: SamplingParams,
                      **kwargs) -> BenchResult:
    """Export `config` into a temporary engines directory under `out`, benchmark it, then remove it."""
    check_settings(backends, kwargs.get("repeat", 3), kwargs.get("warmup", 1))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".engines-") as tmp:
        export_for_bench(config, Path(tmp), backends, max(DEFAULT_MAX_BATCH, *batches))
        return run_benchmark(tmp, backends, batches, params, **kwargs)
