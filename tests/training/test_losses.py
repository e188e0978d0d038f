"""The training losses: determinism, gradients, learning, and the diffusion terms against direct formulas."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reference.diffusion import make_tables
from reference.diffusion_head import HeadArgs, SimpleMLPAdaLN
from training.losses import (diffusion_loss, diffusion_terms, gpt_loss, mar_loss, truncated_mask_ratio)
from reference.mar import patchify
from reference.model import D2C, get_config

PRESETS = ["d2c-tiny", "d2c-tiny-cross_attn", "d2c-tiny-none"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention (and get very slow on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wake_head(head: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised AdaLN / output layers small random values so gradients flow upstream."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def grads_nonzero(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def adam_reduces(params, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    opt = torch.optim.Adam(params, lr=lr)
    first = loss_fn().item()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return first, loss_fn().item()


# ----------------------------------------------------------------------------------------------
# GPT
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def gpt_batch():
    torch.manual_seed(0)
    gpt = D2C(get_config("d2c-tiny")).gpt
    g = gen(123)
    tokens = torch.randint(0, gpt.args.vocab_size, (8, gpt.args.block_size), generator=g)
    labels = torch.randint(0, gpt.args.num_classes, (8,), generator=g)
    return gpt, tokens, labels


def test_gpt_loss_deterministic_and_seeded(gpt_batch):
    gpt, tokens, labels = gpt_batch
    gpt.args.class_dropout_prob = 0.5
    a, b = gpt_loss(gpt, tokens, labels, gen(0)), gpt_loss(gpt, tokens, labels, gen(0))
    assert torch.isfinite(a) and a.ndim == 0
    assert torch.equal(a, b)
    assert not torch.equal(a, gpt_loss(gpt, tokens, labels, gen(1)))
    assert abs(a.item() - math.log(gpt.args.vocab_size)) < 1.0  # near uniform at init


def test_gpt_loss_label_drop(gpt_batch):
    gpt, tokens, labels = gpt_batch
    null = torch.full_like(labels, gpt.args.null_class)
    ce = lambda lab: nn.functional.cross_entropy(gpt.forward_train(tokens, lab).flatten(0, 1), tokens.flatten())
    gpt.args.class_dropout_prob = 1.0
    torch.testing.assert_close(gpt_loss(gpt, tokens, labels, gen(0)), ce(null))
    gpt.args.class_dropout_prob = 1e-12
    torch.testing.assert_close(gpt_loss(gpt, tokens, labels, gen(0)), ce(labels))


def test_gpt_loss_backward_and_learns(gpt_batch):
    gpt, tokens, labels = gpt_batch
    gpt_loss(gpt, tokens, labels, gen(0)).backward()
    for part in (gpt.tok_embeddings, gpt.output, gpt.cls_embedding, gpt.layers[0].attention, gpt.layers[-1]):
        assert grads_nonzero(part)
    gpt.zero_grad()
    first, last = adam_reduces(gpt.parameters(), lambda: gpt_loss(gpt, tokens, labels, gen(0)), 10, 1e-2)
    assert last < first - 0.5


# ----------------------------------------------------------------------------------------------
# Diffusion loss
# ----------------------------------------------------------------------------------------------
def oracle_head(target: torch.Tensor):
    """A head that recovers the true noise from x_t (float64), with zero variance values."""
    tables = make_tables(None)
    sa = torch.from_numpy(tables.sqrt_alphas_cumprod)
    s1 = torch.from_numpy(tables.sqrt_one_minus_alphas_cumprod)

    def head(x_t, t, z):
        eps = (x_t.double() - sa[t][:, None].float().double() * target.double()) / s1[t][:, None].float().double()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1).float()
    return head


def test_diffusion_oracle_head_has_zero_mse():
    target = torch.randn(64, 4, generator=gen(5))
    terms = diffusion_terms(oracle_head(target), target, torch.zeros(64, 8), gen(0))
    assert terms["mse"].max() < 1e-6
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] >= -1e-4).all()
    # the documented draw order: t first, then the noise
    g = gen(0)
    assert torch.equal(terms["t"], torch.randint(0, 1000, (64,), generator=g))
    assert torch.equal(terms["noise"], torch.randn(64, 4, generator=g))


def _tanh_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def direct_vb(x0: torch.Tensor, noise: torch.Tensor, out: torch.Tensor, t: int) -> torch.Tensor:
    """The vb term of each row at timestep t, from the float64 tables with scalar math (bits)."""
    tb = make_tables(None)
    c = x0.shape[1]
    x0, noise, out = x0.double(), noise.double(), out.double()
    x_t = tb.sqrt_alphas_cumprod[t] * x0 + tb.sqrt_one_minus_alphas_cumprod[t] * noise
    eps, v = out[:, :c], out[:, c:]
    pred_x0 = tb.sqrt_recip_alphas_cumprod[t] * x_t - tb.sqrt_recipm1_alphas_cumprod[t] * eps
    m_model = tb.posterior_mean_coef1[t] * pred_x0 + tb.posterior_mean_coef2[t] * x_t
    m_true = tb.posterior_mean_coef1[t] * x0 + tb.posterior_mean_coef2[t] * x_t
    lv_true = tb.posterior_log_variance_clipped[t]
    lv_model = (v + 1) / 2 * tb.log_betas[t] + (1 - v) / 2 * lv_true
    if t > 0:
        p = torch.distributions.Normal(m_true, torch.full_like(m_true, math.exp(0.5 * lv_true)))
        q = torch.distributions.Normal(m_model, torch.exp(0.5 * lv_model))
        return torch.distributions.kl_divergence(p, q).mean(1) / math.log(2)
    rows = []
    for i in range(x0.shape[0]):
        nll = 0.0
        for j in range(c):
            x, m, s = x0[i, j].item(), m_model[i, j].item(), math.exp(0.5 * lv_model[i, j].item())
            hi, lo = _tanh_cdf((x - m + 1 / 255) / s), _tanh_cdf((x - m - 1 / 255) / s)
            prob = hi if x < -0.999 else (1 - lo if x > 0.999 else hi - lo)
            nll -= math.log(max(prob, 1e-12))
        rows.append(nll / c / math.log(2))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
def test_diffusion_vb_term_matches_direct_computation(t):
    g = gen(t + 7)
    x0 = (torch.rand(16, 4, generator=g) * 2 - 1).float()
    x0[0, 0], x0[1, 1] = -1.0, 1.0  # the edge bins of the discretised likelihood
    noise = torch.randn(16, 4, generator=g)
    out = torch.cat([torch.randn(16, 4, generator=g), torch.rand(16, 4, generator=g) * 2 - 1], dim=1)
    ts = torch.full((16,), t, dtype=torch.int64)
    terms = diffusion_terms(lambda x, tt, z: out, x0, torch.zeros(16, 1), t=ts, noise=noise)
    expected = direct_vb(x0, noise, out, t).float()
    torch.testing.assert_close(terms["vb"], expected, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(terms["mse"], (out[:, :4] - noise).pow(2).mean(1))


def test_diffusion_vb_trains_only_the_variance():
    x0, noise = torch.randn(8, 4, generator=gen(0)), torch.randn(8, 4, generator=gen(1))
    out = torch.randn(8, 8, generator=gen(2)).requires_grad_()
    terms = diffusion_terms(lambda x, t, z: out, x0, torch.zeros(8, 1), gen(3), noise=noise)
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0
    out.grad = None
    terms = diffusion_terms(lambda x, t, z: out, x0, torch.zeros(8, 1), gen(3), noise=noise)
    terms["mse"].sum().backward()
    assert out.grad[:, 4:].abs().max() == 0 and out.grad[:, :4].abs().max() > 0


@pytest.fixture()
def head_batch():
    torch.manual_seed(0)
    head = SimpleMLPAdaLN(HeadArgs(in_channels=4, z_channels=8, width=32, depth=2))
    g = gen(9)
    return head, torch.randn(32, 4, generator=g), torch.randn(32, 8, generator=g)


def test_diffusion_loss_seeded_masked_and_learns(head_batch):
    head, target, z = head_batch
    mask = (torch.arange(32) % 3 == 0).float()
    a = diffusion_loss(head, target, z, mask, gen(0))
    assert torch.isfinite(a) and torch.equal(a, diffusion_loss(head, target, z, mask, gen(0)))
    assert not torch.equal(a, diffusion_loss(head, target, z, mask, gen(1)))
    rows = diffusion_terms(head, target, z, gen(0))["loss"]
    torch.testing.assert_close(a, rows[mask.bool()].mean())
    torch.testing.assert_close(diffusion_loss(head, target, z, None, gen(0)), rows.mean())

    wake_head(head)
    diffusion_loss(head, target, z, mask, gen(0)).backward()
    for part in (head.input_proj, head.cond_embed, head.time_embed, head.res_blocks[0], head.final_layer):
        assert grads_nonzero(part)
    head.zero_grad()
    first, last = adam_reduces(head.parameters(), lambda: diffusion_loss(head, target, z, mask, gen(0)), 15, 3e-3)
    assert last < 0.8 * first


# ----------------------------------------------------------------------------------------------
# Mask ratio
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lo", [0.7, 0.5])
def test_truncated_mask_ratio_range_and_mean(lo):
    g = gen(0)
    draws = torch.tensor([truncated_mask_ratio(lo, g) for _ in range(20000)], dtype=torch.float64)
    assert draws.min() >= lo and draws.max() <= 1.0
    a, b = (lo - 1.0) / 0.25, 0.0
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    mean = 1.0 + 0.25 * (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))
    assert abs(draws.mean().item() - mean) < 2e-3
    assert truncated_mask_ratio(lo, gen(3)) == truncated_mask_ratio(lo, gen(3))


def test_truncated_mask_ratio_edges():
    assert truncated_mask_ratio(1.0, gen(0)) == 1.0
    with pytest.raises(ValueError):
        truncated_mask_ratio(1.5, gen(0))


# ----------------------------------------------------------------------------------------------
# MAR
# ----------------------------------------------------------------------------------------------
def mar_batch(name: str, bsz: int = 4):
    torch.manual_seed(0)
    model = D2C(get_config(name))
    a = model.mar.args
    g = gen(42)
    tokens = torch.randn(bsz, a.seq_len, a.token_dim, generator=g)
    labels = torch.randint(0, a.class_num, (bsz,), generator=g)
    ids = None if model.mar.condition is None else torch.randint(0, a.codebook_size, (bsz, a.discrete_len),
                                                                 generator=g)
    return model.mar, tokens, labels, ids


def num_masked_for(seed: int, bsz: int, seq_len: int, mask_ratio_min: float) -> int:
    """Replay mar_loss's first draws: bsz orders, then the mask ratio."""
    g = gen(seed)
    for _ in range(bsz):
        torch.randperm(seq_len, generator=g)
    return math.ceil(seq_len * truncated_mask_ratio(mask_ratio_min, g))


