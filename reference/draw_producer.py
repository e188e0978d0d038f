"""A generation's draws in the loop's order, from its plan: made when the loop asks, or ahead on a producer thread.

No draw depends on a result, so a generation's requests (`DrawRequest`, listed by `reference.pipeline.draw_plan`)
are known before it starts. `DrawProducer` makes them on one thread, a bounded number ahead of the loop
(`AHEAD`), while the loop runs its stage calls; `InlineDraws` makes each when the loop asks. Both hand the loop the
same numbers: each generator (`reference.sampling`) is used by one thread at a time, in the plan's order, and every
call the loop makes is checked against the plan, so a loop that asks for something else fails at once, by name.
Per-image draws (`ImageDraws`), whose generators are independent, may be split over a few threads
(`DRAW_WORKERS`): a request is done when every range of images is, before the next one starts.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from reference.sampling import Draws, ImageDraws, step_noise_buffer

PRODUCER_THREAD = "d2c-draws"
# How many requests of a kind the producer makes before the loop takes them: a few discrete tokens (each (B, V)
# float64, 2 MB at B = 16 and V = 16384) and two masked steps' noise.
AHEAD = {"token_uniforms": 8, "orders": 1, "step_noise": 2}
# Threads a producer splits per-image draws over: a token's (B, 16384) float64 uniforms take about 1.1 ms on one
# core at B = 16 (the generator's own speed), longer than a decode step on a GPU; up to 4 where the host has the
# cores to spare (a quarter of them), else the producer alone.
DRAW_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))


@dataclass(frozen=True)
class DrawRequest:
    """One call of the loop to its `Draws`: the method's name and its arguments."""

    kind: str  # "token_uniforms" (bsz, vocab) | "orders" (bsz, seq_len) | "step_noise" (bsz, pred, C, groups, steps)
    args: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.kind}{self.args}"


@dataclass
class DrawTime:
    """Where a generation's draws took time: `drawing_s` making them, `waiting_s` the loop spent on them (making
    them, inline; blocked until the producer had them, ahead: the part the stage calls did not hide)."""

    drawing_s: float = 0.0
    waiting_s: float = 0.0
    ahead: bool = False


def make_draw(draws: Draws, request: DrawRequest, pin: bool = False, pool: ThreadPoolExecutor | None = None,
              workers: int = 1) -> Tensor:
    """`request` answered by `draws`, written into a new buffer (pinned host memory with `pin`, for a CUDA loop);
    per-image draws split into `workers` ranges of images on `pool`, where one is given."""
    if request.kind == "orders":
        orders = draws.orders(*request.args)
        return orders.pin_memory() if pin else orders
    bsz = request.args[0]
    if request.kind == "token_uniforms":
        out = torch.empty(request.args, dtype=torch.float64, pin_memory=pin)
        method = draws.token_uniforms
    elif request.kind == "step_noise":
        _, pred, channels, _, steps = request.args
        out = step_noise_buffer(bsz, pred, channels, steps, pin)
        method = draws.step_noise
    else:
        raise ValueError(f"unknown draw request {request}")
    if pool is None or workers < 2 or bsz < 2 or not isinstance(draws, ImageDraws):
        return method(*request.args, out=out)
    parts = [pool.submit(method, *request.args, out=out, images=images) for images in image_ranges(bsz, workers)]
    for part in parts:
        part.result()  # a failure is raised here, once the request's other parts are done
    return out


