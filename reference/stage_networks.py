"""The network behind each stage: one tensor-in, tensor-out module per stage, and the runner over them.

These modules are the natural export boundaries of the generator (gpt, cond, mar, diffusion, vae). The
toolchain's stage registry (`d2c_export.stages`) names them as its wrappers, so the reference, the
export and the PyTorch backend run the very same modules. Inputs are passed in the stage's input
order; a stage without an optional input (plain MAR has no fusion features) leaves it out.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from reference.diffusion import DenoiseStep, denoise_steps
from reference.gpt import GPT, empty_cache
from reference.mar_cache import MarCachedHead, MarCachedTail
from reference.model import D2C, D2CConfig


class GptStage(nn.Module):
    """The `gpt` step with one cache input per layer, keys first (`reference.gpt.cache_input_names`).

    A graph that sliced one stacked cache into layers would copy the whole cache on every decode step
    (ONNX has no views); per-layer inputs are read in place, as views of the caller's stacked cache.
    """

    def __init__(self, model: D2C):
        super().__init__()
        self.gpt: GPT = model.gpt

    def forward(self, ids: Tensor, input_pos: Tensor, *caches: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = self.gpt.args.n_layer
        return self.gpt(ids, input_pos, caches[:n], caches[n:])


class MarStage(nn.Module):
    """The `mar` step; plain MAR has no fusion input."""

    def __init__(self, model: D2C):
        super().__init__()
        self.mar = model.mar

    def forward(self, tokens: Tensor, kept: Tensor, pred: Tensor, labels: Tensor,
                fusion: Tensor | None = None) -> Tensor:
        return self.mar(tokens, kept, pred, labels, fusion)


STAGE_NETWORKS: dict[str, Callable[[D2C], nn.Module]] = {
    "gpt": GptStage,
    "cond": lambda model: model.mar.condition,
    "mar": MarStage,
    "mar_cached": lambda model: MarCachedHead(model.mar),  # LazyMAR's token cache: up to the cut layer
    "mar_fresh": lambda model: MarCachedTail(model.mar),  # and the chosen tokens after it
    "diffusion": lambda model: DenoiseStep(model.mar.diffloss.net),
    "vae": lambda model: model.vae,
}


def as_outputs(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A module's result as the tuple of the stage's outputs."""
    return out if isinstance(out, tuple) else (out,)


class ModuleStages:
    """Stages run by PyTorch modules on the CPU: `run(stage, inputs)` calls the stage's module on the inputs in
    order; `denoise` runs the steps one call each."""

    device = "cpu"
    draws_ahead = False  # CPU stages: the loop makes its draws when it asks (`Backend.draws_ahead` says why)

    def __init__(self, config: D2CConfig, modules: dict[str, nn.Module]):
        self.config = config
        self.modules = {name: module.eval() for name, module in modules.items()}

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return as_outputs(self.modules[stage](*inputs.values()))

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        return empty_cache(self.config.gpt, rows)

    def denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        return denoise_steps(self.run, feeds)


class TorchStages(ModuleStages):
    """The reference: every stage network of `model`, on the CPU in FP32."""

    def __init__(self, model: D2C):
        present = {"gpt": model.gpt is not None, "cond": model.mar.condition is not None}
        super().__init__(model.config, {name: build(model) for name, build in STAGE_NETWORKS.items()
                                        if present.get(name, True)})
