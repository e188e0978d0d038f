"""Official LlamaGen / MAR checkpoints through reference/official.py: layouts, sizes, errors, parity."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from reference.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from reference.gpt import GPT_PRESETS, precompute_rope_2d
from reference.mar import MAR, Fusion
from reference.model import PRESETS, D2C
from reference.official import (Format, assemble, load_gpt, load_mar, load_vae, read_weights,
                                weights_from_object)
from reference.official_sizes import mar_args_from_state
from reference.vae import VAE_PRESETS
from tests.conftest import OFFICIAL
from tests.reference.official import arrays, mar_tiny_args, mask_to_kept, weights
from tests.reference.official_layouts import (GPT_HEADS, MANIFESTS, MAR_HEADS, MAR_PATCH, manifest, manifest_state,
                                              shifted, write_official_files)

TOL = 1e-5


@dataclass
class LoaderState:
    """A Python object beside the weights, which torch.load(weights_only=True) refuses."""

    epoch: int


MAR_PRESET = {"mar_base": "mar-b", "mar_large": "mar-l", "mar_huge": "mar-h"}
GPT_PRESET = {"llamagen_gpt_b": "gpt-b", "llamagen_gpt_l": "gpt-l"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_official_files(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def kl16():
    return weights_from_object({"model": manifest_state("mar_vae_kl16")}, "kl16.ckpt")


def _load(name: str, state: dict, kl16):
    """The part of `state` (manifest `name`'s layout) loaded through the official path."""
    if name in MAR_PRESET:
        return assemble(weights_from_object({"model": state, "model_ema": state}, name), vae=kl16)
    if name in GPT_PRESET:  # as LlamaGen publishes it: the image size ends the file name (the tokens are not stored)
        return load_gpt(weights_from_object({"model": state}, f"c2i_{name[-1].upper()}_256.pt"))
    return load_vae(weights_from_object({"model": state}, name))


# -- full-size manifests (meta tensors: every key and shape checked, no memory) -------------------------
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_loads_as_its_official_size(name, kl16):
    loaded = _load(name, manifest_state(name), kl16)
    if name in MAR_PRESET:
        assert loaded.config.to_dict() == PRESETS[MAR_PRESET[name]].to_dict()
        params = sum(p.numel() for p in loaded.mar.parameters())
    elif name in GPT_PRESET:
        assert loaded.args == GPT_PRESETS[GPT_PRESET[name]]
        params = sum(p.numel() for p in loaded.parameters())
    else:
        assert loaded.args == VAE_PRESETS["kl16"]
        params = sum(p.numel() for p in loaded.parameters())
    assert params == manifest(name)["total_params"]


def test_d2c_from_full_size_parts_is_the_d2c_b_preset(kl16):
    with torch.device("meta"):
        stage2 = MAR(PRESETS["d2c-b"].mar).state_dict()  # a D2C stage 2 in MAR's layout, fusion weights included
    gpt = weights_from_object({"model": manifest_state("llamagen_gpt_b")}, "c2i_B_256.pt")
    model = assemble(weights_from_object({"model": stage2}, "stage2.pth"), gpt=gpt, vae=kl16)
    assert model.config.name == "d2c-b" and model.config.to_dict() == PRESETS["d2c-b"].to_dict()


def _damage(state: dict, key: str, how: str) -> dict:
    state = dict(state)
    if how == "missing":
        del state[key]
    elif how == "renamed":
        state[key.replace(".", "_", 1) if "." in key else key + "_"] = state.pop(key)
    else:
        shape = list(state[key].shape)
        shape[-1] += 1
        state[key] = torch.empty(shape, device=state[key].device)
    return state


DAMAGED = [(name, key) for name, keys in {
    "mar_base": ["encoder_blocks.5.attn.qkv.weight", "class_emb.weight", "fake_latent",
                 "diffloss.net.res_blocks.2.mlp.0.bias"],
    "mar_large": ["decoder_pos_embed_learned"], "mar_huge": ["decoder_blocks.19.norm2.weight"],
    "mar_vae_kl16": ["decoder.up.3.block.1.conv2.weight", "post_quant_conv.weight"],
    "llamagen_gpt_b": ["layers.7.feed_forward.w3.weight", "tok_embeddings.weight"], "llamagen_gpt_l": ["output.weight"],
}.items() for key in keys]


@pytest.mark.parametrize("how", ["missing", "renamed", "misshaped"])
@pytest.mark.parametrize("name,key", DAMAGED)
def test_a_damaged_key_is_named(name, key, how, kl16):
    with pytest.raises(CheckpointError, match=key.split(".")[0]) as err:
        _load(name, _damage(manifest_state(name), key, how), kl16)
    assert key in str(err.value) or key.replace(".", "_", 1) in str(err.value)


def test_vq_tokenizer_is_out_of_scope():
    with pytest.raises(CheckpointError, match="VQ tokenizer.*out of scope"):
        weights_from_object({"model": manifest_state("llamagen_vq16")}, "vq_ds16_c2i.pt")


# -- key mapping rules ----------------------------------------------------------------------------------
def test_wrappers_and_non_weight_keys_are_mapped(kl16):
    state = manifest_state("llamagen_gpt_b")
    wrapped = {f"module._orig_mod.{k}": v for k, v in state.items()}
    wrapped["module._orig_mod.freqs_cis"] = torch.empty(257, 32, 2, device="meta")
    wrapped["module._orig_mod.layers.3.attention.kv_cache.k_cache"] = torch.empty(2, 12, 264, 64, device="meta")
    for entry in ("model", "module", "state_dict"):
        w = weights_from_object({entry: wrapped, "steps": 5}, "c2i.pt")
        assert w.format is Format.GPT and set(w.state) == set(state) and w.source.endswith(f"[{entry}]")
        assert set(w.dropped) == {"freqs_cis", "layers.3.attention.kv_cache.k_cache"}
    assert load_gpt(weights_from_object(wrapped, "fsdp.pt")).args == GPT_PRESETS["gpt-b"]  # bare state dict
    vae = weights_from_object({"model": {**manifest_state("mar_vae_kl16"), "loss.discriminator.main.0.weight":
                                         torch.empty(64, 3, 4, 4, device="meta")}}, "kl16.ckpt")
    assert list(vae.dropped) == ["loss.discriminator.main.0.weight"] and load_vae(vae).args == VAE_PRESETS["kl16"]


def test_ema_entry_is_chosen_unless_disabled(files):
    recorded = weights(OFFICIAL / "mar_tiny_a")
    for ema, want in ((True, recorded), (False, shifted(recorded))):
        model = assemble(files["mar"], vae=files["vae"], ema=ema, mar_heads=MAR_HEADS, mar_patch_size=MAR_PATCH)
        assert torch.equal(model.mar.fake_latent, want["fake_latent"])
    assert read_weights(files["mar"], ema=False).source.endswith("[model]")
    gpt = weights(OFFICIAL / "gpt_tiny_a")
    lg = weights_from_object({"model": shifted(gpt), "ema": gpt}, "llamagen.pt")
    assert lg.source.endswith("[ema]") and torch.equal(lg.state["output.weight"], gpt["output.weight"])


def test_stored_rope_table_gives_heads_and_tokens_and_is_checked():
    state = weights(OFFICIAL / "gpt_tiny_a")
    rope = precompute_rope_2d(4, 16, 10000.0, 1)  # 4x4 grid, head_dim 16: the recorded model's 4 heads
    gpt = load_gpt(weights_from_object({"model": {**state, "freqs_cis": rope}}, "old.pt"))
    assert (gpt.args.n_head, gpt.args.block_size) == (4, 16)
    with pytest.raises(CheckpointError, match="freqs_cis"):
        load_gpt(weights_from_object({"model": {**state, "freqs_cis": rope * 2}}, "old.pt"))


# -- files: torch.save round trips in the official layouts ---------------------------------------------
def test_files_detected_and_training_entries_tolerated(files, tmp_path):
    assert [read_weights(files[k]).format for k in ("mar", "vae", "gpt")] == [Format.MAR, Format.VAE, Format.GPT]
    state = weights(OFFICIAL / "vae_tiny_a")
    path = tmp_path / "with_args.ckpt"
    torch.save({"model": state, "args": argparse.Namespace(model="mar_base", lr=1e-4)}, path)
    assert read_weights(path).format is Format.VAE


def test_refused_and_unreadable_files_are_clear(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"model": weights(OFFICIAL / "vae_tiny_a"), "loader": LoaderState(3)}, path)
    with pytest.raises(CheckpointError, match="holds Python code or objects.*LoaderState.*was not run"):
        read_weights(path)
    junk, truncated = tmp_path / "junk.pth", tmp_path / "truncated.pth"
    junk.write_bytes(b"not a checkpoint at all")
    truncated.write_bytes(path.read_bytes()[:4096])
    for bad in (junk, truncated):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            read_weights(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_weights(tmp_path / "absent.pth")


def test_parts_in_the_wrong_roles_are_refused(files, monkeypatch):
    # The recorded tiny MAR's (width, depth) must not match a preset, so its heads cannot be inferred.
    from reference import official_sizes
    monkeypatch.setattr(official_sizes, "MAR_HEADS", {k: v for k, v in official_sizes.MAR_HEADS.items()
                                                      if k != (64, 2)})
    with pytest.raises(CheckpointError, match="holds no VAE.*vae=PATH"):
        assemble(files["mar"], mar_heads=MAR_HEADS)
    with pytest.raises(CheckpointError, match="mar_heads=N"):
        assemble(files["mar"], vae=files["vae"])
    with pytest.raises(CheckpointError, match="not a stage-2 checkpoint.*gpt=PATH"):
        assemble(files["gpt"], vae=files["vae"])
    with pytest.raises(CheckpointError, match="plain MAR.*drop the GPT"):
        assemble(files["mar"], gpt=files["gpt"], vae=files["vae"], mar_heads=MAR_HEADS, gpt_heads=GPT_HEADS,
                 mar_patch_size=MAR_PATCH)
    with pytest.raises(CheckpointError, match="given as the VAE"):
        assemble(files["mar"], vae=files["gpt"], mar_heads=MAR_HEADS)


def test_a_damaged_file_names_its_key(files, tmp_path):
    state = weights(OFFICIAL / "mar_tiny_a")
    state["decoder_blocks.1.mlp.fc2.weight"] = state["decoder_blocks.1.mlp.fc2.weight"][:, :-1]
    path = tmp_path / "damaged.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"decoder_blocks\.1\.mlp\.fc2\.weight: expected \(64, 256\)"):
        assemble(path, vae=files["vae"], mar_heads=MAR_HEADS, mar_patch_size=MAR_PATCH)


# -- parity with the official recordings, through the official-format files ----------------------------
@pytest.fixture(scope="module")
def plain_mar(files) -> D2C:
    return assemble(files["mar"], vae=files["vae"], mar_heads=MAR_HEADS, mar_patch_size=MAR_PATCH)


@torch.no_grad()
def test_mar_head_and_vae_from_files_match_official(plain_mar):
    io = arrays(OFFICIAL / "mar_tiny_a" / "io.npz")
    assert plain_mar.config.mar.fusion is Fusion.NONE and plain_mar.config.gpt is None
    every = torch.arange(16).expand(3, -1)
    z = plain_mar.mar(io["in_x"], mask_to_kept(io["in_mask"]), every, io["in_labels"])
    torch.testing.assert_close(z, io["out_dec_out"], atol=TOL, rtol=0)
    out = plain_mar.mar.diffloss.net(io["in_dl_x"], io["in_dl_t"], io["in_dl_c"])
    torch.testing.assert_close(out, io["out_dl_out"], atol=TOL, rtol=0)
    vio = arrays(OFFICIAL / "vae_tiny_a" / "io.npz")
    torch.testing.assert_close(plain_mar.vae(vio["in_z"]), vio["out_decode"], atol=TOL, rtol=0)


@torch.no_grad()
def test_gpt_from_file_matches_official_kv_path(files):
    gpt = load_gpt(files["gpt"], n_head=GPT_HEADS, block_size=16)
    io = {k: torch.from_numpy(np.asarray(v)) for k, v in np.load(OFFICIAL / "gpt_tiny_a" / "io.npz").items()}
    k, v = gpt.empty_cache(6)
    logits = gpt.step(io["out_kv_cond_combined"][:, None], torch.zeros(1, dtype=torch.long), k, v)
    torch.testing.assert_close(logits, io["out_kv_prefill_logits"], atol=TOL, rtol=0)
    for step in range(3):
        logits = gpt.step(io[f"out_kv_decode{step}_input"].long(), io[f"out_kv_decode{step}_input_pos"].long(), k, v)
        torch.testing.assert_close(logits, io[f"out_kv_decode{step}_logits"], atol=TOL, rtol=0)


def test_d2c_from_gpt_and_native_or_mar_layout_stage2(files, tmp_path):
    """A LlamaGen GPT with a D2C stage 2 given natively, and the same stage 2 in MAR's layout."""
    torch.manual_seed(0)
    native = D2C(PRESETS["d2c-tiny"]).eval()  # its MAR: 10 classes, codebook 64, 16 discrete tokens
    save_checkpoint(native, tmp_path / "stage2.safetensors")
    torch.save({"model": native.mar.state_dict()}, tmp_path / "stage2.pth")
    a = assemble(tmp_path / "stage2.safetensors", gpt=files["gpt"], gpt_heads=GPT_HEADS)
    b = assemble(tmp_path / "stage2.pth", gpt=files["gpt"], vae=files["vae"], gpt_heads=GPT_HEADS,
                 mar_patch_size=MAR_PATCH)
    for model in (a, b):
        assert model.config.gpt.dim == 64 and model.config.mar.fusion is Fusion.QFORMER
        assert torch.equal(model.gpt.output.weight, weights(OFFICIAL / "gpt_tiny_a")["output.weight"])
        assert torch.equal(model.mar.condition.queries, native.mar.condition.queries)
    assert torch.equal(a.vae.decoder.conv_out.weight, native.vae.decoder.conv_out.weight)
    assert torch.equal(b.vae.decoder.conv_out.weight, weights(OFFICIAL / "vae_tiny_a")["decoder.conv_out.weight"])
    with pytest.raises(CheckpointError, match="needs its stage-1 GPT.*gpt=PATH"):
        assemble(tmp_path / "stage2.pth", vae=files["vae"], mar_patch_size=MAR_PATCH)


def test_native_round_trip_of_an_assembled_model(plain_mar, tmp_path):
    path = save_checkpoint(plain_mar, tmp_path / "mar.safetensors")
    back = load_checkpoint(path)
    assert back.config.to_dict() == plain_mar.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), plain_mar.state_dict().values()))
    assert assemble(path) is not None and read_weights(path).format is Format.NATIVE


