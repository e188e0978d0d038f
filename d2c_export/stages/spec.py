"""`StageSpec`: everything the toolchain knows about one stage, and the registry of stages.

Export, the FP16 conversion, the TensorRT build, the backends, the parity check, FLOP counting and
the benchmark report all read a stage's spec and nothing else about it: adding a stage is adding
one spec (a module in this package that calls `register`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from reference.model import D2C, D2CConfig

DEFAULT_MAX_BATCH = 16  # images per call the exported profiles admit (CFG doubles the rows)
MAX_EXPORT_BATCH = 4096  # the largest max batch an export accepts (and a manifest may record)

Sizes = dict[str, int]  # axis name -> size
Shapes = dict[str, tuple[int, ...]]  # input name -> shape


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. `shape` entries are ints (static) or axis names (dynamic)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int | str, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}


@dataclass(frozen=True)
class Tolerance:
    """Parity limits of a stage output against the reference, scale-free so large latents compare fairly."""

    max_rel: float  # max |a - b| / max |b|
    rel_l2: float  # ||a - b|| / ||b||
    min_cosine: float


# Against the FP32 reference: ONNX Runtime FP32 computes the same graph; TensorRT FP32 (TF32 off) uses other
# kernels and summation orders; FP16 graphs round every matmul.
ORT_FP32_TOLERANCE = Tolerance(max_rel=1e-5, rel_l2=1e-5, min_cosine=0.999999)
TRT_FP32_TOLERANCE = Tolerance(max_rel=1e-3, rel_l2=1e-4, min_cosine=0.99999)
FP16_TOLERANCE = Tolerance(max_rel=5e-2, rel_l2=1e-2, min_cosine=0.999)
# PyTorch: FP32 on the CPU is the reference itself, on CUDA other kernels and summation orders (TF32 off, as for
# TensorRT: TF32 rounding takes the VAE to a relative L2 of about 1e-3); FP16 / BF16 cast
# the weights and run under autocast (which keeps norms, softmax and reductions in FP32); bfloat16 keeps
# 8 mantissa bits to FP16's 11, so about 8x the rounding.
BF16_TOLERANCE = Tolerance(max_rel=2e-1, rel_l2=5e-2, min_cosine=0.995)
DEFAULT_TOLERANCES: dict[str, Tolerance] = {"onnx-fp32": ORT_FP32_TOLERANCE, "trt-fp32": TRT_FP32_TOLERANCE,
                                            "onnx-fp16": FP16_TOLERANCE, "trt-fp16": FP16_TOLERANCE,
                                            "torch-fp32": TRT_FP32_TOLERANCE, "torch-fp16": FP16_TOLERANCE,
                                            "torch-bf16": BF16_TOLERANCE}


def default_parity_sizes(profile: dict[str, tuple[int, int, int]]) -> list[Sizes]:
    """The export example's sizes plus two others: the profile's smallest and an odd size above opt."""
    smallest = {a: lo for a, (lo, _, _) in profile.items()}
    odd = {a: min(hi, opt + 1) for a, (_, opt, hi) in profile.items()}
    return [{a: opt for a, (_, opt, _) in profile.items()}, smallest, odd]


@dataclass(frozen=True)
class StageSpec:
    """One stage: its network, tensors, shape profile, examples, and what export, backends and reports need.

    - `wrapper` builds the stage's tensor-in, tensor-out module from the model (`reference.stage_networks`).
    - `axes(config, max_batch)` gives each dynamic axis its (min, opt, max); opt is also the export example's size
      (at least 2: the exporter would fix an axis it sees at 0 or 1).
    - `tuned(config, max_batch)`: the sizes the runtime calls most, which TensorRT tunes its kernels for (the
      plan's opt shapes), for the axes where they differ from the export example's.
    - `example(config, sizes, generator)` makes inputs of realistic range at `sizes`.
    - `flops(config, shapes)` counts one call from its input shapes (2 FLOPs per multiply-add).
    - `fp32_heads`: outputs computed in FP32 from their last MatMul on; `fp32_tails`: outputs whose nodes after
      the last MatMul/Gemm stay FP32 (the FP16 conversion's per-stage rules).
    - `cuda_graph`: called with the same shapes over and over, so a backend may replay it as a CUDA graph.
    - `parity_sizes(profile)`: the shapes the parity check runs; `tolerances`: limits per engine kind.
    - `varargs_from`: inputs from this index on are the wrapper's `*args` (the gpt's per-layer caches).
    - `postprocess`: the stage runs once per generation on the images the `vae` made (one input, one output, both
      images), in registration order; the five stages of the loop leave it False.
    - `optional`: only an opt-in sampler runs the stage (LazyMAR's token cache); it is exported with the others,
      but engines without it still open, and the loop refuses that sampler on them.
    """

    name: str
    label: str  # how reports name one call
    runs: str  # when the runtime calls it
    inputs: Callable[[D2CConfig], tuple[TensorSpec, ...]]
    outputs: Callable[[D2CConfig], tuple[TensorSpec, ...]]
    wrapper: Callable[[D2C], nn.Module]
    axes: Callable[[D2CConfig, int], dict[str, tuple[int, int, int]]]
    example: Callable[[D2CConfig, Sizes, torch.Generator], dict[str, Tensor]]
    flops: Callable[[D2CConfig, Shapes], int]
    tuned: Callable[[D2CConfig, int], Sizes] | None = None
    applies: Callable[[D2CConfig], bool] = lambda config: True
    fp32_heads: tuple[str, ...] = ()
    fp32_tails: tuple[str, ...] = ()
    cuda_graph: bool = False
    parity_sizes: Callable[[dict[str, tuple[int, int, int]]], list[Sizes]] = default_parity_sizes
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    varargs_from: int | None = None
    postprocess: bool = False
    optional: bool = False

    def input_specs(self, config: D2CConfig) -> tuple[TensorSpec, ...]:
        return self.inputs(config)

    def output_specs(self, config: D2CConfig) -> tuple[TensorSpec, ...]:
        return self.outputs(config)

    def profile(self, config: D2CConfig, max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, tuple[int, int, int]]:
        return self.axes(config, max_batch)

    def tuned_sizes(self, config: D2CConfig, max_batch: int = DEFAULT_MAX_BATCH) -> Sizes:
        """The size of each dynamic axis that TensorRT tunes for (the profile's opt unless `tuned` says otherwise),
        within the profile's [min, max]."""
        axes = self.profile(config, max_batch)
        tuned = {a: opt for a, (_, opt, _) in axes.items()} | (self.tuned(config, max_batch) if self.tuned else {})
        return {a: min(max(tuned[a], lo), hi) for a, (lo, _, hi) in axes.items()}

    def example_inputs(self, config: D2CConfig, sizes: Sizes | None = None, seed: int = 0,
                       max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, Tensor]:
        """Inputs of realistic range, in input order; `sizes` overrides the profile's opt sizes (export uses opt)."""
        opt = {axis: o for axis, (_, o, _) in self.profile(config, max_batch).items()}
        feeds = self.example(config, {**opt, **(sizes or {})}, torch.Generator().manual_seed(seed))
        names = [t.name for t in self.input_specs(config)]
        if set(feeds) != set(names):
            raise ValueError(f"stage {self.name!r}: the example makes {sorted(feeds)}, the spec declares {names}")
        return {name: feeds[name] for name in names}

    def parity_cases(self, config: D2CConfig, max_batch: int = DEFAULT_MAX_BATCH) -> list[Sizes]:
        return self.parity_sizes(self.profile(config, max_batch))

    def tolerance(self, kind: str) -> Tolerance:
        """The parity limits of an engine of `kind` ("onnx-fp32", "trt-fp16", ...) against the reference."""
        if kind not in self.tolerances:
            raise ValueError(f"stage {self.name!r} states no tolerance for {kind!r} (it has {', '.join(self.tolerances)})")
        return self.tolerances[kind]

    def count_flops(self, config: D2CConfig, inputs: dict[str, Tensor]) -> int:
        return self.flops(config, {name: tuple(t.shape) for name, t in inputs.items()})


STAGES: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    """Add `spec` to the registry (run order is registration order)."""
    if spec.name in STAGES:
        raise ValueError(f"stage {spec.name!r} is registered twice")
    STAGES[spec.name] = spec
    return spec


def stages_for(config: D2CConfig, names: str | list[str] = "all") -> list[StageSpec]:
    """The specs that apply to `config`, in run order; 'all' or a list of names."""
    wanted = list(STAGES) if names == "all" else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in wanted if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from: all, {', '.join(STAGES)}")
    chosen = [STAGES[n] for n in wanted if STAGES[n].applies(config)]
    if names != "all" and len(chosen) != len(wanted):
        skipped = [n for n in wanted if not STAGES[n].applies(config)]
        raise ValueError(f"stage(s) {skipped} do not exist for config {config.name!r} (fusion "
                         f"{config.mar.fusion.value})")
    return chosen
