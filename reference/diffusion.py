"""Gaussian diffusion of MAR's DiffLoss: cosine schedule, respacing, and the one denoising step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

TRAIN_STEPS = 1000
MAX_BETA = 0.999
# Per-step coefficients passed to the denoising step, in this order (float32, shape (NUM_COEFS,)).
COEF_NAMES = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",  # min_log of the learned-range variance
    "log_betas",  # max_log of the learned-range variance
    "nonzero",  # 0 at the last step (index 0): no noise is added
)
NUM_COEFS = len(COEF_NAMES)


def cosine_betas(num_steps: int = TRAIN_STEPS, max_beta: float = MAX_BETA) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal), float64."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Original step indices kept when respacing to `section_counts` steps (sorted ascending).

    Equal-sized sections, each strided with a fractional stride rounded half-to-even (Python's round).
    """
    counts = [int(x) for x in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


@dataclass(frozen=True)
class DiffusionTables:
    """float64 tables of a (respaced) diffusion, indexed by the respaced step."""

    timestep_map: np.ndarray
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def coefficients(self, index: int) -> Tensor:
        """(NUM_COEFS,) float32 coefficients of respaced step `index` (cast after indexing, as MAR does)."""
        values = [getattr(self, name)[index] for name in COEF_NAMES[:-1]] + [float(index != 0)]
        return torch.tensor(np.array(values, dtype=np.float64), dtype=torch.float32)

    def model_timestep(self, index: int) -> int:
        """The original-scale timestep (0..999) the network receives at respaced step `index`."""
        return int(self.timestep_map[index])


def _tables_from_betas(betas: np.ndarray, timestep_map: np.ndarray) -> DiffusionTables:
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return DiffusionTables(
        timestep_map=timestep_map,
        betas=betas,
        alphas_cumprod=ac,
        alphas_cumprod_prev=ac_prev,
        alphas_cumprod_next=np.append(ac[1:], 0.0),
        sqrt_alphas_cumprod=np.sqrt(ac),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        log_one_minus_alphas_cumprod=np.log(1.0 - ac),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        posterior_variance=post_var,
        # the first posterior variance is 0: clipped to the second (a single step has none; it adds no noise)
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1
        else np.log(betas),
        posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
        posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        log_betas=np.log(betas),
    )


@lru_cache(maxsize=16)
def make_tables(sampling_steps: int | str | None = None, train_steps: int = TRAIN_STEPS) -> DiffusionTables:
    """Tables of the cosine diffusion respaced to `sampling_steps` (None: the training diffusion).

    Respaced betas come from ratios of consecutive kept alphas_cumprod and are not clipped.
    """
    base = cosine_betas(train_steps)
    if sampling_steps in (None, "", train_steps, str(train_steps)):
        return _tables_from_betas(base, np.arange(train_steps, dtype=np.int64))
    keep = space_timesteps(train_steps, sampling_steps)
    ac = np.cumprod(1.0 - base)
    betas, last = [], 1.0
    for i in keep:
        betas.append(1 - ac[i] / last)
        last = ac[i]
    return _tables_from_betas(np.array(betas, dtype=np.float64), np.array(keep, dtype=np.int64))


class AnnealSchedule(str, Enum):
    """How the denoising steps fall over the masked steps (DiSA's strategies); OFF: every masked step takes them all."""

    OFF = "off"
    LINEAR = "linear"
    COSINE = "cosine"


def annealed_counts(steps: int, floor: int, num_iter: int, schedule: AnnealSchedule | str) -> list[int]:
    """Denoising steps of each of `num_iter` masked steps: `steps` at the first, falling to `floor` at the last.

    DiSA's rule (its `DiffLoss.sample` over the respacings floor..steps): masked step s of n takes
    floor + int(w * (steps - floor)), w = (n - 1 - s) / (n - 1) (linear) or (cos(pi s / (n - 1)) + 1) / 2 (cosine).
    Later masked steps condition on more generated tokens, and their few denoising steps suffice. A single
    masked step, or OFF, takes `steps` throughout. The counts depend on the settings alone (a static schedule).
    """
    schedule = AnnealSchedule(schedule)
    if not 1 <= floor <= steps:
        raise ValueError(f"the annealing floor must be in [1, {steps}] (the denoising steps), got {floor}")
    if schedule is AnnealSchedule.OFF or num_iter == 1:
        return [steps] * num_iter
    last, span = num_iter - 1, steps - floor
    if schedule is AnnealSchedule.LINEAR:
        return [floor + int((last - s) / last * span) for s in range(num_iter)]
    return [floor + int((math.cos(math.pi * s / last) + 1) / 2 * span) for s in range(num_iter)]


def annealed_tables(counts: Sequence[int]) -> dict[int, dict[str, Tensor]]:
    """`step_tables` of every distinct count of denoising steps, each respaced once (`make_tables`)."""
    return {count: step_tables(make_tables(count)) for count in sorted(set(counts))}


# ----------------------------------------------------------------------------------------------
# One denoising step: the shared math of the reference sampler and the exported `diffusion` stage.
# ----------------------------------------------------------------------------------------------
def guided_output(out: Tensor, rows: int, channels: int, cfg: Tensor) -> tuple[Tensor, Tensor]:
    """Split the head's output into guided eps and variance values of the first `rows` rows.

    `out` (G*rows, 2C) holds conditional rows first and, when G = 2, unconditional rows after them.
    eps = uncond + cfg * (cond - uncond) (MAR's forward_with_cfg); with G = 1 it is the conditional eps.
    """
    eps_c = out[:rows, :channels]  # (N, C)
    eps_u = out[out.shape[0] - rows:, :channels]  # (N, C)
    return eps_u + cfg * (eps_c - eps_u), out[:rows, channels:]


def ddpm_step(x: Tensor, eps: Tensor, var_values: Tensor, coefs: Tensor, noise: Tensor,
              temperature: Tensor) -> Tensor:
    """x_t -> x_{t-1} with learned-range variance (clip_denoised off), all in float32."""
    sqrt_recip, sqrt_recipm1, coef1, coef2, min_log, max_log, nonzero = coefs.float().unbind(-1)
    frac = (var_values + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = sqrt_recip * x - sqrt_recipm1 * eps
    mean = coef1 * pred_xstart + coef2 * x
    return mean + nonzero * torch.exp(0.5 * log_variance) * noise * temperature


class DenoiseStep(nn.Module):
    """The `diffusion` stage: one guided denoising step of the head, tensor in, tensor out.

    x (N, C) float32; t (1,) int64 original-scale timestep; z (G*N, Dz) conditions, conditional rows
    first (G = 2 with guidance, 1 without); noise (N, C); cfg (1,); temperature (1,);
    coefs (NUM_COEFS,) from `DiffusionTables.coefficients` -> x_{t-1} (N, C).
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor, t: Tensor, z: Tensor, noise: Tensor, cfg: Tensor, temperature: Tensor,
                coefs: Tensor) -> Tensor:
        rows, channels = x.shape
        groups = z.shape[0] // rows
        x_in = x.repeat(groups, 1)  # (G*N, C): the first half of x feeds both halves
        out = self.head(x_in, t.expand(z.shape[0]), z)  # (G*N, 2C)
        eps, var_values = guided_output(out, rows, channels, cfg)
        return ddpm_step(x, eps, var_values, coefs, noise, temperature)


# ----------------------------------------------------------------------------------------------
# The denoising steps of one masked step, run through any stage runner (the loop's, or a graph capture).
# ----------------------------------------------------------------------------------------------
def denoise_steps(run: Callable[[str, dict[str, Tensor]], tuple[Tensor, ...]], feeds: dict[str, Tensor]) -> Tensor:
    """MAR's DiffLoss.sample loop for one masked step, from the last respaced step down to 0 -> (N, C) latents.

    feeds: `noise` (T + 1, N, C) from `Draws.step_noise` ([0] is x_T), `z` (G*N, Dz) conditional rows first,
    `timesteps` (T,) and `coefs` (T, NUM_COEFS) in the order the steps run, `cfg` (1,), `temperature` (1,).
    Every tensor stays where it is; nothing here waits for the device, so the loop can be captured as a graph.
    """
    x, *noise = feeds["noise"].unbind(0)  # views, made in one call per table: no per-step tensor math
    steps = zip(feeds["timesteps"].split(1), noise, feeds["coefs"].unbind(0))
    z, cfg, temperature = feeds["z"], feeds["cfg"], feeds["temperature"]
    for t, n, coefs in steps:
        x, = run("diffusion", {"x": x, "t": t, "z": z, "noise": n, "cfg": cfg, "temperature": temperature,
                               "coefs": coefs})
    return x


def step_tables(tables: DiffusionTables) -> dict[str, Tensor]:
    """`timesteps` (T,) int64 and `coefs` (T, NUM_COEFS) float32, in the order the denoising steps run."""
    order = list(reversed(range(tables.num_timesteps)))
    return {"timesteps": torch.tensor([tables.model_timestep(i) for i in order], dtype=torch.int64),
            "coefs": torch.stack([tables.coefficients(i) for i in order])}
