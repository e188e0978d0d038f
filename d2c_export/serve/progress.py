"""A generation's progress and its cancellation, seen from its stage calls (the loop itself stays as it is).

`Watched` wraps a replica's stages for one generation: before each stage call it asks whether every job of the
generation was cancelled (then it raises `Cancelled` and the generation's work is dropped), and after it records
where the generation is: the stage (`discrete` tokens, `masked` steps, `decode`), the step within it and the
fraction of all the generation's stage calls done, which the replica streams to the clients that asked for it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from torch import Tensor

from d2c_export.backends.base import Wrapper
from d2c_export.stages import stages_for
from reference.pipeline import SamplingParams

PHASES = {"gpt": "discrete", "cond": "discrete", "mar": "masked", "diffusion": "masked"}  # else: decode
STOP_BEFORE = frozenset({"gpt", "mar", "vae"})  # where a cancelled generation stops: each token, each masked step


class Cancelled(Exception):
    """Every job of a generation was cancelled before it ended: its work is dropped."""


@dataclass(frozen=True)
class Progress:
    """Where a generation is: its stage, the step within it (done of steps) and the fraction of all its calls."""

    stage: str
    step: int
    steps: int
    fraction: float

    def as_dict(self) -> dict:
        return asdict(self)


def stage_calls(stages, params: SamplingParams) -> dict[str, int]:
    """The stage calls of one generation, by stage: one gpt call per discrete token, one cond call, one mar call
    per masked step and `diffusion_steps` diffusion calls after each, the VAE and the post-processing once."""
    config = stages.config
    calls = {"mar": params.num_iter, "diffusion": params.num_iter * params.diffusion_steps, "vae": 1}
    if config.gpt is not None:
        calls.update(gpt=config.gpt.block_size, cond=1)
    calls.update({spec.name: 1 for spec in stages_for(config) if spec.postprocess})
    return calls


class Watched(Wrapper):
    """Stages that report each call's progress to `report` and stop with `Cancelled` once `stopped()` says so."""

    def __init__(self, inner, params: SamplingParams, report: Callable[[Progress], None],
                 stopped: Callable[[], bool]):
        super().__init__(inner)
        self.expected = stage_calls(inner, params)
        self.total = sum(self.expected.values())
        self.done = {name: 0 for name in self.expected}
        self.report = report
        self.stopped = stopped

    def _count(self, stage: str, calls: int = 1) -> None:
        self.done[stage] = self.done.get(stage, 0) + calls
        phase = PHASES.get(stage, "decode")
        if phase == "discrete":
            step, steps = self.done.get("gpt", 0), self.expected.get("gpt", 0)
        elif phase == "masked":
            step, steps = self.done["mar"], self.expected["mar"]
        else:
            step, steps = 1, 1
        self.report(Progress(phase, step, steps, min(1.0, sum(self.done.values()) / self.total)))

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if stage in STOP_BEFORE and self.stopped():
            raise Cancelled
        out = self.inner.run(stage, inputs)
        self._count(stage)
        return out

    def replay_denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        out = self.inner.denoise(feeds)
        self._count("diffusion", feeds["timesteps"].shape[0])
        return out
