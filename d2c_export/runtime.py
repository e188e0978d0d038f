"""The runtime: stage backends behind one interface, feeding the shared generation loop."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from d2c_export.manifest import EngineError, Manifest
from d2c_export.sources import model_from_source
from d2c_export.stages import STAGES, stages_for
from reference.gpt import empty_cache
from reference.model import D2CConfig
from reference.pipeline import Generation, SamplingParams, TorchStages, generate_with
from reference.sampling import TorchDraws

log = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort", "torch")
# The loop's own tensor math (sampling over the vocabulary, the DDPM bookkeeping) is small: extra threads only
# add a wake-up per op, milliseconds when another process holds the other cores. Stage calls keep the caller's.
LOOP_THREADS = 1
# ONNX Runtime's idle workers spin by default; here they would take the cores from the loop's torch ops between
# stage calls (and from any other process), so they sleep instead.
ORT_ALLOW_SPINNING = "0"


class OrtStage:
    """One ONNX Runtime session, created once, run through IO binding (`run(feeds) -> outputs`)."""

    def __init__(self, path: Path, providers: list[str], threads: int = 0, optimize: bool = True):
        opts = ort.SessionOptions()
        # optimize=False for parity checks of FP16 graphs on the CPU: the optimizer drops the FP32->FP16->FP32
        # cast pairs the CPU provider puts around ops without FP16 kernels, which would hide the FP16 rounding.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
        opts.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
            raise EngineError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        if self.device == "cpu":  # arrays over ONNX Runtime's own output buffers: no copy, no fresh pages
            return {name: value.numpy() for name, value in zip(self.output_names, binding.get_outputs())}
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))


@dataclass
class StageTimer:
    """Wall time spent inside each stage's calls: totals, call counts, and every call's duration."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    durations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            self.calls[name] += 1
            self.durations[name].append(elapsed)
            return out
        return timed


class GraphStages:
    """The five pipeline stages over per-stage graph runners; subclasses define `_run(stage, *args)`."""

    config: D2CConfig

    def _run(self, stage: str, *args: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def gpt(self, ids, input_pos, k_cache, v_cache):  # the graph takes the caches layer by layer (views, no copy)
        return tuple(self._run("gpt", ids, input_pos, *k_cache.unbind(0), *v_cache.unbind(0)))

    def gpt_cache(self, rows):
        return empty_cache(self.config.gpt, rows)

    def cond(self, ids):
        return self._run("cond", ids)[0]

    def mar(self, tokens, kept, pred, labels, fusion):
        return self._run("mar", tokens, kept, pred, labels, fusion)[0]

    def diffusion(self, x, t, z, noise, cfg, temperature, coefs):
        return self._run("diffusion", x, t, z, noise, cfg, temperature, coefs)[0]

    def vae(self, latents):
        return self._run("vae", latents)[0]


class OrtStages(GraphStages):
    """The stages of an engines directory on ONNX Runtime; same interface as `reference.pipeline.TorchStages`."""

    def __init__(self, engines: Path, manifest: Manifest, precision: str = "fp32", providers: list[str] | None = None,
                 threads: int = 0, optimize: bool = True):
        self.config: D2CConfig = manifest.d2c_config
        self.max_batch = manifest.max_batch
        providers = providers or ["CPUExecutionProvider"]
        self.sessions: dict[str, OrtStage] = {}
        for spec in stages_for(self.config):
            entry = manifest.entry(spec.name, f"onnx-{precision}", engines)
            self.sessions[spec.name] = OrtStage(engines / entry.main_file, providers, threads, optimize)
        self.providers = self.sessions["mar"].session.get_providers()

    def _run(self, stage: str, *args: Tensor | None) -> list[Tensor]:
        specs = STAGES[stage].input_specs(self.config)
        feeds = {s.name: a.numpy() for s, a in zip(specs, args) if a is not None}
        out = self.sessions[stage].run(feeds)
        return [torch.from_numpy(out[s.name]) for s in STAGES[stage].output_specs(self.config)]



def open_backend(engines: str | Path, backend: str = "auto", precision: str = "fp32", threads: int = 0):
    """Stages for `backend` over the engines in `engines`; returns (stages, description).

    `threads` sets ONNX Runtime's intra-op threads (0: its default).

    `auto` picks TensorRT when plans of `precision` exist and TensorRT and a CUDA device are present, else
    ONNX Runtime (CUDA provider when present). An explicitly requested backend that is unavailable is an
    error, never a silent fallback.
    """
    engines = Path(engines)
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    manifest = Manifest.load(engines)
    if backend == "torch":
        model = model_from_source(manifest.d2c_config, manifest.source)
        return TorchStages(model), "PyTorch reference (fp32, cpu)"
    from d2c_export import trt_backend  # imports tensorrt only when plans are opened
    if backend == "trt" or (backend == "auto" and trt_backend.trt_usable(manifest, precision)):
        stages = trt_backend.TrtStages(engines, manifest, precision)
        return stages, stages.description
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
        if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
    stages = OrtStages(engines, manifest, precision, providers, threads)
    return stages, f"ONNX Runtime {ort.__version__} ({precision}) with {stages.providers[0]}"


def check_request(config: D2CConfig, max_batch: int, labels: list[int]) -> None:
    """Refuse what the exported graphs cannot run, before any work."""
    bad = [c for c in labels if not 0 <= c < config.num_classes]
    if bad:
        raise EngineError(f"class {bad[0]} is out of range: this model has classes 0..{config.num_classes - 1}")
    if len(labels) > max_batch:
        raise EngineError(f"{len(labels)} images in one batch exceeds the exported profile (max batch {max_batch}); "
                          f"use --num-images <= {max_batch} or re-export with a larger --max-batch")


def generate_images(stages, labels: list[int], params: SamplingParams, seed: int,
                    max_batch: int | None = None, progress: bool = False,
                    timer: StageTimer | None = None) -> tuple[Generation, StageTimer]:
    """Run the shared generation loop on `stages`, timing each stage's calls (into `timer` when given)."""
    check_request(stages.config, max_batch or len(labels), labels)
    timer = StageTimer() if timer is None else timer
    stage_threads = torch.get_num_threads()
    timed = _TimedStages(stages, timer, stage_threads)
    torch.set_num_threads(LOOP_THREADS)
    try:
        result = generate_with(timed, torch.tensor(labels), params, TorchDraws(seed), progress=progress)
    finally:
        torch.set_num_threads(stage_threads)
    if not bool(torch.isfinite(result.images).all()):
        bad = "latents" if not bool(torch.isfinite(result.latents).all()) else "images"
        raise EngineError(f"generation produced non-finite {bad} (inf/NaN), e.g. an FP16 overflow of "
                          "out-of-range latents; run with --precision fp32 or check the weights")
    return result, timer


class _TimedStages:
    """The stages timed, each call run with the caller's torch threads (the loop itself runs on LOOP_THREADS)."""

    def __init__(self, stages, timer: StageTimer, threads: int):
        self.config = stages.config
        self.gpt_cache = stages.gpt_cache  # allocation, not a stage call: untimed
        for name in STAGES:
            setattr(self, name, timer.wrap(name, _with_threads(getattr(stages, name), threads)))


def _with_threads(fn: Callable, threads: int) -> Callable:
    def call(*args):
        torch.set_num_threads(threads)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(LOOP_THREADS)
    return call


def save_images(images: Tensor, path: str | Path) -> Path:
    """Write (B, 3, H, W) images in [-1, 1] as one PNG (a grid when B > 1), atomically."""
    from PIL import Image

    from d2c_export.manifest import atomic_path
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    b, h, w, _ = x.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = x[i]
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path
