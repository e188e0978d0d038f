"""Training losses of every part (GPT, MAR + diffusion head, KL-VAE, VQ), drawing only from a passed generator."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.diffusion import TRAIN_STEPS, make_tables
from reference.gpt import GPT
from reference.mar import MAR, patchify
from reference.vae import AutoencoderKL
from training.vq import vq_loss

__all__ = ["gpt_loss", "diffusion_loss", "diffusion_terms", "truncated_mask_ratio", "mar_loss",
           "normal_kl", "discretized_gaussian_log_likelihood", "kl_vae_loss", "vq_loss", "MASK_RATIO_STD"]

MASK_RATIO_STD = 0.25  # MAR: truncnorm on [mask_ratio_min, 1] with loc 1, scale 0.25
_LOG2 = math.log(2.0)
_TABLE_NAMES = ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
                "posterior_log_variance_clipped", "log_betas")


def _uniform(generator: torch.Generator, n: int) -> Tensor:
    """(n,) float64 uniforms in [0, 1) on the generator's device."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)


# ----------------------------------------------------------------------------------------------
# GPT (LlamaGen c2i)
# ----------------------------------------------------------------------------------------------
def gpt_loss(gpt: GPT, tokens: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """Next-token cross-entropy of `gpt` on tokens (B, T) given labels (B,), with CFG label dropout.

    Draws: (B,) uniforms; a label is replaced by `null_class` where its uniform < class_dropout_prob.
    """
    a = gpt.args
    drop = (_uniform(generator, labels.shape[0]) < a.class_dropout_prob).to(labels.device)  # (B,)
    labels = torch.where(drop, torch.full_like(labels, a.null_class), labels)
    logits = gpt.forward_train(tokens, labels)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1).long())


# ----------------------------------------------------------------------------------------------
# Diffusion head (MAR DiffLoss with the learned-range variance)
# ----------------------------------------------------------------------------------------------
def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF used by the official code."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-probability (nats) of x in [-1, 1] under a Gaussian discretised to 256 bins."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@lru_cache(maxsize=1)
def _train_tables() -> dict[str, Tensor]:
    """The 1000-step training tables as float64 CPU tensors."""
    tables = make_tables(None)
    return {name: torch.from_numpy(np.asarray(getattr(tables, name), dtype=np.float64)) for name in _TABLE_NAMES}


def _at(name: str, t: Tensor) -> Tensor:
    """Table `name` at timesteps t (N,) -> (N, 1) float32: indexed in float64, then cast (as MAR does)."""
    return _train_tables()[name][t.cpu()].float().to(t.device)[:, None]


def diffusion_terms(head: nn.Module, target: Tensor, z: Tensor, generator: torch.Generator | None = None, *,
                    t: Tensor | None = None, noise: Tensor | None = None) -> dict[str, Tensor]:
    """Per-row terms of MAR's `training_losses` (MSE loss type, epsilon mean, learned-range variance).

    head(x_t, t, z) -> (N, 2C) (eps, then variance values in [-1, 1]); target (N, C); z (N, Dz).
    Draws (when not given): t (N,) ~ U{0..999} first, then noise (N, C) ~ N(0, 1), both from `generator`.
    Returns float32 tensors "t", "noise", "mse" (N,), "vb" (N,) in bits and "loss" = mse + vb (N,).
    The vb term sees the eps prediction detached: it trains only the variance output.
    """
    n, c = target.shape
    if t is None or noise is None:
        if generator is None:
            raise ValueError("diffusion_terms needs a generator unless both t and noise are given")
    if t is None:
        t = torch.randint(0, TRAIN_STEPS, (n,), generator=generator, device=generator.device)
    if noise is None:
        noise = torch.randn((n, c), generator=generator, dtype=torch.float32, device=generator.device)
    t = t.to(target.device, torch.int64)
    noise = noise.to(target.device, torch.float32)
    x0 = target.float()
    x_t = _at("sqrt_alphas_cumprod", t) * x0 + _at("sqrt_one_minus_alphas_cumprod", t) * noise  # (N, C)

    out = head(x_t.to(target.dtype), t, z).float()  # (N, 2C)
    if out.shape != (n, 2 * c):
        raise ValueError(f"head output {tuple(out.shape)} != (N, 2C) = {(n, 2 * c)}")
    eps, var_values = out[:, :c], out[:, c:]
    mse = (noise - eps).pow(2).mean(dim=1)  # (N,)

    # _vb_terms_bpd on the frozen eps: q(x_{t-1} | x_t, x_0) against p(x_{t-1} | x_t)
    coef1, coef2 = _at("posterior_mean_coef1", t), _at("posterior_mean_coef2", t)
    min_log = _at("posterior_log_variance_clipped", t)
    true_mean = coef1 * x0 + coef2 * x_t
    pred_x0 = _at("sqrt_recip_alphas_cumprod", t) * x_t - _at("sqrt_recipm1_alphas_cumprod", t) * eps.detach()
    model_mean = coef1 * pred_x0 + coef2 * x_t
    frac = (var_values + 1) / 2
    model_log_var = frac * _at("log_betas", t) + (1 - frac) * min_log
    kl = normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=1) / _LOG2  # (N,)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=1) / _LOG2
    vb = torch.where(t == 0, nll, kl)
    return {"t": t, "noise": noise, "mse": mse, "vb": vb, "loss": mse + vb}


