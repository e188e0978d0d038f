"""Training every part of a small D2C on the synthetic shapes with the reference's own losses, seeded end to end."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.classifier import ShapesClassifier, classifier_loss
from training.data import NUM_CLASSES, make_dataset, render
from training.losses import gpt_loss, kl_vae_loss, mar_loss, vq_loss
from reference.model import D2C, get_config
from reference.vae import LATENT_SCALE, AutoencoderKL, DiagonalGaussian
from training.vq import VQArgs, VQModel

log = logging.getLogger(__name__)

DEMO_CONFIG = "d2c-demo"
# The VQ that makes the discrete training ids: a 4x4 grid of the GPT's 64-word vocabulary at 16x16 pixels.
DEMO_VQ = VQArgs(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=16,
                 attn_resolutions=(), decoder_attn_resolutions=(), z_channels=32)
PARTS = ("vq", "vae", "gpt", "mar", "classifier")


@dataclass
class TrainSettings:
    """How long and how each part trains; the defaults are the shipped demo checkpoint's run."""

    train_images: int = 20000
    batch: dict[str, int] = field(default_factory=lambda: {"vq": 32, "vae": 32, "gpt": 64, "mar": 64,
                                                           "classifier": 64})
    steps: dict[str, int] = field(default_factory=lambda: {"vq": 800, "vae": 2000, "gpt": 3000, "mar": 6000,
                                                           "classifier": 1000})
    lr: dict[str, float] = field(default_factory=lambda: {"vq": 2e-3, "vae": 1e-3, "gpt": 2e-3, "mar": 1e-3,
                                                          "classifier": 2e-3})
    warmup: int = 100
    grad_clip: float = 1.0
    log_every: int = 100
    config: str = DEMO_CONFIG

    def __post_init__(self) -> None:
        missing = [p for p in PARTS if p not in self.steps or p not in self.lr or p not in self.batch]
        if missing:
            raise ValueError(f"steps, lr and batch need every part {PARTS}; missing {missing}")
        if min(self.batch.values()) < 1 or self.train_images < max(self.batch.values()):
            raise ValueError(f"need train_images >= every batch >= 1, got {self.train_images}, {self.batch}")


@dataclass
class DemoResult:
    model: D2C
    vq: VQModel
    classifier: ShapesClassifier
    seconds: dict[str, float]  # wall time per part
    final_loss: dict[str, float]  # mean loss over each part's last `log_every` steps


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(name: str, module: nn.Module, loss_fn: Callable[[int], Tensor], settings: TrainSettings,
         progress: bool) -> float:
    """AdamW on `module` for settings.steps[name] steps of `loss_fn(step)`; returns the last window's mean loss."""
    steps, base_lr = settings.steps[name], settings.lr[name]
    opt = torch.optim.AdamW(module.parameters(), lr=base_lr, betas=(0.9, 0.95), weight_decay=0.0)
    module.train()
    window: list[float] = []
    bar = tqdm(range(steps), desc=f"train {name}", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = base_lr * _lr_factor(step, steps, min(settings.warmup, steps))
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), settings.grad_clip)
        opt.step()
        window = (window + [float(loss.detach())])[-settings.log_every:]
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            mean = sum(window) / len(window)
            bar.set_postfix(loss=f"{mean:.4f}")
            log.info("%s step %d/%d loss %.4f", name, step + 1, steps, mean)
    module.eval()
    return sum(window) / len(window) if window else float("nan")


@torch.no_grad()
def normalise_latent_scale(vae: AutoencoderKL, images: Tensor) -> float:
    """Rescale the VAE's latent space so LATENT_SCALE * latent has unit std on `images`; returns the factor.

    decode(z) is unchanged for z' = k z: quant_conv's mean rows are multiplied by k (its log-variance rows
    shifted by 2 log k) and post_quant_conv's input weights divided by k.
    """
    moments = vae.encode_moments(images)
    std = float(DiagonalGaussian.from_moments(moments).mean.std())
    k = 1.0 / (LATENT_SCALE * std)
    e = vae.embed_dim
    conv = vae.quant_conv
    conv.weight[:e] *= k
    conv.bias[:e] *= k
    conv.bias[e:] += 2.0 * math.log(k)
    vae.post_quant_conv.weight /= k
    return k


