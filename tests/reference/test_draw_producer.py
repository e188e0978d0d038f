"""Draws made ahead of the loop: made while the stage calls run, the same numbers as inline, no thread left behind."""
from __future__ import annotations

import threading
from typing import Sequence

import pytest
import torch

from reference.diffusion import denoise_steps
from reference.model import PRESETS, D2C
from reference.pipeline import SamplingParams, generate_with
from reference.sampling import BatchDraws, ImageDraws, TorchDraws
from reference.stage_networks import TorchStages

# A hang guard, not a timing: how long a stand-in stage waits for a draw the producer is making.
GUARD_S = 30.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> D2C:
    torch.manual_seed(0)
    return D2C(PRESETS["d2c-tiny"]).eval()


def stages_drawing(model: D2C, ahead: bool) -> TorchStages:
    """The reference stages, with the loop's draws made ahead by a producer thread or when the loop asks."""
    stages = TorchStages(model)
    stages.draws_ahead = ahead
    return stages


def draws_threads() -> list[threading.Thread]:
    """The producer's threads still alive: itself (d2c-draws) and its helpers (d2c-draws_0, ...)."""
    return [t for t in threading.enumerate() if t.name.startswith("d2c-draws")]


class Recorded:
    """A `Draws` that records every request it answers (its kind and the thread that asked) and signals it."""

    def __init__(self, inner):
        self.inner = inner
        self.made: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def _record(self, kind: str, value):
        with self.changed:
            self.made.append((kind, threading.current_thread().name))
            self.changed.notify_all()
        return value

    def token_uniforms(self, *args, **kwargs):
        return self._record("token_uniforms", self.inner.token_uniforms(*args, **kwargs))

    def orders(self, *args, **kwargs):
        return self._record("orders", self.inner.orders(*args, **kwargs))

    def step_noise(self, *args, **kwargs):
        return self._record("step_noise", self.inner.step_noise(*args, **kwargs))

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _ in self.made)

    def wait_for(self, kind: str, count: int) -> bool:
        """Whether `count` requests of `kind` are made, waiting (up to the guard) for ones being made."""
        with self.changed:
            return self.changed.wait_for(lambda: self.count(kind) >= count, timeout=GUARD_S)


class SlowStages:
    """d2c-tiny's stages, standing in for slow ones that want their draws made ahead: the gpt call that computes
    discrete token i's logits does not end before token i's uniforms are made, nor the denoising of masked step s
    before the noise of step s + 1 is (the loop asks for them next). Drawn when the loop asks, they are made only
    after the call: the call notes that it waited in vain, and later calls no longer wait."""

    draws_ahead = True

    def __init__(self, model: D2C, draws: Recorded, num_iter: int):
        self.inner, self.draws, self.num_iter = TorchStages(model), draws, num_iter
        self.config, self.device = self.inner.config, self.inner.device
        self.gpt_calls = self.masked_steps = 0
        self.in_vain: list[str] = []

    def _expect(self, kind: str, count: int, where: str) -> None:
        if self.in_vain or not self.draws.wait_for(kind, count):
            self.in_vain.append(f"{where}: {self.draws.count(kind)} {kind} made, not {count}")

    def run(self, stage, inputs):
        out = self.inner.run(stage, inputs)
        if stage == "gpt":
            self.gpt_calls += 1
            self._expect("token_uniforms", self.gpt_calls, f"gpt call {self.gpt_calls}")
        return out

    def gpt_cache(self, rows):
        return self.inner.gpt_cache(rows)

    def denoise(self, feeds):
        x = denoise_steps(self.inner.run, feeds)
        self.masked_steps += 1
        if self.masked_steps < self.num_iter:
            self._expect("step_noise", self.masked_steps + 1, f"masked step {self.masked_steps}")
        return x


