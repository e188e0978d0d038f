"""TensorRT plans from the ONNX graphs: strongly typed networks, one profile per dynamic input, a timing cache.

Precision lives in the graph (`export/fp16.py`): FP16 plans are built from the mixed-precision
`<stage>.fp16.onnx` graphs, FP32 plans from the FP32 graphs, both with TF32 off so FP32 tensors compute
in FP32. TensorRT 10 takes `1 << STRONGLY_TYPED` at network creation; TensorRT 11 networks are strongly
typed (and explicit batch) by default and the flag may be gone, so it is looked up with getattr and
passed only where it exists; BuilderFlag.TF32 likewise. `tensorrt` is imported only after a CUDA
device is found: creating a builder or runtime without one can crash the process.

The FP16 graphs keep FP32 inputs and cast them to FP16 first thing. An input that nothing but such casts reads
(the gpt's KV cache layers, the conditions of the diffusion head) is given the plan as FP16 instead
(`half_inputs`): the same values reach the network, and the runtime keeps those tensors in FP16, so a decode
step does not cast every cache layer again. The profile's opt shapes are the ones the runtime calls most
(`StageSpec.tuned_sizes`: a one-token decode step of a full batch, a full batch's masked step of denoising).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from types import ModuleType

import onnx
from tqdm import tqdm

from d2c_export.engines import Engines
from d2c_export.errors import EngineError
from d2c_export.manifest import StageEntry
from d2c_export.stages import Sizes
from d2c_export.trt_platform import require_tensorrt, running_platform, trt_logger
from reference.files import directory_lock, sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GIB = 4.0
TIMING_CACHE = "timing.cache"  # default timing cache, inside the engines directory


def plan_name(stage: str, precision: str) -> str:
    return f"{stage}.{precision}.plan"


def input_profiles(entry: StageEntry, tuned: Sizes | None = None
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every input with a dynamic axis, from the entry's input specs and profile; `tuned`
    gives the opt size of the axes it names (else the profile's opt)."""
    profiles = {}
    for spec in entry.inputs:
        shape = spec["shape"]
        if not any(isinstance(d, str) for d in shape):
            continue
        missing = [d for d in shape if isinstance(d, str) and d not in entry.profile]
        if missing:
            raise EngineError(f"input {spec['name']} has axes {missing} without a profile in the manifest; "
                              "re-export the graphs")
        lo, opt, hi = (tuple(entry.profile[d][k] if isinstance(d, str) else d for d in shape) for k in range(3))
        if tuned:
            opt = tuple(tuned.get(d, o) if isinstance(d, str) else d for d, o in zip(shape, opt))
        profiles[spec["name"]] = (lo, opt, hi)
    return profiles


def half_inputs(onnx_path: Path) -> list[str]:
    """The FP32 inputs of a graph that only casts to FP16 read (keep_io_types' casts of an FP16 graph)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def to_half(node: onnx.NodeProto) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16
                                              for a in node.attribute)

    return [i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            and readers.get(i.name) and all(to_half(n) for n in readers[i.name])]


def plan_entry(source: StageEntry, source_file: str, plan: str, digest: str, precision: str, platform: dict,
               build: dict) -> StageEntry:
    """The manifest entry of a plan built from the graph `source_file` (entry `source`) on `platform`."""
    return StageEntry(files={plan: digest}, precision=precision, inputs=source.inputs, outputs=source.outputs,
                      profile=source.profile, opset=source.opset,
                      tensorrt={**platform, "onnx": source_file, "onnx_sha256": source.files[source_file], **build})


def _network_flags(trt: ModuleType) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _load_timing_cache(config, path: Path | None):
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not fit this device/TensorRT; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    return cache


def build_plan(trt: ModuleType, onnx_path: Path, plan_path: Path, source: StageEntry, workspace_gib: float,
               timing_cache: Path | None, tuned: Sizes | None = None) -> None:
    """Parse `onnx_path` into a strongly typed network, build with `source`'s profile (opt sizes from `tuned`),
    write `plan_path` atomically."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so external weights resolve
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {errors}; re-export the graphs")
    half = set(half_inputs(onnx_path))
    for i in range(network.num_inputs):
        if network.get_input(i).name in half:
            network.get_input(i).dtype = trt.DataType.HALF  # read only by casts to FP16: the same values
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in input_profiles(source, tuned).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT could not build {onnx_path.name} (see the TensorRT log above); "
                          "try a larger --workspace")
    if timing_cache is not None:
        write_bytes_atomic(timing_cache, bytes(cache.serialize()))
    write_bytes_atomic(plan_path, bytes(serialized))


def build_engines(engines: Engines, fp16: bool = True, stages: str | list[str] = "all",
                  workspace_gib: float = DEFAULT_WORKSPACE_GIB, timing_cache: str | Path | None = None,
                  progress: bool = True, trt=None, device=None) -> None:
    """One plan per stage, kind `trt-fp16` (from the FP16 graphs, made first where missing) or `trt-fp32`.

    `trt` and `device` default to the `tensorrt` module and the CUDA device (the tests pass their contract fakes).
    """
    trt = trt or require_tensorrt()
    with directory_lock(engines.directory, "a TensorRT build"):
        _build_locked(engines, fp16, stages, workspace_gib, timing_cache, progress, trt, device)


def _build_locked(engines: Engines, fp16: bool, stages, workspace_gib: float, timing_cache, progress: bool, trt,
                  device) -> None:
    precision = "fp16" if fp16 else "fp32"
    specs = engines.specs(stages, kind="onnx-fp32")
    if fp16:
        todo = [s.name for s in specs if "onnx-fp16" not in engines.manifest.stages.get(s.name, {})]
        if todo:
            from d2c_export.export.fp16 import _convert_locked
            _convert_locked(engines, todo, progress)
    platform = running_platform(trt, device)
    cache = Path(timing_cache) if timing_cache is not None else engines.directory / TIMING_CACHE
    bar = tqdm(specs, desc=f"trt {precision}", unit="stage", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        start = time.perf_counter()
        source = engines.entry(spec.name, f"onnx-{precision}")
        plan = engines.directory / plan_name(spec.name, precision)
        tuned = spec.tuned_sizes(engines.config, engines.max_batch)
        build_plan(trt, engines.file(spec.name, f"onnx-{precision}"), plan, source, workspace_gib, cache, tuned)
        seconds = time.perf_counter() - start
        engines.manifest.stages[spec.name][f"trt-{precision}"] = plan_entry(
            source, source.main_file, plan.name, sha256_file(plan), precision, platform,
            {"workspace_gib": workspace_gib, "build_seconds": round(seconds, 1), "opt": tuned})
        engines.manifest.save(engines.directory)
        log.info("built %s in %.1f s -> %s", spec.name, seconds, plan.name)
