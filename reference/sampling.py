"""Sampling math shared by the reference pipeline and every runtime backend: small pure functions."""
from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# Randomness. Every random number of a generation comes from one `Draws` object, in the order
# documented in `reference/pipeline.py`. Models never draw. The loop asks for what a generation step
# needs in one call (a token's uniforms, the orders, all the noise of a masked step) and moves it to the
# stages' device in one copy; the numbers are the CPU generator's, the same on every device. The calls
# may be made ahead of the loop, on a producer thread (`reference.draw_producer`): `out` is then a buffer
# of the producer's (pinned for a CUDA loop).
# ----------------------------------------------------------------------------------------------
# torch's CPU `normal_` on a contiguous float32 tensor of n >= 16 numbers takes n uniforms in order, then turns each
# block of 16 into normals by itself (the last block of an n that is no multiple of 16 is drawn again): calls whose
# sizes are multiples of 16 give the numbers that one call of their total size gives, and leave the generator alike.
NORMAL_BLOCK = 16


class Draws(Protocol):
    """What the loop asks for, in the documented order; `out` (optional): where to write the result."""

    def token_uniforms(self, bsz: int, vocab: int, out: Tensor | None = None) -> Tensor: ...
    def orders(self, bsz: int, seq_len: int) -> Tensor: ...
    def step_noise(self, bsz: int, pred: int, channels: int, groups: int, steps: int,
                   out: Tensor | None = None) -> Tensor: ...


def step_noise_buffer(bsz: int, pred: int, channels: int, steps: int, pin: bool = False) -> Tensor:
    """An empty (steps + 1, B * pred, C) float32 buffer for `step_noise` (pinned host memory with `pin`)."""
    return torch.empty((steps + 1, bsz * pred, channels), dtype=torch.float32, pin_memory=pin)


class BatchDraws:
    """The loop's draws made of three primitive ones (`uniform`, `normal`, `permutation`) over the whole batch,
    in the calls and shapes MAR and LlamaGen make, so that recorded official draws replay (batch order)."""

    def uniform(self, shape: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def normal(self, shape: Sequence[int]) -> Tensor:
        raise NotImplementedError

    def permutation(self, n: int) -> Tensor:
        raise NotImplementedError

    def token_uniforms(self, bsz: int, vocab: int, out: Tensor | None = None) -> Tensor:
        """(B, V) float64: one `uniform((B, V))`, the Gumbel-max draw of one discrete token of every image."""
        out = torch.empty((bsz, vocab), dtype=torch.float64) if out is None else out
        self.fill_uniform(out)
        return out

    def orders(self, bsz: int, seq_len: int) -> Tensor:
        """(B, L) int64 generation orders: one `permutation(L)` per image, in batch order."""
        return torch.stack([self.permutation(seq_len) for _ in range(bsz)])

    def fill_uniform(self, out: Tensor) -> None:
        """Fill the contiguous float64 `out` with the numbers `uniform(out.shape)` returns."""
        out.copy_(self.uniform(tuple(out.shape)))

    def fill_normal(self, out: Tensor) -> None:
        """Fill the contiguous float32 `out` with the numbers `normal(out.shape)` returns."""
        out.copy_(self.normal(tuple(out.shape)))

    def step_noise(self, bsz: int, pred: int, channels: int, groups: int, steps: int,
                   out: Tensor | None = None) -> Tensor:
        """(steps + 1, N, C) float32, N = B * pred rows (batch-major): MAR's DiffLoss.sample draws of one masked step.

        [0] is one `normal((N, C))` (x_T, shared by the unconditional half under guidance); [k] for k >= 1 is the
        first N rows of the k-th diffusion step's `normal((G * N, C))` (G = `groups`), the rows that reach the
        conditional output; the rest is drawn only to keep MAR's shapes.
        """
        out = step_noise_buffer(bsz, pred, channels, steps) if out is None else out
        self.fill_step_noise(out, groups)
        return out

    def fill_step_noise(self, out: Tensor, groups: int) -> None:
        """`step_noise` written into `out` (steps + 1, N, C), whose every `out[k]` is contiguous, call by call."""
        first, *steps = out.unbind(0)
        self.fill_normal(first)
        if groups == 1:
            for o in steps:
                self.fill_normal(o)
            return
        drawn = torch.empty((groups * first.shape[0], first.shape[1]), dtype=torch.float32)
        for o in steps:
            self.fill_normal(drawn)
            o.copy_(drawn[:first.shape[0]])


class TorchDraws(BatchDraws):
    """Draws from one CPU `torch.Generator` seeded once for the whole batch; identical on every machine and
    backend. An image then depends on the images it is batched with; `ImageDraws` is the per-image kind."""

    def __init__(self, seed: int):
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))

    def uniform(self, shape: Sequence[int]) -> Tensor:
        """float64 uniforms in [0, 1): float64 so that inverse-CDF sampling resolves tiny probabilities."""
        return torch.rand(tuple(shape), generator=self.generator, dtype=torch.float64)

    def normal(self, shape: Sequence[int]) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)

    def fill_uniform(self, out: Tensor) -> None:
        out.uniform_(generator=self.generator)  # what `rand(out.shape, dtype=float64)` draws, written in place

    def fill_normal(self, out: Tensor) -> None:
        out.normal_(generator=self.generator)  # what `randn(out.shape)` draws, written in place

    def permutation(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.generator, dtype=torch.int64)

    def fill_step_noise(self, out: Tensor, groups: int) -> None:
        """`BatchDraws.fill_step_noise`'s numbers from one `normal_` call where MAR's calls all draw multiples of
        `NORMAL_BLOCK` numbers (N * C is one), else call by call. Without guidance a contiguous `out` is that call's
        output as it is; with it, the unconditional rows are dropped by one copy."""
        rows, channels = out.shape[1], out.shape[2]
        if (rows * channels) % NORMAL_BLOCK:
            return super().fill_step_noise(out, groups)
        if groups == 1 and out.is_contiguous():
            out.normal_(generator=self.generator)
            return
        steps = out.shape[0] - 1
        drawn = torch.empty((rows + steps * groups * rows, channels), dtype=torch.float32).normal_(
            generator=self.generator)  # x_T, then every step's (G * N, C)
        out[0].copy_(drawn[:rows])
        out[1:].copy_(drawn[rows:].view(steps, groups * rows, channels)[:, :rows])


