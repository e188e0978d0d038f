"""Fast samplers: the annealed schedule and its tables, lazy MAR steps' reuse rules, the settings and the preset."""
from __future__ import annotations

import math

import pytest
import torch

from reference.errors import BadInput
from reference.diffusion import annealed_counts, annealed_tables, make_tables, step_tables
from reference.model import D2C, get_config
from reference.pipeline import SamplingParams, generate_with
from reference.samplers import SAMPLER_SETS, ConditionCache, choose_others, fresh_count, full_mar_steps
from reference.sampling import ImageDraws
from reference.stage_networks import TorchStages


# -- diffusion-step annealing ------------------------------------------------------------------------------
def test_annealed_counts_follow_disa_by_hand():
    # linear: floor + int((n - 1 - s) / (n - 1) * (steps - floor)); cosine: weight (cos(pi s / (n - 1)) + 1) / 2
    assert annealed_counts(10, 2, 5, "linear") == [10, 8, 6, 4, 2]
    assert annealed_counts(10, 2, 5, "cosine") == [10, 8, 6, 3, 2]
    assert annealed_counts(10, 2, 5, "off") == [10] * 5
    assert annealed_counts(10, 2, 1, "linear") == [10]  # one masked step: all the steps
    assert annealed_counts(7, 7, 4, "linear") == [7] * 4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_annealed_counts_at_mars_settings(schedule):
    counts = annealed_counts(100, 5, 64, schedule)
    assert len(counts) == 64 and counts[0] == 100 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))  # never more steps later
    weight = (lambda s: (63 - s) / 63) if schedule == "linear" else (lambda s: (math.cos(math.pi * s / 63) + 1) / 2)
    assert counts == [5 + int(weight(s) * 95) for s in range(64)]
    assert 3000 < sum(counts) < 3600  # about half of 64 x 100 denoising calls


def test_annealed_counts_refuse_a_floor_above_the_steps():
    with pytest.raises(ValueError, match="floor"):
        annealed_counts(10, 11, 4, "linear")
    with pytest.raises(ValueError):
        annealed_counts(10, 2, 4, "quadratic")


def test_annealed_tables_are_one_respacing_per_distinct_count():
    counts = annealed_counts(20, 3, 6, "linear")
    tables = annealed_tables(counts)
    assert sorted(tables) == sorted(set(counts))
    for count, table in tables.items():
        expected = step_tables(make_tables(count))
        assert table["timesteps"].shape == (count,) and table["coefs"].shape[0] == count
        assert torch.equal(table["timesteps"], expected["timesteps"]) and torch.equal(table["coefs"], expected["coefs"])
        assert int(table["timesteps"][0]) == 999 and int(table["timesteps"][-1]) == 0  # from t = 999 down to 0
        assert float(table["coefs"][-1, -1]) == 0.0  # no noise at the last step


# -- lazy MAR steps -----------------------------------------------------------------------------------------
def test_full_mar_steps_follow_lazymar_refresh_rule():
    full = full_mar_steps(64, 9, 5)
    assert [s for s, f in enumerate(full) if f] == [0, 1, 2, 3, 4, 5, 14, 23, 32, 41, 50, 59]
    assert full_mar_steps(8, 0, 5) == [True] * 8  # off
    assert full_mar_steps(6, 2, 0) == [True, False, True, False, True, False]
    assert full_mar_steps(4, 3, 10) == [True] * 4  # warm-up longer than the generation


def test_condition_cache_keeps_the_difference_of_a_full_step_and_rebuilds_the_unconditional_half():
    gen = torch.Generator().manual_seed(0)
    bsz, seq_len, dim = 2, 6, 5
    cache = ConditionCache(bsz, seq_len, "cpu")
    assert cache.all_positions.shape == (2 * bsz, seq_len)
    z_all = torch.randn(2 * bsz, seq_len, dim, generator=gen)
    pred = torch.tensor([[1, 4], [0, 5]])
    z = cache.full(z_all, torch.cat([pred, pred]))
    assert torch.equal(z[0], z_all[0, [1, 4]]) and torch.equal(z[3], z_all[3, [0, 5]])
    z_cond = torch.randn(bsz, 1, dim, generator=gen)
    later = torch.tensor([[2], [3]])
    both = cache.lazy(z_cond, later)
    assert torch.equal(both[:bsz], z_cond)
    for i in range(bsz):  # uncond = cond + (uncond - cond) of the full step, at the position predicted now
        p = int(later[i, 0])
        torch.testing.assert_close(both[bsz + i, 0], z_cond[i, 0] + z_all[bsz + i, p] - z_all[i, p])


