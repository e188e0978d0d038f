"""The shared loop on ONNX Runtime against the reference: same discrete ids, images within 1e-3."""
from __future__ import annotations

import pytest
import torch

from d2c_export.backends import open_backend
from d2c_export.backends.base import Wrapper
from d2c_export.engines import Engines
from d2c_export.errors import BackendUnavailable, BadInput, NonFiniteOutput
from d2c_export.generate import generate_images
from d2c_export.backends import Target
from reference.pipeline import SamplingParams

TORCH, ORT = Target.parse("torch"), Target.parse("ort")


def backend(engines_dir, target: Target):
    return open_backend(Engines.open(engines_dir), target, device="cpu")

PARAMS = SamplingParams(cfg=3.0, num_iter=4, diffusion_steps=20, top_k=0)


@pytest.mark.parametrize("config", ["d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"])
def test_ort_generates_what_the_reference_generates(engines_factory, config):
    engines = engines_factory(config)
    torch_stages, ort_stages = backend(engines, TORCH), backend(engines, ORT)
    assert "ONNX Runtime" in ort_stages.description
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
    stages = backend(engines_factory("d2c-tiny"), ORT)
    _, timer = generate_images(stages, [2, 2], PARAMS, seed=0)
    assert timer.calls["cond"] == 1
    assert timer.calls["gpt"] == stages.config.gpt.block_size  # prefill + block_size - 1 decode steps


def test_sessions_are_created_once(engines_factory):
    stages = backend(engines_factory("d2c-tiny"), ORT)
    sessions = {name: id(session) for name, session in stages.sessions.items()}
    generate_images(stages, [0], PARAMS, seed=0)
    generate_images(stages, [1], PARAMS, seed=1)
    assert {name: id(session) for name, session in stages.sessions.items()} == sessions
    assert set(sessions) == {"gpt", "cond", "mar", "mar_cached", "mar_fresh", "diffusion", "vae"}


def test_seed_changes_the_image(engines_factory):
    stages = backend(engines_factory("d2c-tiny"), ORT)
    a, _ = generate_images(stages, [4], PARAMS, seed=0)
    b, _ = generate_images(stages, [4], PARAMS, seed=1)
    assert float((a.images - b.images).abs().max()) > 1e-2


@pytest.mark.slow
def test_d2c_b_shaped_model_end_to_end(engines_factory):
    """A random model of the full d2c-b architecture: export all stages, then ORT against the reference."""
    engines = engines_factory("d2c-b")  # the session's one d2c-b export, shared with the bench's test
    params = SamplingParams(cfg=4.0, num_iter=2, diffusion_steps=3)
    ref, _ = generate_images(backend(engines, TORCH), [88], params, seed=0)
    got, _ = generate_images(backend(engines, ORT), [88], params, seed=0)
    assert torch.equal(ref.discrete_ids, got.discrete_ids)
    assert float((ref.images - got.images).abs().max()) < 1e-3


def test_non_finite_output_is_an_error_not_an_image(engines_factory):
    stages = backend(engines_factory("d2c-tiny"), ORT)

    class Overflowing(Wrapper):
        def run(self, stage, inputs):
            out = self.inner.run(stage, inputs)
            return tuple(o * float("nan") for o in out) if stage == "vae" else out

    with pytest.raises(NonFiniteOutput, match="non-finite images"):
        generate_images(Overflowing(stages), [1], PARAMS, seed=0)


def test_a_batch_above_the_backends_profile_is_refused_before_any_call(engines_factory):
    stages = backend(engines_factory("d2c-tiny"), ORT)  # exported with max batch 4
    calls = []

    class Counting(Wrapper):
        def run(self, stage, inputs):
            calls.append(stage)
            return self.inner.run(stage, inputs)

    with pytest.raises(BadInput, match="max batch 4"):
        generate_images(Counting(stages), [1] * 5, PARAMS, seed=0)
    assert calls == []


