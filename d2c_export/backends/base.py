"""The backend interface: a runner with a context-managed lifecycle and one `run(stage, inputs) -> outputs`.

A backend holds what it opened (sessions, engines and their contexts, weights, caches, CUDA graphs, device memory)
until `close()` gives it back; every holder uses it as a context manager (or closes it), and a closed backend
runs no more.

What differs per stage is data on the stage's spec (`d2c_export.stages`), never a method per stage:
a backend binds inputs and outputs by the spec's tensor names. The shared loop
(`reference.pipeline.generate_with`) calls `run`, `gpt_cache` and `denoise` and nothing else, with its tensors
on the backend's `device`. `denoise` runs the denoising steps of one masked step through `run`
(`reference.diffusion.denoise_steps`); a backend that replays them as one CUDA graph says so in
`graphs_denoise`, and the wrappers then time and count the replay as the steps it stands for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import Tensor

from d2c_export.errors import StaleEngines
from d2c_export.stages import STAGES
from d2c_export.backends.registry import Target
from reference.diffusion import denoise_steps
from reference.gpt import empty_cache
from reference.model import D2CConfig


class Backend:
    """Stages of one model on one target. Subclasses implement `run`; `gpt_cache` may place the cache elsewhere."""

    target: Target
    config: D2CConfig
    max_batch: int  # images per call the stages admit (the exported profile)
    description: str  # what runs, for logs and reports
    device: str = "cpu"  # where the loop keeps its tensors: the stage inputs and outputs ("cpu" or "cuda")
    compute_device: str | None = None  # where the stages compute, when not `device` (ONNX Runtime's CUDA provider)
    graphs_denoise: bool = False  # `denoise` replays the steps as one CUDA graph instead of calling `run`
    absent_optional: dict[str, str] = {}  # optional stages these engines were built without -> the command to build

    @property
    def draws_ahead(self) -> bool:
        """Whether the loop's draws are made ahead by a producer thread (`reference.draw_producer`) while the stage
        calls run: where the stages compute on a GPU. The stages of a CPU backend already run on every core they
        are given, and a producer thread only takes cores from them (measured in the README's section on the
        loop's draws), so there the loop makes each draw when it asks."""
        return (self.compute_device or self.device) == "cuda"

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        """Run `stage` on `inputs` (input name -> tensor, in the stage's order); its outputs, in order, on `device`.

        Inputs on `device` are used where they are; host inputs are copied there first (parity checks)."""
        raise NotImplementedError

    def denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        """The denoising steps of one masked step (`reference.diffusion.denoise_steps`), one `run` per step."""
        return denoise_steps(self.run, feeds)

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:
        """Zeroed k_cache, v_cache (L, rows, H, S, hd) where `run("gpt")` reads them."""
        return empty_cache(self.config.gpt, rows)

    def output_names(self, stage: str) -> list[str]:
        return [t.name for t in STAGES[stage].output_specs(self.config)]

    def graph_replays(self) -> dict[str, int]:
        """CUDA graph replays so far, per stage (none for a backend without graphs)."""
        return {}

    def graph_memory_bytes(self) -> int:
        """Device memory its graph caches hold."""
        return 0

    def close(self) -> None:
        """Give back what the backend holds (sessions, engines, weights, caches, graphs, device memory)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_graph_io(path: Path, stage: str, config: D2CConfig, inputs: list[tuple[str, int]],
                   outputs: list[tuple[str, int]], fix: Callable[[], str]) -> None:
    """Refuse a graph or plan whose input and output names and ranks are not the stage's (another stage's file
    recorded under this stage, say); `fix()` makes the command that rebuilds it, only then."""
    spec = STAGES[stage]
    want = ([(t.name, len(t.shape)) for t in spec.input_specs(config)],
            [(t.name, len(t.shape)) for t in spec.output_specs(config)])
    if (sorted(inputs), sorted(outputs)) != (sorted(want[0]), sorted(want[1])):
        got = ", ".join(n for n, _ in inputs) + " -> " + ", ".join(n for n, _ in outputs)
        need = ", ".join(n for n, _ in want[0]) + " -> " + ", ".join(n for n, _ in want[1])
        raise StaleEngines(f"{path.name} is not the {stage} stage of this model (it computes {got}; the stage is "
                           f"{need}); rebuild with `{fix()}`")


class Wrapper(Backend):
    """A backend that passes every call to `inner`: the base of timing, FLOP counting and thread control.

    `denoise` runs the steps through this wrapper's `run`, so each step passes the wrapper; where `inner`
    replays them as one graph, the replay goes through `replay_denoise` instead (override both to see both).
    A wrapper holds nothing of its own: `inner` is given back by whoever opened it.
    """

    def __init__(self, inner: Backend):
        self.inner = inner
        self.target = inner.target
        self.description = inner.description
        self.config = inner.config
        self.max_batch = inner.max_batch
        self.device = inner.device
        self.compute_device = inner.compute_device
        self.graphs_denoise = inner.graphs_denoise
        self.absent_optional = inner.absent_optional

    @property
    def draws_ahead(self) -> bool:
        return self.inner.draws_ahead

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        return self.inner.run(stage, inputs)

    def denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        if self.graphs_denoise:
            return self.replay_denoise(feeds)
        return denoise_steps(self.run, feeds)

    def replay_denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        """The inner backend's one-graph replay of `denoise_steps(feeds)`."""
        return self.inner.denoise(feeds)

    def gpt_cache(self, rows: int) -> tuple[Tensor, Tensor]:  # allocation, not a stage call
        return self.inner.gpt_cache(rows)
