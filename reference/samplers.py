"""Fast samplers beside the exact one: the `fast` preset, named setting sets, and LazyMAR's two caches.

The speed-ups are training-free changes to the sampler on the same weights, options of the one shared loop
(`reference.pipeline`); with them off the loop is MAR's exact sampler.
- Diffusion-step annealing (DiSA): the denoising steps of each masked step fall from `diffusion_steps` (or
  `diffusion_anneal_start`) to `diffusion_floor` over the masked steps (`reference.diffusion.annealed_counts`).
- Lazy MAR steps (LazyMAR's condition cache): between full mar steps the unconditional conditions are the
  conditional ones plus the guidance difference kept from the last full step (`ConditionCache`), so the `mar`
  stage runs on the conditional half alone. Guided generations only: without guidance there is no other half.
- Lazy MAR steps with the token cache (LazyMAR's token cache, `TokenCache`): every masked step runs the stages
  `mar_cached` and `mar_fresh` (`reference.mar_cache`) instead of `mar`; a lazy step recomputes in the encoder only
  the tokens generated since the last step and, after the decoder's cut layer, only the tokens to predict, the
  recent ones and those whose values changed most; the rest is read from caches kept here. Guided or not.
"""
from __future__ import annotations

from enum import Enum
from typing import Callable

import torch
from torch import Tensor

from reference.errors import BadInput, Setting
from reference.mar import Fusion
from reference.mar_cache import cached_layers


class Sampler(str, Enum):
    EXACT = "exact"  # MAR's and LlamaGen's sampler, bit for bit
    FAST = "fast"  # the speed preset: `fast_settings` over the other settings


ANNEAL_FIELDS = ("diffusion_anneal", "diffusion_anneal_start")
LAZY_FIELDS = ("lazy_mar", "lazy_mar_warmup", "lazy_mar_tokens")
TOKEN_CACHE_STAGES = ("mar_cached", "mar_fresh")  # the stages lazy MAR steps with the token cache run
# The settings of the fast samplers that a named set replaces (the annealing floor is the model's, kept).
SAMPLER_FIELDS = ("sampler",) + ANNEAL_FIELDS + LAZY_FIELDS


