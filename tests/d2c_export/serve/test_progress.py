"""A generation's progress and cancellation, without Ray: progress reaches every stage call in order; jobs cancelled
before their generation are left out of it, a generation whose jobs are all cancelled stops at its next step, and
no other job's image changes; a request over the max batch is split into parts and joined in order."""
from __future__ import annotations

import numpy as np
import pytest

from d2c_export.backends import open_backend
from d2c_export.backends.base import Wrapper
from d2c_export.engines import Engines
from d2c_export.serve.batching import Job, run_batch
from d2c_export.serve.progress import stage_calls
from d2c_export.serve.streaming import joined, split_job, wants_stream
from d2c_export.backends import Target
from reference.pipeline import SamplingParams

FAST = SamplingParams(cfg=2.0, num_iter=3, diffusion_steps=2)


@pytest.fixture(scope="module")
def backend(engines_factory):
    engines = Engines.open(engines_factory("d2c-tiny"))
    with open_backend(engines, Target.parse("ort"), threads=1) as opened:
        yield opened


def _job(labels, seed) -> Job:
    return Job(labels=tuple(labels), seeds=tuple(seed + i for i in range(len(labels))), params=FAST)


def test_progress_follows_the_stage_calls_to_the_end(backend):
    job = _job([1, 2], 5)
    seen = []
    (result,) = run_batch(backend, [job], report=lambda j, p: seen.append((j.key, p)))
    assert result.error is None and {key for key, _ in seen} == {job.key}
    progress = [p for _, p in seen]
    assert len(progress) == sum(stage_calls(backend, FAST).values())  # one report per stage call
    assert [p.fraction for p in progress] == sorted(p.fraction for p in progress) and progress[-1].fraction == 1.0
    stages = [p.stage for p in progress]
    assert stages == sorted(stages, key=["discrete", "masked", "decode"].index)  # in the loop's order
    masked = [p for p in progress if p.stage == "masked"]
    assert {p.steps for p in masked} == {3} and masked[-1].step == 3
    discrete = [p for p in progress if p.stage == "discrete"]
    assert discrete[-1].step == discrete[-1].steps == backend.config.gpt.block_size


def test_a_job_cancelled_before_its_generation_is_left_out(backend):
    kept, gone = _job([3], 40), _job([7, 8], 90)
    calls = []
    results = run_batch(backend, [kept, gone], cancelled=lambda j: j is gone, report=lambda j, p: calls.append(j))
    alone = run_batch(backend, [_job([3], 40)])[0]
    assert results[1].cancelled and results[1].images is None
    assert results[0].batch_size == 1 and gone not in calls  # its rows never entered the generation
    assert np.array_equal(results[0].images, alone.images) and results[0].tokens == alone.tokens


def test_a_generation_whose_jobs_are_all_cancelled_stops_at_its_next_step(backend):
    job = _job([1, 2], 0)
    seen = []

    def cancelled(j: Job) -> bool:  # the client leaves during the first masked step
        return any(p.stage == "masked" for p in seen)

    (result,) = run_batch(backend, [job], cancelled=cancelled, report=lambda j, p: seen.append(p))
    assert result.cancelled and result.images is None
    assert seen[-1].stage == "masked" and seen[-1].step == 1  # stopped before the second masked step
    assert len(seen) < sum(stage_calls(backend, FAST).values()) and seen[-1].fraction < 1.0


class RowsSeen(Wrapper):
    """The first dimension of each stage call's first input, by stage, in call order."""

    def __init__(self, inner):
        super().__init__(inner)
        self.seen: dict[str, list[int]] = {}

    def run(self, stage, inputs):
        self.seen.setdefault(stage, []).append(next(iter(inputs.values())).shape[0])
        return self.inner.run(stage, inputs)


LEAVES = {  # when the neighbour's client leaves, and the masked steps run before its rows leave
    "during the discrete tokens": (lambda seen: len(seen) > 5, 0),
    "after the first masked step": (lambda seen: any(p.stage == "masked" and p.step >= 1 for p in seen), 1),
}