class ImageDraws:
    """One generator per image: image i draws exactly what `TorchDraws(seeds[i])` draws for a batch of that one
    image, so an image depends only on its class, its seed and the settings, never on its batch-mates.

    `images` (a range of image indices, with `out`): write only those images' rows of `out`. The images'
    generators are independent, so disjoint ranges may be drawn on different threads at once.
    """

    def __init__(self, seeds: Sequence[int]):
        self.images = [TorchDraws(s) for s in seeds]

    def _check(self, bsz: int) -> None:
        if bsz != len(self.images):
            raise ValueError(f"{len(self.images)} seeds for a batch of {bsz} images")

    def token_uniforms(self, bsz: int, vocab: int, out: Tensor | None = None, images: range | None = None) -> Tensor:
        self._check(bsz)
        out = torch.empty((bsz, vocab), dtype=torch.float64) if out is None else out
        for i in range(bsz) if images is None else images:  # image i's row
            self.images[i].fill_uniform(out[i:i + 1])
        return out

    def orders(self, bsz: int, seq_len: int) -> Tensor:
        self._check(bsz)
        return torch.cat([d.orders(1, seq_len) for d in self.images])

    def step_noise(self, bsz: int, pred: int, channels: int, groups: int, steps: int,
                   out: Tensor | None = None, images: range | None = None) -> Tensor:
        self._check(bsz)
        out = step_noise_buffer(bsz, pred, channels, steps) if out is None else out
        for i in range(bsz) if images is None else images:  # image i's rows: a contiguous block of every step's (N, C)
            self.images[i].fill_step_noise(out[:, i * pred:(i + 1) * pred], groups)
        return out


def image_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """Each image's seed: `seed + i` for image i of an int seed, else the given list (one per image)."""
    if isinstance(seed, numbers.Integral):
        return [int(seed) + i for i in range(count)]
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} images")
    return seeds