def fast_settings(values: dict[str, object]) -> dict[str, object]:
    """What `sampler="fast"` stands for, given the other settings (`values`: field -> value).

    DiSA's MAR setting, linear annealing from 50 of MAR's 100 denoising steps down to 5: here from half the
    diffusion steps (never below the floor) down to `diffusion_floor` (the model's own where its settings record
    one; the demo's head needs 250). LazyMAR's refresh rule, a full mar step every 9 after 5 full ones (its
    `fresh_t` and `start_step`), with both its caches (the condition cache only where the generation is guided).
    """
    return {"diffusion_anneal": "linear",
            "diffusion_anneal_start": min(values["diffusion_steps"], max(values["diffusion_floor"],
                                                                         values["diffusion_steps"] // 2)),
            "lazy_mar": 9, "lazy_mar_warmup": 5, "lazy_mar_tokens": True}


# Named setting sets over a model's settings, to measure each option against the exact sampler in one run
# (`d2c-bench --samplers`, `d2c-quality --samplers`): each option alone as the preset sets it, and the preset.
SAMPLER_SETS: dict[str, Callable[[dict[str, object]], dict[str, object]]] = {
    "exact": lambda values: {},
    "anneal": lambda values: {k: v for k, v in fast_settings(values).items() if k in ANNEAL_FIELDS},
    "lazy": lambda values: {k: v for k, v in fast_settings(values).items() if k in LAZY_FIELDS},
    "fast": lambda values: {"sampler": Sampler.FAST.value},
}


def expand_preset(sampler: Sampler, values: dict[str, object], defaults: dict[str, object]) -> dict[str, object]:
    """The settings `sampler` stands for, to write over `values` (field -> value).

    A setting the preset decides that was given another value than its default and the preset's is refused (one
    line naming the flag), so a recorded, already expanded set of settings expands to itself.
    """
    if sampler is Sampler.EXACT:
        return {}
    out = fast_settings(values)
    for name, value in out.items():
        if values[name] not in (defaults[name], value):
            raise BadInput(f"is {values[name]!r}, but ", Setting("sampler", "fast"), f" sets it to {value!r}: leave "
                           "it out, or use ", Setting("sampler", "exact"), " with the options named", setting=name)
    return out


def full_mar_steps(num_iter: int, interval: int, warmup: int) -> list[bool]:
    """Per masked step, whether the `mar` stage runs in full (both halves); all of them when `interval` is 0.

    LazyMAR's rule (`global_force_fresh`): step s is full when s < warmup or (s - warmup) % interval == 0.
    """
    if interval == 0:
        return [True] * num_iter
    return [s < warmup or (s - warmup) % interval == 0 for s in range(num_iter)]


class ConditionCache:
    """LazyMAR's condition cache over the `mar` stage's conditions z of a guided batch of `bsz` images.

    A full step asks for the conditions at every position (`all_positions`) of both halves and keeps
    diff = z_uncond - z_cond (B, L, Dd); a lazy step runs the conditional half only and rebuilds the
    unconditional half at the positions it predicts as z_cond + diff.
    """

    def __init__(self, bsz: int, seq_len: int, device: str | torch.device):
        self.bsz = bsz
        self.all_positions = torch.arange(seq_len, device=device).expand(2 * bsz, seq_len)  # (2B, L)
        self.diff: Tensor | None = None

    def full(self, z_all: Tensor, pred: Tensor) -> Tensor:
        """Keep the difference of `z_all` (2B, L, Dd), conditional rows first; -> its rows at `pred` (2B, P, Dd)."""
        self.diff = z_all[self.bsz:] - z_all[:self.bsz]  # (B, L, Dd)
        return z_all.gather(1, pred.unsqueeze(-1).expand(-1, -1, z_all.shape[-1]))

    def lazy(self, z_cond: Tensor, pred: Tensor) -> Tensor:
        """Conditional conditions (B, P, Dd) at `pred` (B, P) -> both halves (2B, P, Dd), the unconditional rebuilt."""
        if self.diff is None:
            raise RuntimeError("a lazy mar step before any full one: the first masked step must run in full")
        diff = self.diff.gather(1, pred.unsqueeze(-1).expand(-1, -1, z_cond.shape[-1]))  # (B, P, Dd)
        return torch.cat([z_cond, z_cond + diff])


# LazyMAR's share of the sequence positions a lazy step recomputes after the cut, by masked step of 64 (its
# RETAIN_RATIO_SCHEDULE): all of them for the first 20 steps, then 0.6 falling to 0.05.
RETAIN_RATIOS = (1.0,) * 20 + (0.6,) + (0.5,) * 4 + (0.4,) * 5 + (0.15,) * 5 + (0.12,) * 5 + (0.05,) * 24
EXTRA_FRESH = 15  # LazyMAR recomputes at least the tokens to predict, the recent ones and 15 more


def fresh_count(step: int, num_iter: int, positions: int, pred: int, recent: int) -> int:
    """Sequence positions a lazy step recomputes after the cut (those to predict included), LazyMAR's rule."""
    ratio = RETAIN_RATIOS[min(len(RETAIN_RATIOS) - 1, step * len(RETAIN_RATIOS) // num_iter)]
    return min(positions, max(pred + recent + EXTRA_FRESH, int(positions * ratio)))


def choose_others(scores: Tensor, pred: Tensor, recent: Tensor, buffer: int, count: int) -> Tensor:
    """The positions (R, count - P) recomputed after the cut besides the P to predict: the recent tokens first, then
    those whose cut-layer values changed most (lowest similarity `scores` (R, S)), in ascending position order."""
    forced = scores.scatter(1, recent + buffer, float("-inf")).scatter(1, pred + buffer, float("inf"))
    return forced.topk(count - pred.shape[1], dim=1, largest=False).indices.sort(dim=1).values


def _scatter_rows(cache: Tensor, rows: Tensor, values: Tensor, dim: int) -> Tensor:
    """Write `values` into `cache` (in place) at positions `rows` (R, n) along `dim` (the positions axis)."""
    index = rows.view(rows.shape[0], *([1] * (dim - 1)), rows.shape[1], *([1] * (values.dim() - dim - 1)))
    return cache.scatter_(dim, index.expand(values.shape), values)


class TokenCache:
    """LazyMAR's token cache over the `mar_cached` and `mar_fresh` stages, for the conditional rows (B images).

    The caches, by sequence position (S = buffer + L): every encoder layer's keys and values, the decoder's embedded
    encoder features, the cut layer's values, and the keys and values of the decoder layers after the cut. A full
    step runs every row (both halves under guidance) with every token recent and every position chosen: the exact
    conditions, and all caches rewritten. A lazy step runs the conditional rows with the previous step's tokens
    recent and `fresh_count` positions chosen after the cut. Under guidance a full step asks for every token
    position's conditions and keeps their guidance difference (`ConditionCache`).
    """

    def __init__(self, stages, bsz: int, num_iter: int, guided: bool, labels: Tensor, fusion: Tensor | None):
        m, dev = stages.config.mar, stages.device
        self.stages, self.m, self.bsz, self.num_iter, self.guided = stages, m, bsz, num_iter, guided
        self.labels, self.fusion = labels, fusion  # (G*B,) and (G*B, W, D): both halves under guidance
        self.cross = m.fusion is Fusion.CROSS_ATTN
        self.positions = m.buffer_size + m.seq_len
        eh, dh = m.encoder_num_heads, m.decoder_num_heads
        zeros = (lambda *shape: torch.zeros(shape, device=dev))
        self.enc = zeros(bsz, 2 * m.encoder_depth, eh, self.positions, m.encoder_embed_dim // eh)
        self.dec_in = zeros(bsz, self.positions, m.decoder_embed_dim)
        self.cut = zeros(bsz, dh, self.positions, m.decoder_embed_dim // dh)
        layers = cached_layers(m.decoder_depth)
        self.dec = zeros(bsz, 2 * layers, dh, self.positions, m.decoder_embed_dim // dh) if layers else None
        self.all_positions = torch.arange(self.positions, device=dev).expand(2 * bsz, -1)  # (2B, S)
        self.conditions = ConditionCache(bsz, m.seq_len, dev) if guided else None
        self.recent: Tensor | None = None

    def step(self, s: int, full: bool, tokens: Tensor, kept: Tensor, pred: Tensor) -> Tensor:
        """The conditions z of masked step `s`: (G*B, P, Dd) on a full step, and on a lazy one too under guidance
        (the unconditional half rebuilt), else (B, P, Dd)."""
        rows = (2 if self.guided else 1) * self.bsz if full else self.bsz
        rep = (lambda t: torch.cat([t] * (rows // t.shape[0])))
        recent = kept if full else self.recent
        feeds = {"tokens": rep(tokens), "kept": rep(kept), "recent": rep(recent), "labels": self.labels[:rows]}
        if self.fusion is not None:
            feeds["fusion"] = self.fusion[:rows]
        feeds.update(enc_cache=rep(self.enc), dec_in_cache=rep(self.dec_in), cut_cache=rep(self.cut))
        hidden, scores, enc_rows, dec_rows, cut_values = self.stages.run("mar_cached", feeds)
        b, buffer = self.bsz, self.m.buffer_size
        computed = torch.cat([self.all_positions[:b, :buffer], recent + buffer], dim=1)  # (B, buffer + Kr)
        self.enc = _scatter_rows(self.enc, computed, enc_rows[:b], 3)
        self.dec_in = _scatter_rows(self.dec_in, computed, dec_rows[:b], 1)
        self.cut = cut_values[:b].clone()  # a backend may hand out its output buffer, refilled at the next call
        if full:  # every position: all token positions for the guidance difference, else the ones to predict
            asked = self.all_positions[:rows, buffer:] - buffer if self.guided else pred
            taken = torch.zeros_like(scores).scatter(1, asked + buffer, 1.0)  # (rows, S)
            others = taken.sort(dim=1, stable=True).indices[:, :self.positions - asked.shape[1]]  # the rest, in order
        else:
            count = fresh_count(s, self.num_iter, self.positions, pred.shape[1], recent.shape[1])
            asked, others = pred, choose_others(scores, pred, recent, buffer, count)
        tail = {"hidden": hidden, "pred": asked, "others": others}
        if self.cross:
            tail["fusion"] = feeds["fusion"]
        if self.dec is not None:
            tail["dec_cache"] = rep(self.dec)
        out = self.stages.run("mar_fresh", tail)
        if self.dec is not None:
            self.dec = _scatter_rows(self.dec, torch.cat([asked[:b] + buffer, others[:b]], dim=1), out[1][:b], 3)
        self.recent = pred
        z = out[0]
        if self.conditions is None:
            return z
        return self.conditions.full(z, torch.cat([pred, pred])) if full else self.conditions.lazy(z, pred)