def test_condition_cache_refuses_a_lazy_step_first():
    with pytest.raises(RuntimeError, match="full"):
        ConditionCache(1, 4, "cpu").lazy(torch.zeros(1, 1, 2), torch.zeros(1, 1, dtype=torch.int64))


class Recording(TorchStages):
    """The reference stages, recording every mar call's rows and outputs and every denoising loop's feeds."""

    def __init__(self, model):
        super().__init__(model)
        self.mar_calls, self.denoise_feeds, self.noise_steps = [], [], []

    def run(self, stage, inputs):
        out = super().run(stage, inputs)
        if stage == "mar":
            self.mar_calls.append(({k: v.clone() for k, v in inputs.items()}, out[0].clone()))
        return out

    def denoise(self, feeds):
        self.denoise_feeds.append({k: v.clone() for k, v in feeds.items()})
        return super().denoise(feeds)


@pytest.fixture(scope="module")
def tiny():
    """d2c-tiny with noise on every weight, so the head's zero-initialised output layers see the conditions."""
    torch.manual_seed(0)
    model = D2C(get_config("d2c-tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def run(model, seed=3, **settings):
    params = SamplingParams(**{"cfg": 3.0, "num_iter": 6, "diffusion_steps": 12, **settings})
    stages = Recording(model)
    return generate_with(stages, torch.tensor([1, 7]), params, ImageDraws([seed, seed + 1])), stages, params


def test_annealing_starts_where_asked():
    p = SamplingParams(num_iter=4, diffusion_steps=30, diffusion_anneal="linear", diffusion_anneal_start=20,
                       diffusion_floor=2)
    assert p.denoising_counts() == annealed_counts(20, 2, 4, "linear") == [20, 14, 8, 2]


def test_annealed_loop_runs_and_draws_each_masked_steps_own_count(tiny):
    out, stages, params = run(tiny, diffusion_anneal="linear", diffusion_floor=3)
    counts = params.denoising_counts()
    assert counts == annealed_counts(12, 3, 6, "linear") and counts[0] == 12 and counts[-1] == 3
    assert [f["timesteps"].shape[0] for f in stages.denoise_feeds] == counts
    assert [f["noise"].shape[0] for f in stages.denoise_feeds] == [c + 1 for c in counts]  # x_T and one per step
    for feeds, count in zip(stages.denoise_feeds, counts):
        assert torch.equal(feeds["coefs"], step_tables(make_tables(count))["coefs"])
    assert torch.isfinite(out.images).all()


def test_annealing_to_the_steps_themselves_is_the_exact_sampler(tiny):
    exact, _, _ = run(tiny)
    flat, _, _ = run(tiny, diffusion_anneal="cosine", diffusion_floor=12)
    assert torch.equal(exact.images, flat.images)
    annealed, _, _ = run(tiny, diffusion_anneal="linear", diffusion_floor=2)
    assert not torch.equal(exact.images, annealed.images)


def test_lazy_mar_steps_recompute_only_the_conditional_half_between_full_steps(tiny):
    out, stages, params = run(tiny, lazy_mar=2, lazy_mar_warmup=2)
    full = full_mar_steps(6, 2, 2)
    assert full == [True, True, True, False, True, False]
    seq_len, bsz = tiny.config.mar.seq_len, 2
    last_full = None
    for s, ((feeds, z), denoise) in enumerate(zip(stages.mar_calls, stages.denoise_feeds)):
        rows = feeds["tokens"].shape[0]
        if full[s]:  # both halves, every position: the difference is kept
            assert rows == 2 * bsz and feeds["pred"].shape[1] == seq_len
            assert torch.equal(feeds["labels"][bsz:], torch.full((bsz,), tiny.config.mar.null_class))
            last_full = z
            continue
        assert rows == bsz and feeds["pred"].shape[1] < seq_len  # the conditional half, this step's positions
        assert torch.equal(feeds["labels"], torch.tensor([1, 7]))
        pred = feeds["pred"]  # (B, P)
        cond = denoise["z"].view(2, bsz, pred.shape[1], -1)
        assert torch.equal(cond[0], z)
        kept_diff = last_full[bsz:] - last_full[:bsz]  # (B, L, Dd) of the last full step
        torch.testing.assert_close(cond[1], z + kept_diff.gather(1, pred.unsqueeze(-1).expand(-1, -1, z.shape[-1])))
    assert torch.isfinite(out.images).all()


def test_full_steps_of_a_lazy_generation_give_the_exact_conditions(tiny):
    exact, exact_stages, _ = run(tiny)
    lazy, lazy_stages, _ = run(tiny, lazy_mar=3, lazy_mar_warmup=1)
    first_exact, first_lazy = exact_stages.denoise_feeds[0]["z"], lazy_stages.denoise_feeds[0]["z"]
    assert torch.equal(first_exact, first_lazy)  # step 0 is full: every position, gathered, is the same
    assert not torch.equal(exact.images, lazy.images)


def test_lazy_mar_every_step_full_is_the_exact_sampler(tiny):
    exact, _, _ = run(tiny)
    every, stages, _ = run(tiny, lazy_mar=1)
    assert torch.equal(exact.images, every.images)
    assert all(feeds["tokens"].shape[0] == 4 for feeds, _ in stages.mar_calls)


# -- the settings -------------------------------------------------------------------------------------------
def test_defaults_are_the_exact_sampler():
    p = SamplingParams()
    assert (p.sampler, p.diffusion_anneal, p.lazy_mar) == ("exact", "off", 0)
    assert p.denoising_counts() == [100] * 64


def test_fast_preset_expands_into_the_settings_it_stands_for():
    p = SamplingParams(sampler="fast", cfg=4.0)  # MAR's 64 x 100: DiSA's 50 -> 5, LazyMAR's 5 and 9
    expanded = {"diffusion_anneal": "linear", "diffusion_anneal_start": 50, "diffusion_floor": 5, "lazy_mar": 9,
                "lazy_mar_warmup": 5, "lazy_mar_tokens": True}
    assert {k: getattr(p, k) for k in expanded} == expanded
    counts = p.denoising_counts()
    assert counts[0] == 50 and counts[-1] == 5 and counts == annealed_counts(50, 5, 64, "linear")
    recorded = p.as_dict()
    assert recorded["sampler"] == "fast" and all(recorded[k] == v for k, v in expanded.items())
    assert SamplingParams(**recorded) == p  # a recorded, expanded set expands to itself
    unguided = SamplingParams(sampler="fast", cfg=1.0)  # the token cache alone: no guidance difference to keep
    assert unguided.diffusion_anneal == "linear" and unguided.lazy_mar == 9 and unguided.lazy_mar_tokens
    demo = SamplingParams(sampler="fast", cfg=1.0, num_iter=16, diffusion_steps=500, diffusion_floor=300)
    assert demo.denoising_counts() == [300] * 16  # the demo's floor is above half its steps
    assert SamplingParams(sampler="fast", cfg=4.0, diffusion_floor=20).denoising_counts()[-1] == 20
    with pytest.raises(BadInput, match="diffusion_floor: 250 is above the 100"):  # the demo's floor, above the steps
        SamplingParams(sampler="fast", cfg=1.0, diffusion_steps=100, diffusion_floor=250)


def test_named_setting_sets_are_valid_settings():
    for name in SAMPLER_SETS:
        p = SamplingParams(cfg=4.0).with_sampler_set(name)
        assert (p.sampler == "exact" and p.diffusion_anneal == "off" and p.lazy_mar == 0) == (name == "exact")


@pytest.mark.parametrize("settings,fault,words", [
    ({"cfg": 1.0, "lazy_mar": 9}, "lazy_mar", ["guidance", "set cfg, add lazy_mar_tokens, or lazy_mar=0"]),
    ({"diffusion_anneal": "linear", "diffusion_steps": 10, "diffusion_floor": 20}, "diffusion_floor", ["lower it"]),
    ({"diffusion_anneal": "steep"}, "diffusion_anneal", ["off, linear, cosine"]),
    ({"sampler": "turbo"}, "sampler", ["exact, fast"]),
    ({"sampler": "fast", "diffusion_anneal": "cosine"}, "diffusion_anneal", ["sampler=fast", "sampler=exact"]),
    ({"sampler": "fast", "diffusion_anneal_start": 70}, "diffusion_anneal_start", ["sampler=exact"]),
    ({"diffusion_anneal": "linear", "diffusion_steps": 20, "diffusion_anneal_start": 30}, "diffusion_anneal_start",
     ["[0, 20]"]),
    ({"diffusion_anneal": "linear", "diffusion_anneal_start": 4}, "diffusion_floor", ["above the 4"]),
    ({"sampler": "fast", "cfg": 4.0, "lazy_mar": 3}, "lazy_mar", ["sampler=exact"]),
    ({"lazy_mar": -1}, "lazy_mar", [">= 0"]),
    ({"diffusion_floor": 0}, "diffusion_floor", ["[1, 1000]"]),
    ({"lazy_mar": 2.5}, "lazy_mar", ["integer"]),
    ({"lazy_mar_tokens": True}, "lazy_mar_tokens", ["needs lazy MAR steps", "set lazy_mar=N"]),
    ({"lazy_mar": 3, "lazy_mar_tokens": "yes"}, "lazy_mar_tokens", ["true or false"]),
])
def test_settings_that_cannot_run_are_refused_in_one_line(settings, fault, words):
    with pytest.raises(BadInput) as err:
        SamplingParams(**settings)
    message = str(err.value)
    assert "\n" not in message and err.value.setting == fault and message.startswith(f"{fault}: ")
    for word in words:
        assert word in message, message


def test_an_annealing_floor_above_the_steps_is_fine_while_annealing_is_off():
    assert SamplingParams(diffusion_steps=3).denoising_counts() == [3] * 64


def test_named_sets_replace_only_the_fast_samplers_settings():
    base = SamplingParams(cfg=2.0, num_iter=8, diffusion_steps=40, diffusion_floor=10, diffusion_anneal="cosine",
                          diffusion_anneal_start=30)
    exact = base.with_sampler_set("exact")
    assert exact.diffusion_anneal == "off" and (exact.cfg, exact.num_iter, exact.diffusion_floor) == (2.0, 8, 10)
    assert exact.denoising_counts() == [40] * 8
    fast = base.with_sampler_set("fast")
    assert (fast.sampler, fast.diffusion_anneal, fast.diffusion_anneal_start, fast.lazy_mar) == ("fast", "linear", 20, 9)
    assert fast.lazy_mar_tokens and fast.stages_needed == ("mar_cached", "mar_fresh")
    assert fast.denoising_counts()[-1] == 10
    anneal, lazy = base.with_sampler_set("anneal"), base.with_sampler_set("lazy")
    assert anneal.denoising_counts() == fast.denoising_counts() and anneal.lazy_mar == 0  # the preset's parts
    assert lazy.denoising_counts() == [40] * 8 and (lazy.lazy_mar, lazy.lazy_mar_warmup, lazy.lazy_mar_tokens) == (9, 5, True)
    assert exact.stages_needed == () and not exact.lazy_mar_tokens
    with pytest.raises(BadInput, match="exact, anneal, lazy, fast"):
        base.with_sampler_set("quick")


# -- LazyMAR's token cache ----------------------------------------------------------------------------------
def test_fresh_count_follows_lazymars_retain_schedule():
    assert fresh_count(0, 64, 320, 4, 4) == 320 and fresh_count(19, 64, 320, 4, 4) == 320  # all, the first 20
    assert fresh_count(20, 64, 320, 4, 4) == int(320 * 0.6)
    assert fresh_count(63, 64, 320, 4, 4) == 4 + 4 + 15  # the floor: to predict, recent, and 15 more
    assert fresh_count(63, 64, 320, 40, 30) == 85
    assert fresh_count(8, 16, 320, 4, 4) == int(320 * 0.15)  # step 8 of 16 is step 32 of 64
    assert fresh_count(12, 16, 20, 1, 1) == 17  # the demo's 20 positions: all but the 3 that changed least


def test_choose_others_forces_the_recent_tokens_then_takes_the_most_changed():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.99, 0.2, 0.3, 0.8, 0.7]])  # buffer 2, then tokens 0..5
    pred, recent = torch.tensor([[1]]), torch.tensor([[4]])  # sequence positions 3 and 6
    others = choose_others(scores, pred, recent, buffer=2, count=4)
    assert others.tolist() == [[1, 4, 6]]  # recent 6 forced; then 0.1 and 0.2; the token to predict is not among them


