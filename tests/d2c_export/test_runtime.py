"""The runtime loop on ONNX Runtime against the reference: same discrete ids, images within 1e-3."""
from __future__ import annotations

import pytest
import torch

from d2c_export.runtime import OrtStages, generate_images, open_backend
from d2c_export.manifest import Manifest
from reference.pipeline import SamplingParams

PARAMS = SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=20, top_k=0)


@pytest.mark.parametrize("config", ["d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"])
def test_ort_generates_what_the_reference_generates(engines_factory, config):
    engines = engines_factory(config)
    torch_stages, _ = open_backend(engines, "torch")
    ort_stages, description = open_backend(engines, "ort")
    assert "ONNX Runtime" in description
    labels = [1, 7, 3]
    ref, _ = generate_images(torch_stages, labels, PARAMS, seed=5)
    got, timer = generate_images(ort_stages, labels, PARAMS, seed=5)
    if ref.discrete_ids is None:
        assert got.discrete_ids is None
    else:
        assert torch.equal(ref.discrete_ids, got.discrete_ids)
    assert float((ref.images - got.images).abs().max()) < 1e-3
    assert timer.calls["mar"] == PARAMS.num_iter
    assert timer.calls["diffusion"] == PARAMS.num_iter * PARAMS.diffusion_steps
    assert timer.calls["vae"] == 1


def test_cond_runs_once_and_gpt_once_per_token(engines_factory):
    engines = engines_factory("d2c-tiny")
    stages, _ = open_backend(engines, "ort")
    _, timer = generate_images(stages, [2, 2], PARAMS, seed=0)
    assert timer.calls["cond"] == 1
    assert timer.calls["gpt"] == stages.config.gpt.block_size  # prefill + block_size - 1 decode steps


def test_sessions_are_created_once(engines_factory):
    engines = engines_factory("d2c-tiny")
    stages = OrtStages(engines, Manifest.load(engines))
    sessions = dict(stages.sessions)
    generate_images(stages, [0], PARAMS, seed=0)
    assert stages.sessions == sessions


def test_seed_changes_the_image(engines_factory):
    stages, _ = open_backend(engines_factory("d2c-tiny"), "ort")
    a, _ = generate_images(stages, [4], PARAMS, seed=0)
    b, _ = generate_images(stages, [4], PARAMS, seed=1)
    assert float((a.images - b.images).abs().max()) > 1e-2


@pytest.mark.slow
def test_d2c_b_shaped_model_end_to_end(tmp_path_factory):
    """A random model of the full d2c-b architecture: export all stages, then ORT against the reference."""
    from tests.d2c_export.conftest import build_engines
    engines = build_engines("d2c-b", tmp_path_factory.mktemp("d2c_b"), max_batch=2)
    params = SamplingParams(cfg=4.0, num_iter=2, diffusion_steps=3)
    ref, _ = generate_images(open_backend(engines, "torch")[0], [88], params, seed=0)
    got, _ = generate_images(open_backend(engines, "ort")[0], [88], params, seed=0)
    assert torch.equal(ref.discrete_ids, got.discrete_ids)
    assert float((ref.images - got.images).abs().max()) < 1e-3


def test_non_finite_output_is_an_error_not_an_image(engines_factory):
    from d2c_export.manifest import EngineError
    stages, _ = open_backend(engines_factory("d2c-tiny"), "ort")

    class Overflowing:
        config = stages.config
        gpt, gpt_cache, cond, mar, diffusion = stages.gpt, stages.gpt_cache, stages.cond, stages.mar, stages.diffusion

        def vae(self, latents):
            return stages.vae(latents) * float("nan")

    with pytest.raises(EngineError, match="non-finite images"):
        generate_images(Overflowing(), [1], PARAMS, seed=0)