@pytest.mark.parametrize("sampler", ["anneal", "lazy", "fast"])
@pytest.mark.parametrize("config", ["d2c-tiny", "d2c-tiny-none"])
def test_ort_generates_what_the_reference_generates_with_each_fast_sampler(engines_factory, config, sampler):
    """The fast samplers run through the one shared loop: ONNX Runtime and torch agree with them on, as without."""
    from reference.samplers import full_mar_steps
    base = SamplingParams(cfg=3.0, num_iter=8, diffusion_steps=16)
    params = base.with_sampler_set(sampler)
    engines = engines_factory(config)
    labels = [1, 7, 3]
    ref, ref_timer = generate_images(backend(engines, TORCH), labels, params, seed=5)
    got, timer = generate_images(backend(engines, ORT), labels, params, seed=5)
    if ref.discrete_ids is not None:
        assert torch.equal(ref.discrete_ids, got.discrete_ids)
    assert float((ref.images - got.images).abs().max()) < 1e-3
    exact, _ = generate_images(backend(engines, ORT), labels, base, seed=5)
    assert float((exact.images - got.images).abs().max()) > 1e-3  # the option changes the images
    counts = params.denoising_counts()
    assert timer.calls == ref_timer.calls
    mar_stages = ("mar_cached", "mar_fresh") if params.lazy_mar_tokens else ("mar",)  # the token cache's two halves
    assert timer.calls["diffusion"] == sum(counts) and all(timer.calls[s] == 8 for s in mar_stages)
    assert params.lazy_mar_tokens == (sampler != "anneal") and ("mar" in timer.calls) == (sampler == "anneal")
    assert (sum(counts) < 8 * 16) == (sampler != "lazy") and full_mar_steps(8, params.lazy_mar, 5).count(False) == (
        0 if sampler == "anneal" else 2)


def test_run_writes_the_zoomed_grid_beside_the_exact_one(engines_factory, tmp_path):
    from PIL import Image

    from d2c_export.cli import run_main
    from d2c_export.images import GRID_ZOOM
    out, zoomed = tmp_path / "demo.png", tmp_path / "demo_x8.png"
    assert run_main(["--engines", str(engines_factory("d2c-tiny")), "--class", "1", "--class", "2", "--num-iter", "2",
                     "--diffusion-steps", "3", "--out", str(out), "--zoomed", str(zoomed), "--quiet"]) == 0
    exact, large = Image.open(out), Image.open(zoomed)
    assert large.size == (exact.width * GRID_ZOOM, exact.height * GRID_ZOOM)
    assert large.resize(exact.size, Image.NEAREST).tobytes() == exact.tobytes(), "each pixel a block of itself"
    assert run_main(["--engines", str(engines_factory("d2c-tiny")), "--class", "1", "--out", str(out),
                     "--zoomed", str(out), "--quiet"]) == 2


def without_token_cache(engines_dir):
    """The engines as exported before the token cache's stages existed: their entries and files gone."""
    from d2c_export.manifest import MANIFEST, Manifest
    manifest = Manifest.read(engines_dir / MANIFEST)
    for stage in ("mar_cached", "mar_fresh"):
        for entry in manifest.stages.pop(stage).values():
            for name in entry.files:
                (engines_dir / name).unlink()
    manifest.save(engines_dir)
    return engines_dir


def test_engines_without_the_token_cache_run_everything_else_and_refuse_it_in_one_line(tiny_engines_copy):
    engines = without_token_cache(tiny_engines_copy)
    base = SamplingParams(cfg=3.0, num_iter=8, diffusion_steps=16)
    stages = backend(engines, ORT)
    assert set(stages.sessions) == {"gpt", "cond", "mar", "diffusion", "vae"}
    for sampler in ("exact", "anneal"):
        generate_images(stages, [1], base.with_sampler_set(sampler), seed=0)
    for sampler in ("lazy", "fast"):
        with pytest.raises(BackendUnavailable) as err:
            generate_images(stages, [1], base.with_sampler_set(sampler), seed=0)
        message = str(err.value)
        assert "\n" not in message and "mar_cached and mar_fresh" in message and "d2c-export onnx" in message
    lazy_cond = SamplingParams(cfg=3.0, num_iter=8, diffusion_steps=16, lazy_mar=3)  # the condition cache alone
    generate_images(stages, [1], lazy_cond, seed=0)
