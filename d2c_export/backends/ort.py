"""The ONNX Runtime backend: one session per stage graph, created once, run through IO binding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from d2c_export.backends.base import Backend, check_graph_io
from d2c_export.backends.registry import BackendSpec, OpenOptions, Precision, Target, register_backend
from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable, StaleEngines

# ONNX Runtime's idle workers spin by default; here they would take the cores from the loop's torch ops between
# stage calls (and from any other process), so they sleep instead.
ORT_ALLOW_SPINNING = "0"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# the CUDA provider runs FP32 matmuls and convolutions as TF32 (10 mantissa bits) unless told not to: FP32 means FP32,
# and the FP16 graphs' FP32 regions stay FP32
CUDA_OPTIONS = {"use_tf32": "0"}


def onnxruntime():
    """The `onnxruntime` module, refused when both ONNX Runtime packages are installed (they share one module)."""
    from importlib import metadata
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.append(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        raise BackendUnavailable("both onnxruntime and onnxruntime-gpu are installed; they share one module and the "
                                 "CUDA provider disappears: pip uninstall -y onnxruntime onnxruntime-gpu, then "
                                 "install one")
    import onnxruntime as ort
    return ort


def providers() -> list[str]:
    """CUDA then CPU where the CUDA provider exists, else the CPU provider."""
    return [CUDA, CPU] if CUDA in onnxruntime().get_available_providers() else [CPU]


class OrtSession:
    """One ONNX Runtime session over a graph (`run(feeds) -> outputs`, numpy in and out)."""

    def __init__(self, path: Path, providers: list[str], threads: int = 0, optimize: bool = True):
        ort = onnxruntime()
        opts = ort.SessionOptions()
        # optimize=False for parity checks of FP16 graphs on the CPU: the optimizer drops the FP32->FP16->FP32
        # cast pairs the CPU provider puts around ops without FP16 kernels, which would hide the FP16 rounding.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize \
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per physical core)
        opts.add_session_config_entry("session.intra_op.allow_spinning", ORT_ALLOW_SPINNING)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=[(p, CUDA_OPTIONS) if p == CUDA else p for p in providers])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
            raise StaleEngines(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.device = "cuda" if CUDA in self.session.get_providers() else "cpu"
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


class OrtBackend(Backend):
    """The graphs of `precision` in an engines directory on ONNX Runtime (CUDA provider where it exists)."""

    def __init__(self, engines: Engines, precision: Precision = Precision.FP32, threads: int = 0,
                 keep_fp16_rounding: bool = False, provider_list: list[str] | None = None):
        ort = onnxruntime()
        self.target = Target("ort", precision)
        self.config = engines.config
        self.max_batch = engines.max_batch
        chosen = provider_list or providers()
        optimize = not (keep_fp16_rounding and precision is Precision.FP16)
        self.sessions = {}
        self.absent_optional = engines.absent_optional(self.target.kind)
        for spec in engines.specs(kind=self.target.kind):
            path = engines.file(spec.name, self.target.kind)
            session = OrtSession(path, chosen, threads, optimize)
            check_graph_io(path, spec.name, self.config,
                           [(i.name, len(i.shape)) for i in session.session.get_inputs()],
                           [(o.name, len(o.shape)) for o in session.session.get_outputs()],
                           lambda: engines.rebuild_command(self.target.kind))
            self.sessions[spec.name] = session
        first = next(iter(self.sessions.values()))
        self.providers = first.session.get_providers()
        self.compute_device = first.device
        # the loop's tensors stay on the host: `run` feeds ONNX Runtime numpy arrays, and the CUDA provider copies
        # them to its own device memory and its outputs back (the gpt KV cache included)
        self.device = "cpu"
        self.description = f"ONNX Runtime {ort.__version__} ({precision.value}) with {self.providers[0]}"

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        out = self.sessions[stage].run({name: t.numpy() for name, t in inputs.items()})
        return tuple(torch.from_numpy(out[name]) for name in self.output_names(stage))

    def close(self) -> None:
        """Drop the sessions (ONNX Runtime frees their memory and arenas with them)."""
        self.sessions.clear()


def open_ort(engines: Engines, precision: Precision, options: OpenOptions) -> OrtBackend:
    return OrtBackend(engines, precision, options.threads, options.keep_fp16_rounding)


def build_graphs(engines: Engines, precision: Precision, progress: bool) -> None:
    """The mixed-precision graphs, where FP16 ones are asked for and missing (FP32 graphs come with the export)."""
    if precision is Precision.FP16 and not engines.has("onnx-fp16"):
        from d2c_export.export.fp16 import convert_engines
        convert_engines(engines, progress=progress)


register_backend(BackendSpec(
    name="ort", summary="ONNX Runtime over the ONNX graphs (its CUDA provider where installed)",
    precisions=(Precision.FP32, Precision.FP16), open=open_ort, files="onnx", build=build_graphs, auto_rank=1,
    checked_unbuilt=True, matmul="onnxruntime"))
