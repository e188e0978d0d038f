"""Pure sampling functions: schedules against MAR's recordings, discrete sampling from uniforms."""
from __future__ import annotations

import json

import pytest
import torch

from reference.sampling import (ImageDraws, TorchDraws, cfg_schedule, filter_logits, mask_len_schedule, sample_gumbel,
                                step_positions, tokens_per_step)
from tests.reference.replay import ReplayDraws, logits_to_probs, uniforms_for_outcome


@pytest.mark.parametrize("num_iter", ["16", "32", "64", "256"])
def test_mask_and_cfg_schedule_match_official(official_dir, num_iter):
    rec = json.loads((official_dir / "mar_schedule.json").read_text())
    seq_len, cfg = rec["seq_len"], rec["cfg"]
    r = rec["schedules"][num_iter]
    lens = mask_len_schedule(seq_len, int(num_iter))
    assert lens == r["mask_len"]
    assert tokens_per_step(seq_len, int(num_iter)) == r["n_pred"]
    assert cfg_schedule(cfg, "linear", lens, seq_len).tolist() == r["cfg_iter"]
    assert cfg_schedule(cfg, "constant", [7, 3], seq_len).tolist() == [cfg, cfg]


def test_step_positions_partition_the_sequence():
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    seen = torch.zeros(3, 16, dtype=torch.int64)
    for kept, pred in step_positions(order, 16, 5):
        assert bool((seen.gather(1, kept) == 1).all()), "kept tokens must all be generated already"
        assert bool((seen.gather(1, pred) == 0).all())
        seen.scatter_(1, pred, 1)
    assert bool((seen == 1).all())


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits_to_probs(logits, top_k=2)
    assert (probs[0, 2:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0))
    full = logits_to_probs(logits)
    probs = logits_to_probs(logits, top_p=float(full[0, 0]) + 1e-4)  # the first token alone is not enough
    assert (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()
    cold = logits_to_probs(logits, temperature=0.0)
    assert float(cold[0, 0]) == pytest.approx(1.0)


def test_gumbel_sampling_follows_the_distribution_and_replays():
    logits = torch.tensor([[0.0, 2.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    scores = filter_logits(logits, top_k=2)
    assert torch.isinf(scores[0, [0, 2]]).all()
    u = TorchDraws(0).uniform((20000, 4))
    picks = sample_gumbel(scores[:1].expand(20000, -1), u)
    assert set(picks.tolist()) == {1, 3}, "filtered tokens are never drawn"
    hist = torch.bincount(sample_gumbel(scores[1:].expand(20000, -1), u), minlength=4).float() / 20000
    assert torch.allclose(hist, torch.full((4,), 0.25), atol=0.02)
    for index in ([3, 0], [1, 2]):
        idx = torch.tensor(index)
        assert sample_gumbel(scores, uniforms_for_outcome(scores, idx)).tolist() == index


def test_gumbel_choice_is_stable_under_rounding_noise():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 16384, generator=gen) * 0.05  # a nearly flat distribution over a large vocabulary
    u = TorchDraws(1).uniform(logits.shape)
    a = sample_gumbel(filter_logits(logits), u)
    b = sample_gumbel(filter_logits(logits * (1 + 1e-6)), u)
    assert torch.equal(a, b)


def test_draws_are_seeded_and_replay_checks_shapes():
    a, b, c = TorchDraws(1), TorchDraws(1), TorchDraws(2)
    assert torch.equal(a.normal((4,)), b.normal((4,)))
    assert not torch.equal(TorchDraws(1).normal((4,)), c.normal((4,)))
    replay = ReplayDraws([("normal", torch.zeros(2, 3))])
    with pytest.raises(ValueError):
        replay.normal((3, 2))


@pytest.mark.parametrize("bsz, pred, channels, groups", [(1, 1, 16, 1), (3, 5, 7, 2), (2, 4, 16, 2), (4, 1, 3, 1),
                                                      (2, 1, 8, 2), (3, 2, 16, 1)])
def test_step_noise_is_the_generator_sequence_of_mars_calls(bsz, pred, channels, groups):
    """`step_noise` fills its buffer in place, in one `normal_` where the sizes allow, yet draws exactly MAR's `randn`
    calls in MAR's order and shapes: x_T as (N, C), then (G*N, C) per step keeping the first N rows; per image, each
    image's own sequence; and leaves the generator where those calls leave it."""
    steps = 6

    def mars_calls_from(g: torch.Generator, n: int) -> torch.Tensor:
        first = torch.randn((n, channels), generator=g)
        return torch.stack([first] + [torch.randn((groups * n, channels), generator=g)[:n] for _ in range(steps)])

    def mars_calls(seed: int, n: int) -> torch.Tensor:
        return mars_calls_from(torch.Generator().manual_seed(seed), n)

    draws = TorchDraws(9)
    draws.orders(bsz, 8)  # what the generator produced before must carry over, too
    g = torch.Generator().manual_seed(9)
    [torch.randperm(8, generator=g) for _ in range(bsz)]
    first = torch.randn((bsz * pred, channels), generator=g)
    want = torch.stack([first] + [torch.randn((groups * bsz * pred, channels), generator=g)[:bsz * pred]
                                  for _ in range(steps)])
    assert torch.equal(draws.step_noise(bsz, pred, channels, groups, steps), want)
    assert torch.equal(draws.uniform((5,)), torch.rand((5,), generator=g, dtype=torch.float64))
    image_draws = ImageDraws([20 + i for i in range(bsz)])
    out = torch.full((steps + 1, bsz * pred, channels), float("nan"))
    per_image = image_draws.step_noise(bsz, pred, channels, groups, steps, out=out)
    assert per_image is out
    for i in range(bsz):
        assert torch.equal(per_image[:, i * pred:(i + 1) * pred], mars_calls(20 + i, pred)), i
        g = torch.Generator().manual_seed(20 + i)
        mars_calls_from(g, pred)
        assert torch.equal(image_draws.images[i].normal((3,)), torch.randn((3,), generator=g)), i


def test_token_uniforms_are_the_generators_rand_calls():
    """A token's (B, V) float64 uniforms, written in place: one `rand((B, V))` in batch order, one `rand((1, V))` per
    image from its own generator."""
    g = torch.Generator().manual_seed(4)
    want = torch.stack([torch.rand((3, 50), generator=g, dtype=torch.float64) for _ in range(2)])
    draws = TorchDraws(4)
    out = torch.empty((3, 50), dtype=torch.float64)
    assert draws.token_uniforms(3, 50, out=out) is out and torch.equal(out, want[0])
    assert torch.equal(draws.token_uniforms(3, 50), want[1])
    per_image = ImageDraws([7, 8, 9])
    got = torch.stack([per_image.token_uniforms(3, 50) for _ in range(2)])
    for i, seed in enumerate((7, 8, 9)):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(got[:, i], torch.cat([torch.rand((1, 50), generator=g, dtype=torch.float64)
                                                 for _ in range(2)])), i
