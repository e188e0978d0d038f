"""Polygraphy's comparator on the TensorRT plans: each plan against ONNX Runtime FP32 and the reference.

`compare_runners` runs one stage's example inputs (the parity shapes of `check.parity_sizes`) through a
runner under test, an ONNX Runtime FP32 runner and the reference module, with `Comparator.run`, and
judges the pairs with `Comparator.compare_accuracy` and this project's scale-free tolerance function.
polygraphy and tensorrt are imported only inside the functions.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from d2c_export.check import StageReport, compare, parity_sizes
from d2c_export.manifest import EngineError, Manifest
from d2c_export.sources import model_from_source
from d2c_export.stages import FP16_TOLERANCE, StageSpec, Tolerance, stages_for
from reference.model import D2C

log = logging.getLogger(__name__)

# TensorRT FP32 (TF32 off) against FP32 references: other kernels and summation orders than ONNX Runtime's.
TRT_FP32_TOLERANCE = Tolerance(max_rel=1e-3, rel_l2=1e-4, min_cosine=0.99999)
REFERENCE = "reference"
ORT_FP32 = "onnxrt-fp32"
LABELS = {REFERENCE: "ref", ORT_FP32: "ort32"}  # the table's name of what a plan is compared with


def polygraphy_missing() -> str | None:
    if importlib.util.find_spec("polygraphy") is None:
        return "polygraphy is not installed, so the TensorRT plans are not compared: pip install 'd2c-export[trt]'"
    return None


def reference_runner(model: D2C, spec: StageSpec):
    """A polygraphy runner over the stage's reference module (numpy in, numpy out)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class ReferenceRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=REFERENCE, prefix="reference-runner")
            self.specs = spec.input_specs(model.config)
            self.outputs = spec.output_specs(model.config)

        def activate_impl(self):
            self.module = spec.wrapper(model).eval()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for t in self.specs:
                meta.add(t.name, dtype=np.dtype(str(t.dtype).removeprefix("torch.")),
                         shape=[d if isinstance(d, int) else -1 for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                out = self.module(*(torch.from_numpy(np.asarray(feed_dict[t.name])) for t in self.specs))
            out = out if isinstance(out, tuple) else (out,)
            self.inference_time = time.perf_counter() - start
            return OrderedDict((t.name, o.numpy()) for t, o in zip(self.outputs, out))

        def deactivate_impl(self):
            del self.module

    return ReferenceRunner()


def stage_feeds(model: D2C, spec: StageSpec, seed: int = 0) -> list[OrderedDict[str, np.ndarray]]:
    """The data loader: the stage's example inputs at the parity shapes, as numpy feed dicts."""
    config = model.config
    return [OrderedDict((t.name, spec.example_inputs(config, sizes, seed=seed + i)[t.name].numpy())
                        for t in spec.input_specs(config))
            for i, sizes in enumerate(parity_sizes(spec, config))]


def compare_runners(model: D2C, spec: StageSpec, under_test, fp32_graph: Path, tolerance: Tolerance,
                    seed: int = 0) -> list[StageReport]:
    """`under_test` against ONNX Runtime FP32 and the reference, through polygraphy's Comparator."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER
    if hasattr(G_LOGGER, "module_severity"):
        G_LOGGER.module_severity = G_LOGGER.WARNING  # the parity table is the report
    else:
        G_LOGGER.severity = G_LOGGER.WARNING

    feeds = stage_feeds(model, spec, seed)
    sizes = parity_sizes(spec, model.config)
    ort_fp32 = OnnxrtRunner(SessionFromOnnx(str(fp32_graph), providers=["CPUExecutionProvider"]), name=ORT_FP32)
    runners = [under_test, ort_fp32, reference_runner(model, spec)]
    results = Comparator.run(runners, data_loader=feeds)
    reports: list[StageReport] = []
    iterations = {name: list(its) for name, its in results.items()}

    def judge(got, ref) -> OrderedDict[str, bool]:  # one call per pair of runners and iteration
        index = next(i for i, it in enumerate(iterations[got.runner_name]) if it is got)
        verdicts = OrderedDict()
        for t in spec.output_specs(model.config):
            result = compare(np.asarray(got[t.name]), np.asarray(ref[t.name]))
            passed = result.within(tolerance)
            reports.append(StageReport(spec.name, sizes[index], f"{t.name}/{LABELS[ref.runner_name]}",
                                       result, passed))
            verdicts[t.name] = passed
        return verdicts

    Comparator.compare_accuracy(results, comparisons=[(0, 1), (0, 2)], compare_func=judge)
    return reports


def check_plans(engines: str | Path, precision: str = "fp16") -> list[StageReport]:
    """Every TensorRT plan of `precision` in `engines` against ONNX Runtime FP32 and the reference."""
    from d2c_export.trt_backend import check_plan
    from d2c_export.trt_build import RUN_HINT, require_tensorrt, running_platform
    trt = require_tensorrt(RUN_HINT)
    missing = polygraphy_missing()
    if missing:
        raise EngineError(missing)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engines = Path(engines)
    manifest = Manifest.load(engines)
    model = model_from_source(manifest.d2c_config, manifest.source)
    running = running_platform(trt)
    tolerance = FP16_TOLERANCE if precision == "fp16" else TRT_FP32_TOLERANCE
    reports = []
    for spec in stages_for(model.config):
        entry = manifest.entry(spec.name, f"trt-{precision}", engines)
        check_plan(spec.name, entry, running, engines, manifest)
        fp32 = manifest.entry(spec.name, "onnx-fp32", engines)
        runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engines / entry.main_file))), name=f"trt-{precision}")
        reports.extend(compare_runners(model, spec, runner, engines / fp32.main_file, tolerance))
    return reports


def available_plan_reports(engines: str | Path, precision: str) -> list[StageReport]:
    """`check_plans` where TensorRT, a GPU and plans of `precision` exist; otherwise none, with a line saying why."""
    from d2c_export.trt_backend import plans_present
    from d2c_export.trt_build import tensorrt_missing
    if not plans_present(Manifest.load(engines), precision):
        return []
    reason = tensorrt_missing() or polygraphy_missing()
    if reason:
        log.warning("TensorRT plans not compared: %s", reason)
        return []
    return check_plans(engines, precision)