@torch.no_grad()
def _encode_all(fn: Callable[[Tensor], Tensor], images: Tensor, chunk: int = 500) -> Tensor:
    return torch.cat([fn(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])


def train_demo(settings: TrainSettings | None = None, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train the VQ, the VAE, the GPT (on VQ ids), MAR with fusion (on VAE latents) and the classifier.

    Every draw comes from generators seeded by `seed` (and `torch.manual_seed` before each part's
    initialisation), so the same settings and seed give the same weights.
    """
    settings = settings or TrainSettings()
    images, labels = make_dataset(settings.train_images, seed)
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    seconds, final = {}, {}

    def batch_index(part: str) -> Tensor:
        return torch.randint(0, n, (settings.batch[part],), generator=gen)

    def timed(name: str, module: nn.Module, loss_fn: Callable[[int], Tensor]) -> None:
        start = time.perf_counter()
        final[name] = _fit(name, module, loss_fn, settings, progress)
        seconds[name] = time.perf_counter() - start
        log.info("%s trained in %.1f s (final loss %.4f)", name, seconds[name], final[name])

    torch.manual_seed(seed)
    vq = VQModel(DEMO_VQ)
    timed("vq", vq, lambda step: vq_loss(vq, images[batch_index("vq")])[0])

    torch.manual_seed(seed + 2)
    model = D2C(get_config(settings.config))
    vae = model.vae

    def vae_step(step: int) -> Tensor:
        x = images[batch_index("vae")]
        noise = torch.randn((x.shape[0], vae.embed_dim, *(s // vae.args.stride for s in x.shape[2:])), generator=gen)
        return kl_vae_loss(vae, x, noise)[0]
    timed("vae", vae, vae_step)

    start = time.perf_counter()
    scale = normalise_latent_scale(vae, images[:2000])
    ids = _encode_all(vq.encode_to_ids, images)  # (N, 16)
    moments = _encode_all(vae.encode_moments, images)  # (N, 2E, h, w)
    log.info("latent scale factor %.4f; %d of %d codes used; encoded in %.1f s", scale,
             int(ids.unique().numel()), DEMO_VQ.codebook_size, time.perf_counter() - start)

    timed("gpt", model.gpt, lambda step: _gpt_step(model, ids, labels, batch_index("gpt"), gen))
    timed("mar", model.mar, lambda step: _mar_step(model, moments, ids, labels, batch_index("mar"), gen))

    torch.manual_seed(seed + 3)
    classifier = ShapesClassifier(NUM_CLASSES)
    cls_gen = torch.Generator().manual_seed(seed + 4)

    def classifier_step(step: int) -> Tensor:
        y = torch.randint(0, NUM_CLASSES, (settings.batch["classifier"],), generator=cls_gen)
        return classifier_loss(classifier, render(y, cls_gen), y)
    timed("classifier", classifier, classifier_step)
    return DemoResult(model.eval(), vq.eval(), classifier.eval(), seconds, final)


def _gpt_step(model: D2C, ids: Tensor, labels: Tensor, idx: Tensor, gen: torch.Generator) -> Tensor:
    return gpt_loss(model.gpt, ids[idx], labels[idx], gen)


def _mar_step(model: D2C, moments: Tensor, ids: Tensor, labels: Tensor, idx: Tensor,
              gen: torch.Generator) -> Tensor:
    posterior = DiagonalGaussian.from_moments(moments[idx])
    latents = posterior.sample(torch.randn(posterior.mean.shape, generator=gen)) * LATENT_SCALE
    return mar_loss(model.mar, latents, labels[idx], ids[idx], gen)