@pytest.mark.parametrize("batch_order", [False, True])
def test_the_next_draws_are_made_while_the_stage_calls_run(tiny, batch_order):
    """A discrete token's uniforms are made while the gpt call for its logits runs, and the noise of masked step
    s + 1 while step s denoises: on another thread than the loop's, with the numbers drawn inline."""
    params = SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=5)
    seeds = 3 if batch_order else [3, 4]
    make = (lambda: TorchDraws(3)) if batch_order else (lambda: ImageDraws(seeds))
    draws = Recorded(make())
    stages = SlowStages(tiny, draws, params.num_iter)
    got = generate_with(stages, torch.tensor([1, 7]), params, draws)
    assert not stages.in_vain, stages.in_vain
    assert stages.gpt_calls == tiny.config.gpt.block_size and stages.masked_steps == params.num_iter
    assert {thread for _, thread in draws.made} == {"d2c-draws"}, "the producer alone uses the generators"
    assert not draws_threads()
    want = generate_with(stages_drawing(tiny, False), torch.tensor([1, 7]), params, make())
    assert torch.equal(got.images, want.images) and torch.equal(got.latents, want.latents)
    assert torch.equal(got.discrete_ids, want.discrete_ids)
    assert got.draw_time.ahead and not want.draw_time.ahead
    assert got.draw_time.drawing_s > 0 and want.draw_time.waiting_s >= want.draw_time.drawing_s > 0