@pytest.mark.parametrize("when", list(LEAVES))
def test_a_neighbour_cancelled_mid_generation_changes_no_other_image(backend, when):
    def both():
        return _job([4], 21), _job([6, 2], 300)

    mine, neighbour = both()
    left, before = LEAVES[when]
    seen = []
    rows = RowsSeen(backend)
    cancelled_results = run_batch(rows, [mine, neighbour], cancelled=lambda j: j is neighbour and left(seen),
                                  report=lambda j, p: seen.append(p))
    all_rows = RowsSeen(backend)
    plain = run_batch(all_rows, list(both()))
    # 3 images' rows (2 groups under guidance) for the discrete tokens and the masked steps before it leaves, then
    # mine alone for the masked steps, their denoising and the decoder
    assert rows.seen["gpt"] == all_rows.seen["gpt"] == [2 * 3] * backend.config.gpt.block_size
    assert rows.seen["mar"] == [2 * 3] * before + [2 * 1] * (FAST.num_iter - before)
    steps = before * FAST.diffusion_steps
    denoised = all_rows.seen["diffusion"]
    assert rows.seen["diffusion"] == denoised[:steps] + [n // 3 for n in denoised[steps:]]
    assert rows.seen["vae"] == [1] and all_rows.seen["vae"] == [3]
    assert cancelled_results[0].batch_size == 3  # it shared the generation with the cancelled neighbour
    assert cancelled_results[1].cancelled and cancelled_results[1].images is None  # whose rows left it
    assert np.array_equal(cancelled_results[0].images, plain[0].images)  # bit for bit
    assert cancelled_results[0].tokens == plain[0].tokens


def test_a_job_over_the_max_batch_is_split_and_joined_in_order(backend):
    job = _job([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 1000)
    parts = split_job(job, 4)
    assert [len(p) for p in parts] == [4, 4, 2] and len({p.key for p in parts}) == 3
    assert sum((p.labels for p in parts), ()) == job.labels and sum((p.seeds for p in parts), ()) == job.seeds
    whole = joined([run_batch(backend, [p])[0] for p in parts])
    assert whole.images.shape[0] == 10 and len(whole.tokens) == 10 and whole.batch_size == 4
    third = run_batch(backend, [Job(labels=(2,), seeds=(1002,), params=FAST)])[0]
    assert third.tokens[0] == whole.tokens[2]  # the image of label 2, seed 1002, wherever it was generated
    assert np.abs(third.images[0].astype(int) - whole.images[2].astype(int)).max() <= 1


@pytest.mark.parametrize("accept,stream", [("application/x-ndjson", True), ("application/json", False), (None, False),
                                           ("text/html, application/x-ndjson;q=0.9", True)])
def test_the_streaming_form_is_asked_for_by_the_accept_header(accept, stream):
    assert wants_stream(accept) is stream


def test_the_fast_sampler_reports_every_call_and_a_neighbour_leaving_changes_no_other_image(backend):
    # annealed denoising steps, and lazy MAR steps with the token cache's two stages (steps 6 and 7 are lazy)
    params = SamplingParams(cfg=2.0, num_iter=8, diffusion_steps=8, sampler="fast", diffusion_floor=2)
    assert params.stages_needed == ("mar_cached", "mar_fresh") and params.lazy_mar_warmup == 5

    def both():
        return Job(labels=(4,), seeds=(21,), params=params), Job(labels=(6, 2), seeds=(300, 301), params=params)

    alone = []
    run_batch(backend, [both()[0]], report=lambda j, p: alone.append(p))
    assert len(alone) == sum(stage_calls(backend, params).values())  # one report per stage call, annealed ones too
    assert alone[-1].fraction == 1.0 and {p.steps for p in alone if p.stage == "masked"} == {8}
    mine, neighbour = both()
    seen = []
    rows = RowsSeen(backend)
    left = run_batch(rows, [mine, neighbour], report=lambda j, p: seen.append(p),
                     cancelled=lambda j: j is neighbour and any(p.stage == "masked" and p.step >= 2 for p in seen))
    plain = run_batch(backend, list(both()))
    assert left[1].cancelled and left[0].batch_size == 3
    assert rows.seen["mar_cached"][:2] == [2 * 3] * 2 and rows.seen["mar_cached"][-1] == 1  # a lazy step, mine alone
    assert "mar" not in rows.seen
    assert np.array_equal(left[0].images, plain[0].images) and left[0].tokens == plain[0].tokens  # bit for bit
