"""Merging jobs into generations and checking requests, without Ray: a merged generation gives every job the
images it gets alone; bad settings are refused with one line; the bearer token is compared by digest."""
from __future__ import annotations

import numpy as np
import pytest

from d2c_export import cli
from d2c_export.backends import open_backend
from d2c_export.engines import Engines
from d2c_export.errors import BadInput
from d2c_export.serve.api import ImageRequest, authorized, resolve, token_digest
from d2c_export.serve.batching import Job, batch_images, group_by_settings, run_batch
from d2c_export.backends import Target
from reference.pipeline import SamplingParams
from reference.settings import settings_of

FAST = SamplingParams(cfg=2.0, num_iter=2, diffusion_steps=3)


@pytest.fixture(scope="module")
def tiny(engines_factory):
    engines = Engines.open(engines_factory("d2c-tiny"))
    with open_backend(engines, Target.parse("ort"), threads=1) as backend:
        yield engines, backend


def _job(labels, seeds, params=FAST) -> Job:
    return Job(labels=tuple(labels), seeds=tuple(seeds), params=params)


def test_jobs_are_grouped_by_their_batch_wide_settings():
    other = SamplingParams(cfg=2.0, num_iter=2, diffusion_steps=4)
    jobs = [_job([1], [0]), _job([2], [5], other), _job([3, 4], [9, 10]), _job([0], [1], other)]
    assert group_by_settings(jobs) == [[0, 2], [1, 3]]
    assert batch_images(jobs) == 5


def test_a_merged_generation_gives_each_job_its_own_images(tiny):
    _, backend = tiny
    jobs = [_job([1], [7]), _job([3, 3], [20, 21]), _job([1], [8], SamplingParams(cfg=1.0, num_iter=2,
                                                                                  diffusion_steps=3))]
    merged = run_batch(backend, jobs)
    assert [r.batch_size for r in merged] == [3, 3, 1] and [r.batch_requests for r in merged] == [2, 2, 1]
    for job, result in zip(jobs, merged):
        alone = run_batch(backend, [job])[0]
        assert result.error is None and result.tokens == alone.tokens
        assert np.abs(result.images.astype(int) - alone.images.astype(int)).max() <= 1
    assert merged[0].tokens != run_batch(backend, [_job([1], [9])])[0].tokens  # another seed, another image


def test_a_failing_group_answers_its_jobs_and_the_others_still_run(tiny):
    _, backend = tiny
    results = run_batch(backend, [_job([99], [0], SamplingParams(cfg=3.0, num_iter=2, diffusion_steps=3)),
                                  _job([1], [0])])
    assert isinstance(results[0].error, BadInput)
    assert "out of range" in str(results[0].error) and "\n" not in str(results[0].error)
    assert results[1].error is None and results[1].images.shape[0] == 1


def test_settings_that_make_the_output_non_finite_are_the_clients_to_change(tiny):
    """A 422 naming the settings, not a 500 with advice for the command line."""
    from d2c_export.backends.base import Wrapper
    from d2c_export.errors import NonFiniteOutput
    from d2c_export.serve.api import error_answer
    _, backend = tiny

    class Overflowing(Wrapper):
        def run(self, stage, inputs):
            out = self.inner.run(stage, inputs)
            return tuple(o * float("nan") for o in out) if stage == "vae" else out

    (result,) = run_batch(Overflowing(backend), [_job([1], [0])])
    assert isinstance(result.error, NonFiniteOutput)
    status, message, _ = error_answer(result.error)
    assert status == 422 and "cfg 2.0" in message and "diffusion_steps 3" in message and "--" not in message


def test_a_bug_is_a_500_with_an_id_whose_traceback_is_in_the_log(caplog):
    import asyncio
    import json

    from starlette.requests import Request

    from d2c_export.serve.app import _unexpected
    request = Request({"type": "http", "method": "POST", "path": "/v1/images", "headers": [], "query_string": b""})
    try:
        {}["missing"]
    except KeyError as exc:
        answer = asyncio.run(_unexpected(request, exc))
    assert answer.status_code == 500
    message = json.loads(answer.body)["error"]
    incident = message.split()[2]
    assert message.startswith("internal error ") and "missing" not in message
    (record,) = [r for r in caplog.records if incident in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_requests_resolve_to_per_image_seeds_and_full_settings(tiny):
    engines, _ = tiny
    job = resolve(ImageRequest.model_validate({"class": [2, 4], "num_images": 2, "seed": 10, "num_iter": 3}),
                  engines, 4)
    assert job.labels == (2, 2, 4, 4) and job.seeds == (10, 11, 12, 13)
    assert job.params.num_iter == 3 and job.params.diffusion_steps == engines.sampling.diffusion_steps
    with pytest.raises(BadInput, match="exceed max batch 3"):
        resolve(ImageRequest.model_validate({"class": [2, 4], "num_images": 2}), engines, 3)
    with pytest.raises(BadInput, match="top_k: must be in"):
        resolve(ImageRequest.model_validate({"class": 1, "top_k": 10 ** 6}), engines, 4)


def test_the_api_takes_the_sampling_flags_of_d2c_run():
    settings = {s.name for s in settings_of(SamplingParams)}
    assert {"gpt_cfg", "gpt_temperature", "top_k"} <= settings
    assert settings <= set(ImageRequest.model_fields) and settings <= {p.name for p in cli.run_cli.params}


def test_the_bearer_token_is_compared_by_digest():
    digest = token_digest("s3cret")
    assert authorized("Bearer s3cret", digest) and authorized("bearer s3cret", digest)
    assert not any(authorized(h, digest) for h in (None, "", "Bearer", "Bearer s3cre", "Basic s3cret", "s3cret"))
    assert authorized(None, None) and token_digest("") is None