def seed_keeping_tokens(mar, bsz: int = 4) -> int:
    """A seed whose mask ratio leaves some tokens visible (with L = 16, a ratio > 15/16 masks them all)."""
    a = mar.args
    return next(s for s in range(100) if num_masked_for(s, bsz, a.seq_len, a.mask_ratio_min) < a.seq_len)


@pytest.mark.parametrize("name", PRESETS)
def test_mar_loss_seeded_backward_and_learns(name):
    mar, tokens, labels, ids = mar_batch(name)
    a = mar_loss(mar, tokens, labels, ids, gen(0))
    assert torch.isfinite(a) and a.ndim == 0
    assert torch.equal(a, mar_loss(mar, tokens, labels, ids, gen(0)))
    assert not torch.equal(a, mar_loss(mar, tokens, labels, ids, gen(1)))

    wake_head(mar.diffloss)
    seed = seed_keeping_tokens(mar)
    mar_loss(mar, tokens, labels, ids, gen(seed)).backward()
    parts = [mar.diffloss, mar.z_proj, mar.encoder_blocks[0], mar.decoder_blocks[0], mar.class_emb]
    if mar.condition is not None:
        parts.append(mar.condition)
    for part in parts:
        assert grads_nonzero(part), type(part).__name__
    mar.zero_grad()
    first, last = adam_reduces(mar.parameters(), lambda: mar_loss(mar, tokens, labels, ids, gen(seed)), 10, 2e-3)
    assert last < 0.9 * first