@pytest.fixture(scope="module")
def wide():
    """d2c-tiny at 64 px (256 tokens, 260 positions) with a 3-layer decoder: the cut at 1, one cached layer after."""
    config = get_config("d2c-tiny")
    config.mar.img_size, config.mar.decoder_depth, config.mar.encoder_depth = 64, 3, 2
    torch.manual_seed(0)
    model = D2C(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class RecordingAll(TorchStages):
    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def run(self, stage, inputs):
        out = super().run(stage, inputs)
        self.calls.append((stage, {k: v.clone() for k, v in inputs.items()}, tuple(o.clone() for o in out)))
        return out


def test_token_cache_recomputes_what_lazymar_recomputes_and_caches_the_rest(wide):
    params = SamplingParams(cfg=3.0, num_iter=16, diffusion_steps=4, lazy_mar=4, lazy_mar_warmup=2,
                            lazy_mar_tokens=True)
    stages = RecordingAll(wide)
    out = generate_with(stages, torch.tensor([1, 7]), params, ImageDraws([3, 4]))
    assert torch.isfinite(out.images).all()
    m, bsz = wide.config.mar, 2
    positions = m.buffer_size + m.seq_len
    heads = [c for c in stages.calls if c[0] in ("mar", "mar_cached")]
    tails = [c for c in stages.calls if c[0] == "mar_fresh"]
    assert len(heads) == len(tails) == 16 and all(c[0] == "mar_cached" for c in heads)  # never the plain mar stage
    full = full_mar_steps(16, 4, 2)
    skipped = 0  # positions the lazy steps read from the cache after the cut
    kept = [head["kept"][:bsz] for _, head, _ in heads]
    generated = [torch.stack([torch.tensor(sorted(set(n.tolist()) - set(k.tolist()))) for n, k in zip(after, now)])
                 for now, after in zip(kept, kept[1:])]  # what step s predicted: the tokens kept from s + 1 on
    for s, ((_, head, _), (_, tail, _)) in enumerate(zip(heads, tails)):
        if full[s]:  # every row, every kept token recent, every token position asked (the guidance difference)
            assert head["tokens"].shape[0] == 2 * bsz and torch.equal(head["recent"], head["kept"])
            assert tail["pred"].shape[1] == m.seq_len and tail["others"].tolist() == [list(range(m.buffer_size))] * 4
            continue
        # the conditional rows; the tokens generated at the step before; LazyMAR's count after the cut
        assert head["tokens"].shape[0] == bsz and torch.equal(head["recent"], generated[s - 1])
        count = fresh_count(s, 16, positions, tail["pred"].shape[1], head["recent"].shape[1])
        assert tail["pred"].shape[1] + tail["others"].shape[1] == count
        skipped += positions - count
        others = set(tail["others"][0].tolist())
        assert {p + m.buffer_size for p in head["recent"][0].tolist()} <= others
        assert not others & {p + m.buffer_size for p in tail["pred"][0].tolist()}
    assert skipped > 0
    # the encoder cache of a lazy step is the step before's with only the positions computed there rewritten
    s = next(s for s in range(15) if not full[s] and not full[s + 1])
    before, after = heads[s][1]["enc_cache"], heads[s + 1][1]["enc_cache"]
    computed = sorted(set(range(m.buffer_size)) | {p + m.buffer_size for p in heads[s][1]["recent"][0].tolist()})
    for j in range(positions):
        assert torch.equal(before[0, :, :, j], after[0, :, :, j]) == (j not in computed), j
    torch.testing.assert_close(after[0, :, :, computed], heads[s][2][2][0])


def test_token_cache_with_every_step_full_is_the_exact_sampler_up_to_rounding(tiny):
    exact, _, _ = run(tiny)
    for cfg in (3.0, 1.0):
        exact, _, _ = run(tiny, cfg=cfg)
        every, stages, _ = run(tiny, cfg=cfg, lazy_mar=1, lazy_mar_tokens=True)
        assert float((exact.images - every.images).abs().max()) < 1e-5
        lazy, _, _ = run(tiny, cfg=cfg, lazy_mar=3, lazy_mar_warmup=1, lazy_mar_tokens=True)
        assert float((exact.images - lazy.images).abs().max()) > 1e-5
