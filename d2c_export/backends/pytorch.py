"""The PyTorch backend: the stages' reference modules (the specs' wrappers), rebuilt from the manifest's source.

FP32 is the reference itself. FP16 and BF16 cast the weights of the matmuls, convolutions and embeddings once
(`cast_weights`; norms and other parameters stay FP32) and run every stage under autocast, which keeps
softmax, norms and reductions in FP32 where the device's autocast does; the DDPM update sees FP32 x and
coefficients. Stage outputs come back as FP32. On CUDA the loop's tensors stay
on the device, the gpt KV cache is static (one per row count, bound in place), and with `graphs` on, the gpt
step and the denoising steps of a whole masked step (`denoise`) are replayed as CUDA graphs
(`graphs.CallableGraphs`), captured per shape, in bounded caches whose memory `graph_memory_bytes` reports.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from d2c_export.backends.base import Backend
from d2c_export.backends.graphs import CallableGraphs
from d2c_export.backends.registry import BackendSpec, OpenOptions, Precision, Target, register_backend
from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable
from d2c_export.stages import STAGES
from reference.diffusion import denoise_steps
from reference.gpt import cache_input_names, empty_cache
from reference.stage_networks import as_outputs

DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
CAST_MODULES = (nn.Linear, nn.Conv2d, nn.Embedding)  # their weights in reduced precision; everything else FP32


def cast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` with the weights of its CAST_MODULES in `dtype`; FP32 gives `model` itself."""
    if dtype is not torch.float32:
        model = copy.deepcopy(model)  # the engines' model is shared (the parity reference, other backends)
        for module in model.modules():
            if isinstance(module, CAST_MODULES):
                module.to(dtype)
    return model


class TorchBackend(Backend):
    """Every stage's module on `device` at `precision`; with `graph_device` (a CUDA device seam), CUDA graphs."""

    def __init__(self, engines: Engines, device: str = "cpu", precision: Precision = Precision.FP32,
                 graph_device=None):
        self.target = Target("torch", precision)
        self.config = engines.config
        self.max_batch = engines.max_batch
        self.device = device
        self.dtype = DTYPES[precision]
        model = cast_weights(engines.model(), self.dtype).to(device)
        self.modules = {spec.name: spec.wrapper(model).eval() for spec in engines.specs()}
        self._caches: dict[int, tuple[Tensor, Tensor]] = {}
        self.graphs = None if graph_device is None else {"gpt": CallableGraphs(graph_device),
                                                         "denoise": CallableGraphs(graph_device)}
        self.graphs_denoise = self.graphs is not None
        where = f"{device}, {torch.get_num_threads()} threads" if device == "cpu" else device
        self.description = (f"PyTorch eager ({precision.value}, {where}"
                            f"{', CUDA graphs' if self.graphs is not None else ''})")

    def _call(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        args = [inputs[t.name].to(self.device) for t in STAGES[stage].input_specs(self.config) if t.name in inputs]
        if self.dtype is torch.float32:
            return as_outputs(self.modules[stage](*args))
        with torch.autocast(torch.device(self.device).type, dtype=self.dtype, cache_enabled=False):
            out = as_outputs(self.modules[stage](*args))
        return tuple(o.float() if o.is_floating_point() else o for o in out)

    @torch.no_grad()
    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if self.graphs is None or stage != "gpt":
            return self._call(stage, inputs)
        feeds = {n: t.to(self.device) for n, t in inputs.items()}
        return self.graphs["gpt"]("gpt", lambda f: self._call(stage, f), feeds,
                                  persistent=frozenset(cache_input_names(self.config.gpt.n_layer)))

    @torch.no_grad()
    def denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        if self.graphs is None:
            return denoise_steps(self.run, feeds)
        return self.graphs["denoise"]("denoise", lambda f: denoise_steps(self._call, f), feeds)

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        """Zeroed caches for `rows`, the same tensors on every call (a captured gpt graph reads them in place)."""
        if rows not in self._caches:
            self._caches[rows] = empty_cache(self.config.gpt, rows, device=self.device)
        k, v = self._caches[rows]
        k.zero_()
        v.zero_()
        return k, v

    def graph_replays(self) -> dict[str, int]:
        return {} if self.graphs is None else {name: g.replays for name, g in self.graphs.items()}

    def graph_memory_bytes(self) -> int:
        return 0 if self.graphs is None else sum(g.memory_bytes() for g in self.graphs.values())

    def close(self) -> None:
        """Drop the modules (the cast copy of the weights), the KV caches and the captured graphs."""
        self.modules.clear()
        self._caches.clear()
        self.graphs, self.graphs_denoise = None, False


def open_torch(engines: Engines, precision: Precision, options: OpenOptions) -> TorchBackend:
    """The PyTorch backend on `options.device` (default: CUDA when present, else the CPU), with CUDA graphs of its gpt
    step and denoising loops on CUDA at FP16 / BF16 unless `options.cuda_graphs` says otherwise."""
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    graphs = (on_cuda and precision is not Precision.FP32) if options.cuda_graphs is None else options.cuda_graphs
    if graphs and not on_cuda:
        raise BackendUnavailable(f"CUDA graphs need a CUDA device; {Target('torch', precision).name} runs on "
                                 f"{device} here")
    graph_device = None
    if graphs:
        from d2c_export.cuda_device import CudaDevice
        graph_device = CudaDevice()
    return TorchBackend(engines, device, precision, graph_device)


register_backend(BackendSpec(
    name="torch", summary="the reference PyTorch modules, rebuilt from the manifest's source (FP16 / BF16: cast "
    "weights under autocast, CUDA graphs on a GPU)", precisions=(Precision.FP32, Precision.FP16, Precision.BF16),
    open=open_torch, is_reference=True))

