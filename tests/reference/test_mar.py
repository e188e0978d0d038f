"""The MAR encoder/decoder and the masked sampling loop against MAR's recordings; the fusion modules."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from reference.stage_networks import ModuleStages
from reference.diffusion import DenoiseStep
from reference.mar import MAR, Fusion, MARArgs, patchify, unpatchify
from reference.pipeline import SamplingParams, sample_tokens
from tests.reference.replay import ReplayDraws
from tests.reference.official import arrays, draw_records, mar_tiny_args, mask_to_kept, weights


@pytest.fixture(scope="module")
def official_mar(official_dir):
    fx = official_dir / "mar_tiny_a"
    model = MAR(mar_tiny_args(fx))
    model.load_state_dict(weights(fx), strict=True)
    return model.eval(), arrays(fx / "io.npz"), fx


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


@torch.no_grad()
def test_encoder_decoder_match_official(official_mar):
    model, io, _ = official_mar
    kept = mask_to_kept(io["in_mask"])
    ce = model.class_embedding(io["in_labels"])
    close(ce, io["out_class_embedding"])
    enc = model.forward_encoder(io["in_x"], kept, ce)
    close(enc, io["out_enc_out"])
    close(model.forward_decoder(enc, kept), io["out_dec_out"])


@torch.no_grad()
def test_cfg_layout_matches_official(official_mar):
    model, io, _ = official_mar
    labels = torch.cat([io["in_labels"], torch.full((3,), model.args.null_class)])
    x, kept = torch.cat([io["in_x"]] * 2), mask_to_kept(torch.cat([io["in_mask"]] * 2))
    close(model.class_embedding(labels), io["out_cfg_class_embedding"])
    all_pos = torch.arange(16).expand(6, -1)
    close(model(x, kept, all_pos, labels), io["out_cfg_dec_out"])


def _mar_only_stages(model: MAR) -> ModuleStages:
    """A bare official-layout MAR (no D2C around it) as the loop's mar and diffusion stages."""
    return ModuleStages(SimpleNamespace(mar=model.args), {"mar": model, "diffusion": DenoiseStep(model.diffloss.net)})


@torch.no_grad()
def test_replayed_sample_tokens_match_official(official_mar):
    model, io, fx = official_mar
    call = json.loads((fx / "meta.json").read_text())["sample_tokens_call"]
    replay = ReplayDraws(draw_records(fx, "tokens"))
    params = SamplingParams(cfg=call["cfg"], cfg_schedule=call["cfg_schedule"], num_iter=call["num_iter"],
                            diffusion_steps=10, temperature=call["temperature"])
    tokens = sample_tokens(_mar_only_stages(model), io["out_tokens_labels"], None, params, replay)
    assert replay.exhausted, "every recorded draw is consumed"
    ref = io["out_tokens_out"]
    got = unpatchify(tokens, 1, 16)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_patchify_roundtrip():
    lat = torch.randn(2, 4, 8, 8)
    assert torch.equal(unpatchify(patchify(lat, 2), 2, 4), lat)


def tiny_args(fusion: Fusion) -> MARArgs:
    return MARArgs(img_size=16, vae_stride=2, patch_size=2, vae_embed_dim=4, encoder_embed_dim=32,
                   encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                   decoder_num_heads=2, buffer_size=4, class_num=10, diffloss_d=1, diffloss_w=32,
                   fusion=fusion, codebook_size=64, discrete_len=16, qformer_depth=1, qformer_num_heads=2)


@torch.no_grad()
@pytest.mark.parametrize("fusion", [Fusion.QFORMER, Fusion.CROSS_ATTN])
def test_fusion_changes_output_with_discrete_ids(fusion):
    torch.manual_seed(0)
    model = MAR(tiny_args(fusion)).eval()
    tokens, kept = torch.randn(2, 16, 16), torch.tensor([[1, 5, 9]] * 2)
    pred, labels = torch.tensor([[0, 2]] * 2), torch.tensor([3, 4])
    ids_a = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    ids_b = ids_a.clone()
    ids_b[:, 3] = (ids_b[:, 3] + 1) % 64
    z_a = model(tokens, kept, pred, labels, model.condition(ids_a))
    z_b = model(tokens, kept, pred, labels, model.condition(ids_b))
    assert z_a.shape == (2, 2, 32)
    assert float((z_a - z_b).abs().max()) > 1e-4
    null = model.condition(torch.full((2, 16), 64))
    assert float((model(tokens, kept, pred, labels, null) - z_a).abs().max()) > 1e-4


def test_fusion_none_is_plain_mar_layout(official_dir):
    none_keys = set(MAR(tiny_args(Fusion.NONE)).state_dict())
    assert not any(k.startswith("condition.") or "cross_attn" in k for k in none_keys)
    for fusion in (Fusion.QFORMER, Fusion.CROSS_ATTN):
        keys = set(MAR(tiny_args(fusion)).state_dict())
        assert none_keys < keys, "fusion only adds parameters; MAR's own keys stay as they are"


@pytest.mark.parametrize("name,total", [("mar_base", 207_924_768), ("mar_large", 478_326_304),
                                        ("mar_huge", 942_403_104)])
def test_official_manifest_keys_and_counts(official_dir, name, total):
    from reference.model import get_config
    manifest = json.loads((official_dir / "keys" / f"{name}.json").read_text())
    preset = {"mar_base": "mar-b", "mar_large": "mar-l", "mar_huge": "mar-h"}[name]
    with torch.device("meta"):
        model = MAR(get_config(preset).mar)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"] == total
