"""Tests of reference/gpt.py against the official LlamaGen manifests and the gpt_tiny_a fixture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reference.gpt import GPT, GPT_PRESETS, GPTArgs

TOL = 1e-5


def _tiny_a_args(fixture: Path) -> GPTArgs:
    full = json.loads((fixture / "meta.json").read_text())["model_args_full"]
    return GPTArgs(**{k: full[k] for k in (
        "dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes", "cls_token_num",
        "multiple_of", "ffn_dim_multiplier", "rope_base", "norm_eps", "class_dropout_prob")})


@pytest.fixture(scope="module")
def tiny_a(official_dir: Path) -> tuple[GPT, dict[str, np.ndarray]]:
    fixture = official_dir / "gpt_tiny_a"
    model = GPT(_tiny_a_args(fixture)).eval()
    model.load_state_dict(load_file(str(fixture / "model.safetensors")), strict=True)
    io = dict(np.load(fixture / "io.npz"))
    return model, io


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def _max_abs(a: torch.Tensor, b: np.ndarray) -> float:
    return (a - _t(b)).abs().max().item()


@pytest.mark.parametrize("preset,manifest", [("gpt-b", "llamagen_gpt_b.json"), ("gpt-l", "llamagen_gpt_l.json")])
def test_state_dict_matches_official_manifest(official_dir: Path, preset: str, manifest: str) -> None:
    ref = json.loads((official_dir / "keys" / manifest).read_text())
    with torch.device("meta"):
        model = GPT(GPT_PRESETS[preset])
    sd = model.state_dict()
    assert list(sd) == list(ref["keys"])
    assert {k: list(v.shape) for k, v in sd.items()} == ref["keys"]
    assert sum(p.numel() for p in model.parameters()) == ref["total_params"]
    assert "freqs_cis" not in sd and model.freqs_cis.shape == (257, model.args.head_dim // 2, 2)


def test_args_validation() -> None:
    a = GPT_PRESETS["gpt-b"]
    assert (a.head_dim, a.grid_size, a.null_class, a.max_seq_len, a.ffn_hidden) == (64, 16, 1000, 257, 2048)
    assert GPT_PRESETS["gpt-l"].ffn_hidden == 2816
    for bad in (dict(dim=30, n_head=4), dict(block_size=15), dict(dim=24, n_head=4), dict(cls_token_num=2),
                dict(class_dropout_prob=0.0)):
        with pytest.raises(ValueError):
            GPTArgs(**bad)


def test_rope_table_class_rows_zero(tiny_a) -> None:
    model, _ = tiny_a
    table = model.freqs_cis  # (17, 8, 2)
    assert torch.all(table[0] == 0)
    assert torch.allclose(table[1:].pow(2).sum(-1), torch.ones(16, 8))
    # cell (r, c) = position 1 + 4r + c: first half of the pairs follows r, the second half c
    assert torch.equal(table[1 + 4 * 2 + 3, :4], table[1 + 4 * 2, :4])
    assert torch.equal(table[1 + 4 * 2 + 3, 4:], table[1 + 3, 4:])


def test_train_and_eval_logits_match_official(tiny_a) -> None:
    model, io = tiny_a
    with torch.no_grad():
        logits = model.forward_train(_t(io["in_tokens"]), _t(io["in_labels"]))
    assert logits.shape == (3, 16, 64) and logits.dtype == torch.float32
    assert _max_abs(logits, io["out_train_logits"]) < TOL
    assert _max_abs(logits, io["out_eval_logits_no_cache"]) < TOL
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), _t(io["in_tokens"]).reshape(-1))
    assert abs(loss.item() - float(io["out_train_loss"][0])) < TOL


def test_kv_cache_matches_official(tiny_a) -> None:
    model, io = tiny_a
    k, v = model.empty_cache(6)
    with torch.no_grad():
        logits = model.step(_t(io["out_kv_cond_combined"])[:, None], torch.zeros(1, dtype=torch.long), k, v)
        assert _max_abs(logits, io["out_kv_prefill_logits"]) < TOL
        for step in range(3):
            ids = _t(io[f"out_kv_decode{step}_input"]).long()
            pos = _t(io[f"out_kv_decode{step}_input_pos"]).long()
            logits = model.step(ids, pos, k, v)
            assert logits.shape == (6, 1, 64)
            assert _max_abs(logits, io[f"out_kv_decode{step}_logits"]) < TOL
    # int32 ids / positions (as the official decode uses) give the same result
    k2, v2 = model.empty_cache(6)
    with torch.no_grad():
        l32 = model.step(_t(io["out_kv_cond_combined"])[:, None].int(), torch.zeros(1, dtype=torch.int32), k2, v2)
    assert _max_abs(l32, io["out_kv_prefill_logits"]) < TOL


def _random_tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPT_PRESETS["gpt-tiny"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 1.0)
    return model


def test_incremental_decode_matches_full_forward() -> None:
    model = _random_tiny()
    a = model.args
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, a.vocab_size, (3, a.block_size), generator=g)
    labels = torch.tensor([2, a.null_class, 7])
    with torch.no_grad():
        full = model.forward_train(tokens, labels)  # (3, 16, V)
        k, v = model.empty_cache(3)
        steps = [model.step(labels[:, None], torch.tensor([0]), k, v)]
        for t in range(a.block_size - 1):
            steps.append(model.step(tokens[:, t:t + 1], torch.tensor([t + 1]), k, v))
        inc = torch.cat(steps, dim=1)
        # a multi-token chunk after a one-token prefill agrees as well
        k2, v2 = model.empty_cache(3)
        model.step(labels[:, None], torch.tensor([0]), k2, v2)
        chunk = model.step(tokens[:, :-1], torch.arange(1, a.block_size), k2, v2)
    assert inc.shape == full.shape
    assert (inc - full).abs().max().item() < TOL
    assert (chunk - full[:, 1:]).abs().max().item() < TOL
    assert (k2 - k).abs().max().item() < TOL and (v2 - v).abs().max().item() < TOL
    assert full.abs().max().item() > 0.1  # non-trivial logits


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_forward_reads_the_cache_and_step_writes_only_its_slots(batch: int) -> None:
    model = _random_tiny(1)
    a = model.args
    g = torch.Generator().manual_seed(batch)
    k = torch.randn(a.n_layer, batch, a.n_head, a.max_seq_len, a.head_dim, generator=g)
    v = torch.randn(a.n_layer, batch, a.n_head, a.max_seq_len, a.head_dim, generator=g)
    k0, v0 = k.clone(), v.clone()
    pos = torch.tensor([4, 5, 6])
    ids = torch.randint(0, a.vocab_size, (batch, 3), generator=g)
    with torch.no_grad():
        logits, k_new, v_new = model(ids, pos, k, v)
    assert logits.shape == (batch, 3, a.vocab_size) and logits.dtype == torch.float32
    assert k_new.shape == v_new.shape == (a.n_layer, batch, a.n_head, 3, a.head_dim)
    assert torch.equal(k, k0) and torch.equal(v, v0)  # forward never writes the cache
    with torch.no_grad():
        assert torch.equal(model.step(ids, pos, k, v), logits)
    keep = torch.ones(a.max_seq_len, dtype=torch.bool)
    keep[pos] = False
    assert torch.equal(k[:, :, :, keep], k0[:, :, :, keep]) and torch.equal(v[:, :, :, keep], v0[:, :, :, keep])
    assert torch.equal(k[:, :, :, pos], k_new) and torch.equal(v[:, :, :, pos], v_new)
    # the slots this call rewrites and those after it are masked out: garbage there does not change the logits
    k_junk, v_junk = k0.clone(), v0.clone()
    k_junk[:, :, :, 4:] = 1e3
    v_junk[:, :, :, 4:] = -1e3
    with torch.no_grad():
        logits_junk, _, _ = model(ids, pos, k_junk, v_junk)
        changed, _, _ = model(ids, pos, k0 * 2, v0)  # the slots before do count
    assert torch.equal(logits_junk, logits)
    assert not torch.allclose(changed, logits)
    # each batch row is independent of the others
    with torch.no_grad():
        row0, _, _ = model(ids[:1], pos, k0[:, :1].clone(), v0[:, :1].clone())
    assert (row0 - logits[:1]).abs().max().item() < TOL