@pytest.mark.slow
def test_full_size_mar_b_and_kl16_files_round_trip(tmp_path):
    """MAR-B and KL-16 of the recorded shapes, saved as published ({"model", "model_ema"}; {"model"})."""
    gen = torch.Generator().manual_seed(0)
    ema = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in manifest("mar_base")["keys"].items()}
    model = {k: torch.zeros(()).expand(v.shape) for k, v in ema.items()}  # other weights, stored as one scalar
    torch.save({"model": model, "model_ema": ema, "epoch": 799}, tmp_path / "checkpoint-last.pth")
    vae = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in manifest("mar_vae_kl16")["keys"].items()}
    torch.save({"model": vae}, tmp_path / "kl16.ckpt")
    del model
    loaded = assemble(tmp_path / "checkpoint-last.pth", vae=tmp_path / "kl16.ckpt")
    assert loaded.config.name == "mar-b"
    mar_state, vae_state = loaded.mar.state_dict(), loaded.vae.state_dict()
    assert all(torch.equal(mar_state[k], v) for k, v in ema.items())
    assert all(torch.equal(vae_state[k], v) for k, v in vae.items())


# -- MAR sizes the weights cannot tell: the patch size and the VAE stride ------------------------------
def test_mar_loads_without_a_vae_at_the_published_sizes(files, caplog):
    """No VAE: patch 1 and kl16's stride 16, as every published MAR, which is how the tiny MAR was recorded."""
    with caplog.at_level("INFO", logger="reference.official_sizes"):
        mar = load_mar(files["mar"])
    recorded = mar_tiny_args(OFFICIAL / "mar_tiny_a")  # img 64, stride 16, patch 1, 16 channels
    assert mar.args == dataclasses.replace(recorded, qformer_num_heads=MAR_HEADS)  # no Q-Former in plain MAR
    assert "patch size 1 (MAR's published patch size" in caplog.text and "VAE stride 16 (kl16's" in caplog.text
    io = arrays(OFFICIAL / "mar_tiny_a" / "io.npz")
    with torch.no_grad():
        z = mar(io["in_x"], mask_to_kept(io["in_mask"]), torch.arange(16).expand(3, -1), io["in_labels"])
    torch.testing.assert_close(z, io["out_dec_out"], atol=TOL, rtol=0)
    other = load_mar(files["mar"], patch_size=2, vae_stride=8)
    assert (other.args.patch_size, other.args.vae_embed_dim, other.args.vae_stride, other.args.img_size) == (2, 4, 8, 64)