class CallByCall(BatchDraws):
    """Today's draws as the official code makes them: one `rand`, `randn` or `randperm` per call, no buffer reused."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, shape):
        return torch.rand(tuple(shape), generator=self.generator, dtype=torch.float64)

    def normal(self, shape):
        return torch.randn(tuple(shape), generator=self.generator)

    def permutation(self, n):
        return torch.randperm(n, generator=self.generator)


def call_by_call(seeds: int | Sequence[int]):
    if isinstance(seeds, int):
        return CallByCall(seeds)
    draws = ImageDraws(seeds)
    draws.images = [CallByCall(s) for s in seeds]
    return draws


@pytest.fixture(scope="module")
def demo() -> D2C:
    from d2c_export.sources import ModelRequest, build_model
    return build_model(ModelRequest())[0]  # checkpoints/d2c-demo.safetensors


@pytest.mark.parametrize("name", ["tiny", "demo"])
@pytest.mark.parametrize("batch_order", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_draws_ahead_and_inline_generate_what_call_by_call_draws_do(request, name, batch_order, cfg):
    """Bit for bit: the images, latents and ids of draws made ahead, made inline, and made call by call."""
    model = request.getfixturevalue(name)
    params = SamplingParams(cfg=cfg, num_iter=4, diffusion_steps=25 if name == "demo" else 6, top_k=9)
    labels = torch.tensor([1, 7, 3])
    seeds = 5 if batch_order else [5, 6, 7]
    want = generate_with(stages_drawing(model, False), labels, params, call_by_call(seeds))
    for ahead in (True, False):
        draws = TorchDraws(5) if batch_order else ImageDraws(seeds)
        got = generate_with(stages_drawing(model, ahead), labels, params, draws)
        assert torch.equal(got.images, want.images) and torch.equal(got.latents, want.latents), ahead
        assert torch.equal(got.discrete_ids, want.discrete_ids), ahead
    assert not draws_threads()


@pytest.mark.parametrize("batch_order", [False, True])
def test_per_image_draws_split_over_helper_threads_are_the_same(tiny, monkeypatch, batch_order):
    """Where the producer splits each request's images over helper threads, every image still draws its own
    sequence: the same generation as call-by-call draws (batch order, one generator, is never split)."""
    from reference import draw_producer
    monkeypatch.setattr(draw_producer, "DRAW_WORKERS", 3)
    params = SamplingParams(cfg=2.0, num_iter=3, diffusion_steps=4)
    labels = torch.tensor([1, 7, 3, 0, 9])
    seeds = 2 if batch_order else [2, 3, 4, 5, 6]
    want = generate_with(stages_drawing(tiny, False), labels, params, call_by_call(seeds))
    got = generate_with(stages_drawing(tiny, True), labels, params, TorchDraws(2) if batch_order else ImageDraws(seeds))
    assert torch.equal(got.images, want.images) and torch.equal(got.latents, want.latents)
    assert torch.equal(got.discrete_ids, want.discrete_ids)
    assert not draws_threads()


class FailingDraws(TorchDraws):
    """Fails on the noise of masked step `fail_at`."""

    def __init__(self, seed: int, fail_at: int):
        super().__init__(seed)
        self.fail_at, self.steps = fail_at, 0

    def fill_step_noise(self, out, groups):
        self.steps += 1
        if self.steps > self.fail_at:
            raise OSError("the draws failed")
        super().fill_step_noise(out, groups)


class FailingStages(TorchStages):
    """Fails after `fail_at` stage calls; its draws are made ahead."""

    draws_ahead = True

    def __init__(self, model: D2C, fail_at: int):
        super().__init__(model)
        self.fail_at, self.calls = fail_at, 0

    def run(self, stage, inputs):
        self.calls += 1
        if self.calls > self.fail_at:
            raise RuntimeError("the stage failed")
        return super().run(stage, inputs)


def test_a_failing_draw_is_raised_in_the_loop_and_no_thread_is_left(tiny, monkeypatch):
    params = SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=3)
    with pytest.raises(OSError, match="the draws failed"):
        generate_with(stages_drawing(tiny, True), torch.tensor([1, 7]), params, FailingDraws(0, fail_at=2))
    assert not draws_threads()
    from reference import draw_producer
    monkeypatch.setattr(draw_producer, "DRAW_WORKERS", 2)
    split = ImageDraws([1, 2, 3])
    split.images[2] = FailingDraws(3, fail_at=1)  # fails in a helper thread, on masked step 2
    with pytest.raises(OSError, match="the draws failed"):
        generate_with(stages_drawing(tiny, True), torch.tensor([1, 7, 3]), params, split)
    assert not draws_threads()
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):  # the draws' own check, raised in the loop
        generate_with(stages_drawing(tiny, True), torch.tensor([1, 7, 3]), params, ImageDraws([1, 2]))
    assert not draws_threads()


@pytest.mark.parametrize("fail_at", [0, 5, 30])
def test_a_failing_loop_stops_the_producer(tiny, fail_at):
    """A generation that ends early (a stage fails: at the first call, among the tokens, among the masked steps)
    stops its producer, which may be waiting for the loop to take its draws."""
    params = SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=3)
    with pytest.raises(RuntimeError, match="the stage failed"):
        generate_with(FailingStages(tiny, fail_at), torch.tensor([1, 7]), params, TorchDraws(0))
    assert not draws_threads()


def test_a_loop_that_asks_out_of_plan_is_refused():
    from reference.draw_producer import DrawRequest, planned_draws
    plan = [DrawRequest("token_uniforms", (2, 8)), DrawRequest("orders", (2, 4))]
    for ahead in (False, True):
        with planned_draws(TorchDraws(0), plan, ahead) as draws:
            assert draws.token_uniforms(2, 8).shape == (2, 8)
            with pytest.raises(RuntimeError, match=r"draw 1, step_noise\(2, 1, 16, 1, 3\).*orders\(2, 4\)"):
                draws.step_noise(2, 1, 16, 1, 3)
        with planned_draws(TorchDraws(0), plan, ahead) as draws:
            draws.token_uniforms(2, 8), draws.orders(2, 4)
            with pytest.raises(RuntimeError, match="no more draws"):
                draws.orders(2, 4)
    assert not draws_threads()


@pytest.mark.gpu
def test_on_cuda_the_draws_come_pinned_from_the_producer(tiny):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from reference.draw_producer import DrawProducer
    from reference.pipeline import draw_plan
    params = SamplingParams(cfg=3.0, num_iter=2, diffusion_steps=3)
    taken = []
    with DrawProducer(ImageDraws([0, 1]), draw_plan(tiny.config, params, 2), pin=True) as draws:
        for request in draws.plan:
            taken.append(getattr(draws, request.kind)(*request.args))
    assert all(t.is_pinned() for t in taken)
    model = D2C(PRESETS["d2c-tiny"])
    model.load_state_dict(tiny.state_dict())
    stages = stages_drawing(model.cuda().eval(), True)
    stages.device = "cuda"
    on_cuda = generate_with(stages, torch.tensor([1, 7]), params, ImageDraws([0, 1]))
    assert on_cuda.draw_time.ahead and on_cuda.draw_time.drawing_s > 0 and not draws_threads()
