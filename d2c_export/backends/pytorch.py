"""The PyTorch backend: the stages' reference modules (the specs' wrappers), rebuilt from the manifest's source."""
from __future__ import annotations

import torch
from torch import Tensor

from d2c_export.backends.base import Backend
from d2c_export.engines import Engines
from d2c_export.stages import STAGES
from d2c_export.targets import BackendName, Target
from reference.gpt import empty_cache
from reference.stage_networks import as_outputs


class TorchBackend(Backend):
    """Every stage's module on `device` (FP32); CPU tensors in and out, the gpt cache kept on the device."""

    def __init__(self, engines: Engines, device: str = "cpu"):
        self.target = Target(BackendName.TORCH)
        self.config = engines.config
        self.max_batch = engines.max_batch
        self.device = device
        model = engines.model().to(device)
        self.modules = {spec.name: spec.wrapper(model).eval() for spec in engines.specs()}
        where = f"{device}, {torch.get_num_threads()} threads" if device == "cpu" else device
        self.description = f"PyTorch eager (fp32, {where})"

    @torch.no_grad()
    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        args = [inputs[t.name].to(self.device) for t in STAGES[stage].input_specs(self.config) if t.name in inputs]
        out = as_outputs(self.modules[stage](*args))
        return out if self.device == "cpu" else tuple(o.cpu() for o in out)

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        return empty_cache(self.config.gpt, rows, device=self.device)