# ----------------------------------------------------------------------------------------------
# Discrete sampling (stage 1): logits -> probabilities -> ids, following LlamaGen's `sample`.
# ----------------------------------------------------------------------------------------------
MIN_TEMPERATURE = 1e-5


def guide_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """LlamaGen's classifier-free guidance on logits: uncond + (cond - uncond) * scale."""
    return uncond + (cond - uncond) * scale


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, V) logits -> float32 scores: divided by the temperature, filtered tokens at -inf.

    Top-k removes every logit strictly below the k-th largest; top-p keeps the smallest prefix of
    the sorted distribution whose mass reaches `top_p` (the first token always kept). Softmax of
    the scores is LlamaGen's sampling distribution.
    """
    logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_k > 0:
        k = min(max(top_k, 1), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def sample_gumbel(scores: Tensor, u: Tensor) -> Tensor:
    """Gumbel-max sampling: (B, V) scores and (B, V) uniforms in [0, 1) -> (B,) int64 ids.

    argmax(scores + Gumbel noise) draws from softmax(scores). The decision margin is the gap between
    the two best perturbed scores, not a CDF boundary, so backends whose logits differ by float
    rounding pick the same token except with negligible probability. Filtered tokens never win.
    """
    gumbel = -torch.log(-torch.log(u.to(torch.float64).clamp(min=1e-300)))  # (B, V)
    return (scores.to(torch.float64) + gumbel).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Masked autoregressive schedule (stage 2), following MAR's `sample_tokens`.
# ----------------------------------------------------------------------------------------------
class CfgSchedule(str, Enum):
    LINEAR = "linear"
    CONSTANT = "constant"


def mask_len_schedule(seq_len: int, num_iter: int) -> list[int]:
    """Tokens that stay masked after each step: cosine schedule clamped to [1, masked - 1].

    On the final step the value is clamped up to 1 but every remaining token is predicted.
    """
    if num_iter < 1 or num_iter > seq_len:
        raise ValueError(f"num_iter must be in [1, {seq_len}], got {num_iter}")
    masked = seq_len
    out = []
    for step in range(num_iter):
        raw = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, raw))
        out.append(mask_len)
        masked = mask_len
    return out


def cfg_schedule(cfg: float, schedule: CfgSchedule | str, mask_lens: Sequence[int], seq_len: int) -> Tensor:
    """(num_iter,) float32 guidance scale of each step: MAR's linear ramp 1 + (cfg - 1) * (seq_len - mask_len) /
    seq_len, computed in float32 like the official code (so the values match it exactly), or constant `cfg`."""
    if CfgSchedule(schedule) is CfgSchedule.CONSTANT:
        return torch.full((len(mask_lens),), float(cfg), dtype=torch.float32)
    m = torch.tensor([float(n) for n in mask_lens], dtype=torch.float32)
    return 1 + (cfg - 1) * (seq_len - m) / seq_len


def tokens_per_step(seq_len: int, num_iter: int) -> list[int]:
    """How many tokens each step predicts, per image (sums to seq_len): what `step_positions` gives each step."""
    lens = mask_len_schedule(seq_len, num_iter)
    before = [seq_len] + lens[:-1]
    counts = [b - a for b, a in zip(before, lens)]
    counts[-1] = before[-1]
    return counts


def step_positions(order: Tensor, seq_len: int, num_iter: int) -> list[tuple[Tensor, Tensor]]:
    """Per step, (kept, to_predict): sorted position indices of each image, (B, K) and (B, P).

    `order` (B, L) is each image's generation order; the first `mask_len` entries of the order stay
    masked after a step. Positions are sorted ascending, the order MAR's `nonzero` gathers use.
    """
    bsz = order.shape[0]
    lens = mask_len_schedule(seq_len, num_iter)
    masked_before = seq_len
    out = []
    for step, mask_len in enumerate(lens):
        kept = order[:, masked_before:]  # tokens already predicted
        if step == num_iter - 1:
            pred = order[:, :masked_before]
        else:
            pred = order[:, mask_len:masked_before]
        out.append((kept.sort(-1).values.reshape(bsz, -1), pred.sort(-1).values.reshape(bsz, -1)))
        masked_before = mask_len
    return out