def test_mar_loss_masking_follows_the_draws(monkeypatch):
    mar, tokens, labels, ids = mar_batch("d2c-tiny")
    seen = {}
    orig = mar.forward

    def spy(tok, kept, pred, lab, fusion):
        seen.update(kept=kept, pred=pred, labels=lab)
        return orig(tok, kept, pred, lab, fusion)

    monkeypatch.setattr(mar, "forward", spy)
    seed, L = seed_keeping_tokens(mar), mar.args.seq_len
    mar_loss(mar, tokens, labels, ids, gen(seed))
    g = gen(seed)
    orders = torch.stack([torch.randperm(L, generator=g) for _ in range(4)])
    num_masked = math.ceil(L * truncated_mask_ratio(mar.args.mask_ratio_min, g))
    assert 0 < L - num_masked == seen["kept"].shape[1]
    assert torch.equal(seen["kept"], orders[:, num_masked:].sort(1).values)
    assert torch.equal(seen["pred"], torch.arange(L).expand(4, -1))


def test_mar_loss_joint_label_drop():
    mar, tokens, labels, ids = mar_batch("d2c-tiny")
    a = mar.args
    wake_head(mar.diffloss)
    a.label_drop_prob = 1.0
    dropped = mar_loss(mar, tokens, labels, ids, gen(0))
    a.label_drop_prob = 0.0
    null = mar_loss(mar, tokens, torch.full_like(labels, a.null_class), torch.full_like(ids, a.null_token), gen(0))
    kept_ids = mar_loss(mar, tokens, torch.full_like(labels, a.null_class), ids, gen(0))
    torch.testing.assert_close(dropped, null, rtol=0, atol=0)
    assert not torch.equal(dropped, kept_ids)  # the discrete ids are dropped with the label


def test_mar_loss_accepts_latents_and_checks_inputs():
    mar, tokens, labels, ids = mar_batch("d2c-tiny")
    p, c, h = mar.args.patch_size, mar.args.vae_embed_dim, mar.args.seq_h
    latents = torch.randn(4, c, h * p, h * p, generator=gen(1))
    torch.testing.assert_close(mar_loss(mar, latents, labels, ids, gen(0)),
                               mar_loss(mar, patchify(latents, p), labels, ids, gen(0)))
    with pytest.raises(ValueError, match="discrete ids"):
        mar_loss(mar, tokens, labels, None, gen(0))
