"""The loop never waits for the device inside a step, and asks for each masked step's noise in one call."""
from __future__ import annotations

import pytest
import torch

from reference.model import PRESETS, D2C
from reference.pipeline import SamplingParams, generate_with
from reference.sampling import BatchDraws, ImageDraws, TorchDraws
from reference.stage_networks import TorchStages
from tests.reference.syncs import SyncCounter

class CountingDraws(BatchDraws):
    """A generator's draws, MAR's calls one by one, recording each call the loop makes and each `normal` behind it."""

    def __init__(self, seed: int):
        self.source = TorchDraws(seed)
        self.log: list[str] = []

    def uniform(self, shape):
        return self.source.uniform(shape)

    def permutation(self, n):
        return self.source.permutation(n)

    def fill_normal(self, out):
        self.log.append("normal")
        self.source.fill_normal(out)

    def step_noise(self, *args, **kwargs):
        self.log.append("step_noise")
        return super().step_noise(*args, **kwargs)


@pytest.fixture(scope="module")
def model() -> D2C:
    torch.manual_seed(0)
    return D2C(PRESETS["d2c-tiny"]).eval()


def syncs(model: D2C, num_iter: int, steps: int, cfg: float = 3.0) -> dict[str, int]:
    with SyncCounter() as counter:
        generate_with(TorchStages(model), torch.tensor([1, 7]), SamplingParams(cfg=cfg, num_iter=num_iter,
                                                                               diffusion_steps=steps), TorchDraws(0))
    return counter.calls


def test_host_syncs_do_not_grow_with_steps(model):
    base = syncs(model, 2, 2)
    for num_iter, steps in ((4, 2), (2, 7), (4, 7)):
        assert syncs(model, num_iter, steps) == base, (num_iter, steps)
    assert syncs(model, 4, 7, cfg=1.0) == base  # without guidance too
    # what is left is per generation: the label check and the result's one trip to the host
    assert sum(base.values()) <= 6, base


def test_a_sync_in_a_step_is_caught(model, monkeypatch):
    """The counter sees a host sync hidden in a stage (as `nonzero` gathers in the official MAR would be)."""
    from reference import diffusion
    real = diffusion.ddpm_step
    monkeypatch.setattr(diffusion, "ddpm_step", lambda *a: (real(*a), a[0].sum().item())[0])
    assert sum(syncs(model, 2, 7).values()) - sum(syncs(model, 2, 2).values()) == 2 * 5


def test_each_masked_step_draws_its_noise_in_one_call(model):
    draws = CountingDraws(0)
    generate_with(TorchStages(model), torch.tensor([1, 7]), SamplingParams(cfg=3.0, num_iter=3, diffusion_steps=5),
                  draws)
    calls = [c for c in draws.log if c == "step_noise"]
    assert len(calls) == 3
    # inside each call: x_T, then one normal per diffusion step, in that order (MAR's DiffLoss.sample)
    assert draws.log == ["step_noise", *["normal"] * 6] * 3


def test_per_image_seeds_make_an_image_independent_of_its_batch(model):
    params = SamplingParams(cfg=3.0, num_iter=2, diffusion_steps=3)
    stages = TorchStages(model)
    batch = generate_with(stages, torch.tensor([1, 7, 3]), params, ImageDraws([10, 11, 12]))
    alone = generate_with(stages, torch.tensor([7]), params, ImageDraws([11]))
    batch_order = generate_with(stages, torch.tensor([7]), params, TorchDraws(11))
    assert torch.equal(batch.discrete_ids[1:2], alone.discrete_ids)
    torch.testing.assert_close(batch.images[1:2], alone.images, atol=1e-5, rtol=0)
    # one image alone draws exactly what batch order draws for a batch of one
    assert torch.equal(alone.images, batch_order.images) and torch.equal(alone.latents, batch_order.latents)
    shuffled = generate_with(stages, torch.tensor([3, 7]), params, ImageDraws([12, 11]))
    torch.testing.assert_close(shuffled.images[1:2], alone.images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        generate_with(stages, torch.tensor([1, 7, 3]), params, ImageDraws([1, 2]))