def test_a_vae_that_disagrees_with_the_mar_is_refused(files):
    # Before: the patch was re-derived from whatever VAE came along (16 channels / 4 = patch 2), silently.
    with pytest.raises(CheckpointError, match=r"at patch size 1 \(MAR's published.*need a VAE with 16 latent "
                                              r"channels, and the VAE has 4.*mar_patch_size=N"):
        assemble(files["mar"], vae=files["vae"], mar_heads=MAR_HEADS)
    with pytest.raises(CheckpointError, match="not a whole number of latent channels at patch size 3"):
        load_mar(files["mar"], patch_size=3)
    state, vae = weights(OFFICIAL / "mar_tiny_a"), load_vae(files["vae"]).args
    with pytest.raises(CheckpointError, match="vae_stride=16 was given, and the VAE's stride is 2"):
        mar_args_from_state(state, "mar.pth", vae, MAR_HEADS, MAR_PATCH, vae_stride=16)
    args = mar_args_from_state(state, "mar.pth", vae, MAR_HEADS, MAR_PATCH)
    assert (args.patch_size, args.vae_embed_dim, args.vae_stride, args.img_size) == (2, 4, 2, 16)
    with pytest.raises(CheckpointError, match="given as the MAR stage 2"):
        load_mar(files["vae"])