def image_ranges(bsz: int, parts: int) -> list[range]:
    """`bsz` images cut into at most `parts` contiguous ranges of near-equal size."""
    bounds = [bsz * k // parts for k in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class InlineDraws:
    """The loop's `Draws` for one generation: each request of `plan` made from `draws` when the loop asks for it."""

    ahead = False

    def __init__(self, draws: Draws, plan: Sequence[DrawRequest], pin: bool = False):
        self.draws, self.plan, self.pin = draws, list(plan), pin
        self.time = DrawTime(ahead=self.ahead)
        self._taken = 0

    def token_uniforms(self, bsz: int, vocab: int) -> Tensor:
        return self._take(DrawRequest("token_uniforms", (bsz, vocab)))

    def orders(self, bsz: int, seq_len: int) -> Tensor:
        return self._take(DrawRequest("orders", (bsz, seq_len)))

    def step_noise(self, bsz: int, pred: int, channels: int, groups: int, steps: int) -> Tensor:
        return self._take(DrawRequest("step_noise", (bsz, pred, channels, groups, steps)))

    def _take(self, asked: DrawRequest) -> Tensor:
        i = self._taken
        planned = self.plan[i] if i < len(self.plan) else None
        if asked != planned:
            raise RuntimeError(f"the loop asked for draw {i}, {asked}, where the generation's plan has "
                               f"{planned or 'no more draws'}: reference.pipeline.draw_plan and the loop disagree")
        self._taken += 1
        start = time.perf_counter()
        value = self._next(asked)
        self.time.waiting_s += time.perf_counter() - start
        return value

    def _next(self, request: DrawRequest) -> Tensor:
        start = time.perf_counter()
        value = make_draw(self.draws, request, self.pin)
        self.time.drawing_s += time.perf_counter() - start
        return value

    def close(self) -> None:
        """Nothing to stop (`DrawProducer` stops its thread)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DrawProducer(InlineDraws):
    """`InlineDraws` made ahead: one producer thread makes the plan's requests in order, at most `AHEAD[kind]` before
    the loop takes them; the loop takes them in order. A failure of the producer is raised in the loop, at the draw
    it failed on; `close` (the end of the `with` block, however it ends) stops the producer and its helpers, and waits
    for them. `workers` (default `DRAW_WORKERS`) > 1: per-image draws are split over that many helper threads."""

    ahead = True

    def __init__(self, draws: Draws, plan: Sequence[DrawRequest], pin: bool = False, workers: int | None = None):
        super().__init__(draws, plan, pin)
        self.workers = workers = DRAW_WORKERS if workers is None else workers
        self._pool = None
        if workers > 1 and isinstance(draws, ImageDraws) and len(draws.images) > 1:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix=PRODUCER_THREAD)
        self._ready: deque[tuple[str, Tensor | BaseException]] = deque()  # (kind, draw), or ("failure", error)
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._produce, name=PRODUCER_THREAD, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for request in self.plan:
                with self._changed:  # room for one more of its kind
                    while self._waiting(request.kind) >= AHEAD[request.kind] and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                start = time.perf_counter()  # the producer and its helpers alone use the generators
                value = make_draw(self.draws, request, self.pin, self._pool, self.workers)
                self.time.drawing_s += time.perf_counter() - start
                with self._changed:
                    self._ready.append((request.kind, value))
                    self._changed.notify_all()
        except BaseException as error:  # handed to the loop, which raises it where it takes this draw
            with self._changed:
                self._ready.append(("failure", error))
                self._changed.notify_all()

    def _waiting(self, kind: str) -> int:
        """Draws of `kind` made and not yet taken."""
        return sum(k == kind for k, _ in self._ready)

    def _next(self, request: DrawRequest) -> Tensor:
        with self._changed:
            while not self._ready:
                self._changed.wait()
            kind, value = self._ready[0]
            if kind != "failure":  # a failure stays, for every later ask
                self._ready.popleft()
                self._changed.notify_all()
        if kind == "failure":
            raise value
        return value

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._ready.clear()
            self._changed.notify_all()
        self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def planned_draws(draws: Draws, plan: Sequence[DrawRequest], ahead: bool, pin: bool = False) -> InlineDraws:
    """The loop's draws for one generation: made ahead by a producer thread, or inline; use it in a `with` block."""
    return DrawProducer(draws, plan, pin) if ahead else InlineDraws(draws, plan, pin)
