"""A generation's progress and its cancellation, seen from its stage calls (the loop itself stays as it is).

`Watched` wraps a replica's stages for one generation of several jobs (requests), their images in job order:

- before each discrete token, masked step and the decoder it asks which jobs were cancelled: when all were, it
  raises `Cancelled` and the generation's work is dropped; at a masked step, the rows of the jobs cancelled since
  leave the generation: from then on the masked steps, their denoising and the decoder run on the other rows
  only, and the left rows' outputs are zeros that no one reads. The stages compute row by row (each image's rows
  read only themselves, and ONNX Runtime's CPU GEMM sums each output row in one fixed order whatever the row
  count), so the rows that stay come out as they would have: tested bit for bit on ONNX Runtime;
- after each call it records where the generation is: the stage (`discrete` tokens, `masked` steps, `decode`),
  the step within it and the fraction of all its stage calls done, which the replica streams to its clients.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from d2c_export.backends.base import Wrapper
from d2c_export.stages import stages_for
from reference.pipeline import SamplingParams

PHASES = {"gpt": "discrete", "cond": "discrete", "mar": "masked", "mar_cached": "masked", "mar_fresh": "masked",
          "diffusion": "masked"}  # else: decode
STEP_STARTS = frozenset({"mar", "mar_cached"})  # the first call of each masked step (`mar_cached`: the token cache's)
STOP_BEFORE = frozenset({"gpt", "vae"}) | STEP_STARTS  # where a cancelled generation stops: each token, each masked step


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
    per masked step (or one of each of the token cache's two stages) and its denoising steps' diffusion calls after
    it, the VAE and the post-processing once."""
    config = stages.config
    masked = params.stages_needed or ("mar",)
    calls = {**{name: params.num_iter for name in masked}, "diffusion": sum(params.denoising_counts()), "vae": 1}
    if config.gpt is not None:
        calls.update(gpt=config.gpt.block_size, cond=1)
    calls.update({spec.name: 1 for spec in stages_for(config) if spec.postprocess})
    return calls


class Watched(Wrapper):
    """Stages that report each call's progress to `report`; `sizes`: the images of each job, in row order;
    `cancelled(j)`: whether job j's client left (its rows leave at the next masked step, `Cancelled` once all did)."""

    def __init__(self, inner, params: SamplingParams, sizes: list[int], report: Callable[[Progress], None],
                 cancelled: Callable[[int], bool]):
        super().__init__(inner)
        self.expected = stage_calls(inner, params)
        self.total = sum(self.expected.values())
        self.done = {name: 0 for name in self.expected}
        self.report = report
        self.cancelled = cancelled
        self.sizes = sizes
        self.images = sum(sizes)
        self.gone: set[int] = set()  # the jobs whose rows left the generation
        self.live: Tensor | None = None  # the image rows still generated; None: all

    def _count(self, stage: str, calls: int = 1) -> None:
        self.done[stage] = self.done.get(stage, 0) + calls
        phase = PHASES.get(stage, "decode")
        if phase == "discrete":
            step, steps = self.done.get("gpt", 0), self.expected.get("gpt", 0)
        elif phase == "masked":
            first = "mar_cached" if "mar_cached" in self.expected else "mar"
            step, steps = self.done[first], self.expected[first]
        else:
            step, steps = 1, 1
        self.report(Progress(phase, step, steps, min(1.0, sum(self.done.values()) / self.total)))

    def _check(self, stage: str) -> None:
        gone = self.gone | {j for j in range(len(self.sizes)) if self.cancelled(j)}
        if len(gone) == len(self.sizes):
            raise Cancelled
        if stage in STEP_STARTS and gone != self.gone:  # a masked-step boundary: the cancelled jobs' rows leave
            self.gone = gone
            starts = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
            self.live = torch.tensor([starts[j] + i for j, size in enumerate(self.sizes) if j not in gone
                                      for i in range(size)])

    def _grouped(self, rows: Tensor, count: int, per_group: int) -> Tensor:
        """`rows` of each of the `count // per_group` groups (guided and unguided halves) of a batch-first input."""
        return torch.cat([rows + g * per_group for g in range(count // per_group)])

    def _on_live_rows(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """A batch-first stage call (every input has groups x images rows) on the live rows; the others' outputs
        are zeros."""
        first = next(iter(inputs.values()))
        rows = self._grouped(self.live.to(first.device), first.shape[0], self.images)
        outs = self.inner.run(stage, {name: t[rows] for name, t in inputs.items()})
        full = []
        for out in outs:
            whole = out.new_zeros((first.shape[0], *out.shape[1:]))
            whole[rows.to(out.device)] = out
            full.append(whole)
        return tuple(full)

    def _batch_first(self, inputs: dict[str, Tensor]) -> bool:
        counts = {t.shape[0] if t.dim() else 0 for t in inputs.values()}
        return len(counts) == 1 and counts.pop() % self.images == 0

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if stage in STOP_BEFORE:
            self._check(stage)
        if self.live is not None and stage == "diffusion":
            out = self._denoising_step(inputs)
        elif self.live is not None and stage not in ("gpt", "cond") and self._batch_first(inputs):
            out = self._on_live_rows(stage, inputs)
        else:
            out = self.inner.run(stage, inputs)
        self._count(stage)
        return out

    def _token_rows(self, count: int, device) -> Tensor:
        """The live images' rows of a masked step's N = images x tokens rows (batch-major)."""
        per_image = count // self.images
        live = self.live.to(device)
        return (live[:, None] * per_image + torch.arange(per_image, device=device)).reshape(-1)

    def _denoising_step(self, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """One denoising step (`reference.diffusion.denoise_steps`' feeds: x and noise (N, C), z (G * N, Dz)) on the
        live rows; the others' x are zeros."""
        x = inputs["x"]
        rows = self._token_rows(x.shape[0], x.device)
        z = inputs["z"]
        out, = self.inner.run("diffusion", {**inputs, "x": x[rows], "noise": inputs["noise"][rows],
                                            "z": z[self._grouped(rows.to(z.device), z.shape[0], x.shape[0])]})
        whole = out.new_zeros((x.shape[0], *out.shape[1:]))
        whole[rows.to(out.device)] = out
        return (whole,)

    def denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        """A masked step's denoising replayed as one graph (`replay_denoise`), on the live rows: noise (T + 1, N, C),
        z (G * N, Dz). Uncaptured, its steps pass `run` one by one."""
        if self.live is None or not self.graphs_denoise:
            return super().denoise(feeds)
        count = feeds["noise"].shape[1]
        rows = self._token_rows(count, feeds["noise"].device)
        x = super().denoise({**feeds, "noise": feeds["noise"][:, rows],
                             "z": feeds["z"][self._grouped(rows.to(feeds["z"].device), feeds["z"].shape[0], count)]})
        whole = x.new_zeros((count, *x.shape[1:]))
        whole[rows.to(x.device)] = x
        return whole

    def replay_denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        out = self.inner.denoise(feeds)
        self._count("diffusion", feeds["timesteps"].shape[0])
        return out
