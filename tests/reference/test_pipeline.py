"""The generation loop: LlamaGen's generate replayed, determinism, CFG, presets, speed of d2c-tiny."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reference import pipeline
from reference.errors import BadInput
from reference.gpt import GPT, GPTArgs
from reference.model import D2C, PRESETS, get_config
from reference.pipeline import SamplingParams, generate, generate_with, sample_discrete
from reference.stage_networks import GptStage, ModuleStages, TorchStages
from reference.sampling import TorchDraws
from tests.reference.replay import ReplayDraws, uniforms_for_outcome
from tests.reference.official import arrays, weights


def _gpt_only_stages(gpt: GPT) -> ModuleStages:
    """A bare official-layout GPT (no D2C around it) as the loop's gpt stage."""
    return ModuleStages(SimpleNamespace(gpt=gpt.args), {"gpt": GptStage(SimpleNamespace(gpt=gpt))})


@torch.no_grad()
def test_replayed_generate_matches_official(official_dir, monkeypatch):
    fx = official_dir / "gpt_tiny_a"
    meta = json.loads((fx / "meta.json").read_text())
    a = meta["model_args_full"]
    gpt = GPT(GPTArgs(dim=a["dim"], n_layer=a["n_layer"], n_head=a["n_head"], vocab_size=a["vocab_size"],
                      block_size=a["block_size"], num_classes=a["num_classes"], multiple_of=a["multiple_of"]))
    gpt.load_state_dict(weights(fx), strict=True)
    io = arrays(fx / "io.npz")
    draws = np.load(fx / "draws.npz")
    records = meta["draws"]["records"]["generate"]
    picks = [(torch.from_numpy(draws[f"generate_draw_{r['index']:03d}"]),
              torch.from_numpy(draws[f"generate_draw_{r['input_probs_index']:03d}"]))
             for r in records if r["kind"] == "torch.multinomial"]
    # A recorded multinomial outcome replays as the uniforms that make Gumbel-max pick it; the
    # sampled distribution itself is compared with the recorded probabilities below.
    replay = ReplayDraws([("uniform", uniforms_for_outcome(p, i.view(-1))) for i, p in picks])
    seen_scores = []
    original = pipeline.filter_logits
    monkeypatch.setattr(pipeline, "filter_logits", lambda *a, **k: seen_scores.append(original(*a, **k))
                        or seen_scores[-1])
    ids = sample_discrete(_gpt_only_stages(gpt.eval()), io["in_labels"],
                          SamplingParams(cfg=2.0, top_k=5, gpt_temperature=1.0), replay)
    assert replay.exhausted
    assert torch.equal(ids.to(torch.int32), io["out_generate_out"])
    assert len(seen_scores) == len(picks)
    for scores, (_, recorded) in zip(seen_scores, picks):
        torch.testing.assert_close(scores.softmax(-1), recorded, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return D2C(get_config("d2c-tiny")).eval()


def run(model, seed, **kw):
    params = SamplingParams(**{"cfg": 3.0, "num_iter": 4, "diffusion_steps": 10, **kw})
    return generate_with(TorchStages(model), torch.tensor([1, 7]), params, TorchDraws(seed))


def test_deterministic_for_a_seed_and_different_for_another(tiny_model):
    a, b, c = run(tiny_model, 0), run(tiny_model, 0), run(tiny_model, 1)
    assert torch.equal(a.images, b.images) and torch.equal(a.discrete_ids, b.discrete_ids)
    assert not torch.equal(a.discrete_ids, c.discrete_ids)
    assert float((a.images - c.images).abs().max()) > 1e-3
    cfg = get_config("d2c-tiny")
    assert a.images.shape == (2, 3, cfg.image_size, cfg.image_size)
    assert a.discrete_ids.shape == (2, cfg.gpt.block_size)
    assert float(a.images.abs().max()) <= 1.0


@torch.no_grad()
def test_gpt_cfg_scale_one_equals_conditional_logits(tiny_model):
    gpt = tiny_model.gpt
    labels = torch.tensor([2, 5])
    k, v = gpt.empty_cache(4)
    both = gpt.step(torch.cat([labels, torch.full_like(labels, gpt.args.null_class)]).view(4, 1),
                    torch.tensor([0]), k, v)
    k, v = gpt.empty_cache(2)
    cond = gpt.step(labels.view(2, 1), torch.tensor([0]), k, v)
    from reference.sampling import guide_logits
    torch.testing.assert_close(guide_logits(both[:2], both[2:], 1.0), cond, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["d2c-tiny-cross_attn", "d2c-tiny-none"])
def test_other_fusions_generate(name):
    torch.manual_seed(0)
    model = D2C(get_config(name)).eval()
    out = run(model, 0)
    assert torch.isfinite(out.images).all()
    assert (out.discrete_ids is None) == (name == "d2c-tiny-none")


def test_bad_labels_are_rejected(tiny_model):
    with pytest.raises(BadInput, match="class 10 is out of range"):
        generate(tiny_model, [10], num_iter=2, diffusion_steps=2)


def test_tiny_generates_end_to_end_in_under_a_second(tiny_model):
    generate(tiny_model, [3], seed=0, num_iter=4, diffusion_steps=10)  # warm-up
    start = time.perf_counter()
    image = generate(tiny_model, [3], seed=0, cfg=4.0, num_iter=16, diffusion_steps=100)
    elapsed = time.perf_counter() - start
    assert image.shape == (1, 3, 16, 16)
    # Recorded, not asserted as a hard timing (noisy machines); the benchmark reports ratios.
    print(f"d2c-tiny end to end (16 masked steps x 100 denoising steps): {elapsed:.3f} s")


@pytest.mark.parametrize("name,gpt_params,mar_params", [
    ("d2c-b", 110_888_448, 207_924_768), ("d2c-l", 110_888_448, 478_326_304),
    ("d2c-h", 110_888_448, 942_403_104)])
def test_preset_parameter_counts(name, gpt_params, mar_params):
    cfg = get_config(name)
    with torch.device("meta"):
        model = D2C(cfg)
        plain = D2C(get_config({"d2c-b": "mar-b", "d2c-l": "mar-l", "d2c-h": "mar-h"}[name]))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.gpt) == gpt_params
    assert count(plain.mar) == mar_params
    assert count(model.mar) > mar_params, "fusion adds the discrete-condition network"
    assert count(model.vae) == 66_456_019


def test_presets_roundtrip_through_dict():
    for name in PRESETS:
        cfg = get_config(name)
        assert get_config(name).to_dict() == cfg.to_dict()
    with pytest.raises(KeyError, match="choose one of"):
        get_config("d2c-xl")


@pytest.mark.slow
def test_d2c_b_generates_with_reduced_steps():
    torch.manual_seed(0)
    model = D2C(get_config("d2c-b")).eval()
    out = generate_with(TorchStages(model), torch.tensor([88]),
                        SamplingParams(cfg=4.0, num_iter=2, diffusion_steps=2), TorchDraws(0))
    assert out.images.shape == (1, 3, 256, 256)
    assert torch.isfinite(out.images).all()
