"""What wraps a backend's one `run` call: wall-clock or CUDA-event timing, FLOP counting, thread control."""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from d2c_export.backends.base import Wrapper
from d2c_export.stages import STAGES
from reference.diffusion import denoise_steps


@dataclass
class StageTimer:
    """Wall time spent inside each stage's calls: totals, call counts, and every call's duration."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    durations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def start(self, stage: str):
        return time.perf_counter()

    def stop(self, stage: str, token, calls: int = 1) -> None:
        """End a call started with `start`; `calls` > 1: one replay that ran that many calls (a CUDA graph)."""
        elapsed = time.perf_counter() - token
        self.seconds[stage] += elapsed
        self.calls[stage] += calls
        self.durations[stage].extend([elapsed / calls] * calls)

    def resolve(self) -> None:
        """Make the figures final (a no-op for wall time)."""


class CudaEventTimer(StageTimer):
    """Stage calls bracketed by CUDA events, read once the device is done (`resolve`)."""

    def __init__(self):
        super().__init__()
        self.events: dict[str, list[tuple]] = defaultdict(list)

    def start(self, stage: str):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, stage: str, token, calls: int = 1) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events[stage].append((token, end, calls))

    def resolve(self) -> None:
        torch.cuda.synchronize()
        for name, pairs in self.events.items():
            self.durations[name] = [s.elapsed_time(e) / 1e3 / n for s, e, n in pairs for _ in range(n)]
            self.seconds[name] = sum(self.durations[name])
            self.calls[name] = len(self.durations[name])


class Timed(Wrapper):
    """Every stage call timed into `timer`."""

    def __init__(self, inner, timer: StageTimer):
        super().__init__(inner)
        self.timer = timer

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        token = self.timer.start(stage)
        out = self.inner.run(stage, inputs)
        self.timer.stop(stage, token)
        return out

    def replay_denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        token = self.timer.start("diffusion")
        out = self.inner.denoise(feeds)
        self.timer.stop("diffusion", token, calls=feeds["timesteps"].shape[0])
        return out


class FlopCounted(Wrapper):
    """Every stage call's FLOPs counted from its input shapes by the stage's own formula."""

    def __init__(self, inner):
        super().__init__(inner)
        self.flops: dict[str, int] = defaultdict(int)

    def _count(self, stage: str, inputs: dict[str, Tensor]) -> None:
        self.flops[stage] += STAGES[stage].count_flops(self.config, inputs)

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        self._count(stage, inputs)
        return self.inner.run(stage, inputs)

    def replay_denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        def count_step(stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor]:  # counted from its shapes, not run
            self._count(stage, inputs)
            return (inputs["x"],)

        denoise_steps(count_step, feeds)  # every step's feeds, as the replayed loop made them
        return self.inner.denoise(feeds)


class StageThreads(Wrapper):
    """Stage calls run with `stage_threads` torch threads; the loop's own small tensor ops with `loop_threads`.

    The loop's math (sampling over the vocabulary, the DDPM bookkeeping) is small: extra threads only add a
    wake-up per op, milliseconds when another process holds the other cores.
    """

    def __init__(self, inner, stage_threads: int, loop_threads: int):
        super().__init__(inner)
        self.stage_threads, self.loop_threads = stage_threads, loop_threads

    def run(self, stage: str, inputs: dict[str, Tensor]) -> tuple[Tensor, ...]:
        torch.set_num_threads(self.stage_threads)  # a plain try: a context manager costs several us a call
        try:
            return self.inner.run(stage, inputs)
        finally:
            torch.set_num_threads(self.loop_threads)

    def replay_denoise(self, feeds: dict[str, Tensor]) -> Tensor:
        torch.set_num_threads(self.stage_threads)
        try:
            return self.inner.denoise(feeds)
        finally:
            torch.set_num_threads(self.loop_threads)