def diffusion_loss(head: nn.Module, target: Tensor, z: Tensor, mask: Tensor | None,
                   generator: torch.Generator) -> Tensor:
    """MAR's DiffLoss.forward: mean over rows of mse + vb, weighted by `mask` (N,) (1 = counted) if given."""
    loss = diffusion_terms(head, target, z, generator)["loss"]  # (N,)
    if mask is None:
        return loss.mean()
    mask = mask.to(loss.device, loss.dtype)
    return (loss * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------
# MAR
# ----------------------------------------------------------------------------------------------
def truncated_mask_ratio(mask_ratio_min: float, generator: torch.Generator) -> float:
    """One draw of MAR's mask ratio: N(1, 0.25) truncated to [mask_ratio_min, 1], by the inverse CDF.

    Draws: one float64 uniform.
    """
    if not 0.0 <= mask_ratio_min <= 1.0:
        raise ValueError(f"mask_ratio_min must be in [0, 1], got {mask_ratio_min}")
    u = _uniform(generator, 1).cpu()
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / MASK_RATIO_STD, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor(0.0, dtype=torch.float64))
    x = torch.special.ndtri(lo + u * (hi - lo))
    return float((1.0 + MASK_RATIO_STD * x).clamp(mask_ratio_min, 1.0))


def mar_loss(mar: MAR, latents_tokens: Tensor, labels: Tensor, discrete_ids: Tensor | None,
             generator: torch.Generator) -> Tensor:
    """MAR (+ D2C fusion) training loss on tokens (B, L, C) (or scaled latents (B, c, H, W), patchified).

    Draws, in order: B permutations of L (generation orders), one mask-ratio uniform, (B,) label-drop
    uniforms, then the diffusion draws of `diffusion_loss` over B * L * diffusion_batch_mul rows.
    The first ceil(L * ratio) positions of each order are masked (predicted); a dropped row gets the
    null class and, with fusion, all-null discrete ids (D2C's joint drop).
    """
    a = mar.args
    tokens = patchify(latents_tokens, a.patch_size) if latents_tokens.dim() == 4 else latents_tokens
    bsz, seq_len, _ = tokens.shape
    if seq_len != a.seq_len:
        raise ValueError(f"got {seq_len} tokens per image, the model expects {a.seq_len}")
    if (mar.condition is None) != (discrete_ids is None):
        raise ValueError(f"fusion {a.fusion.value!r} {'needs' if mar.condition is not None else 'takes no'} "
                         f"discrete ids")
    device = tokens.device

    orders = torch.stack([torch.randperm(seq_len, generator=generator, device=generator.device)
                          for _ in range(bsz)]).to(device)  # (B, L)
    num_masked = math.ceil(seq_len * truncated_mask_ratio(a.mask_ratio_min, generator))
    mask = torch.zeros(bsz, seq_len, device=device).scatter(1, orders[:, :num_masked], 1.0)  # (B, L)
    kept = orders[:, num_masked:].sort(dim=1).values  # (B, K)

    drop = (_uniform(generator, bsz) < a.label_drop_prob).to(device)  # (B,)
    labels = torch.where(drop, torch.full_like(labels, a.null_class), labels)
    fusion = None
    if mar.condition is not None:
        ids = torch.where(drop[:, None], torch.full_like(discrete_ids, a.null_token), discrete_ids)
        fusion = mar.condition(ids)

    pred = torch.arange(seq_len, device=device).expand(bsz, -1)  # (B, L)
    z = mar(tokens, kept, pred, labels, fusion)  # (B, L, Dd)
    mul = a.diffusion_batch_mul
    target = tokens.detach().reshape(bsz * seq_len, -1).repeat(mul, 1)
    z = z.reshape(bsz * seq_len, -1).repeat(mul, 1)
    mask = mask.reshape(bsz * seq_len).repeat(mul)
    return diffusion_loss(mar.diffloss, target, z, mask, generator)


def kl_vae_loss(model: AutoencoderKL, images: Tensor, noise: Tensor,
                kl_weight: float = 1e-6) -> tuple[Tensor, dict[str, Tensor]]:
    """LDM-style KL-VAE loss without LPIPS/GAN terms.

    Every term is summed over (C, H, W) per sample and averaged over the batch, as in LDM's
    LPIPSWithDiscriminator, so `kl_weight=1e-6` keeps its LDM meaning. Reconstruction is
    L1 + MSE (L1 is LDM's pixel term; MSE adds a smooth gradient near zero error).
    `noise` (shape of the posterior mean) drives the reparameterised sample.
    """
    posterior = model.encode(images)
    recon = model.decode(posterior.sample(noise))  # (B, 3, H, W)
    diff = recon - images
    bsz = images.shape[0]
    l1 = diff.abs().sum() / bsz
    mse = diff.pow(2).sum() / bsz
    kl = posterior.kl().mean()
    total = l1 + mse + kl_weight * kl
    parts = {"total": total.detach(), "l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}
    return total, parts
